"""BEiT-3 base fine-tuning on VQAv2, unilm's recipe, 480 px.

Recipe (unilm beit3/get_started/get_started_for_vqav2.md, the base command): 480 x 480 images,
batch 128 (8 GPUs x 16), lr 3e-5, layer decay 1.0, 10 epochs with 1 warmup epoch, drop path 0.1,
weight decay 0.01, AdamW betas (0.9, 0.98), RandAugment, task_head_lr_weight 20. Defaults of
unilm beit3/run_beit3_finetuning.py for the rest: eps 1e-8, min lr 1e-6, no gradient clipping,
64 text tokens (--num_max_bpe_tokens); the model `beit3_base_patch16_480_vqav2` has no final
backbone norm (normalize_output=False, beit3_reference.md §5). Training data as unilm's
VQAv2Dataset: the train2014 questions and the val2014 questions of all but 1000 held-out images,
without questions that have no answer in the 3129-answer vocabulary. Epochs -> steps as unilm's
`cosine_scheduler` (steps per epoch = examples // batch) with 650,000 training questions, an
estimate: 443,757 train2014 + 214,354 val2014 questions (visualqa.org) = 658,111, minus about
5.3k questions of the 1000 held-out images, minus the questions without an in-vocabulary answer
(the real count: len(builder.as_data_source('train'))). 650,000 // 128 = 5078 steps per epoch:
10 epochs = 50,780 steps, 1 warmup epoch = 5,078 steps.

Prepare the data once (nothing is downloaded; the official files, layout in
beit3_jax/data/builders/vqa_nlvr2.py: the question and annotation JSON files at the top of the
manual dir, next to train2014/ val2014/ test2015/) as the TFDS data set `beit3_vqav2/default`
(features image_bytes, question, multiple_choice_answer, answers, answer_ids, answer_scores;
splits train / validation = the 1000 held-out val2014 images / test = test2015). It also writes
the answer vocabulary, `answer_vocabulary.json`, which this config reads (see below):
    python -c "from beit3_jax.data.builders import vqa_nlvr2; \
        vqa_nlvr2.prepare('vqav2', manual_dir='/data/vqa', data_dir='/data/beit3')"
Convert unilm's pretrained 224 px weights (downloaded by you) and resize their vision position
table to 480 px (bicubic, as unilm's `load_model_and_may_interpolate`; init_from does not
resize by itself):
    python -m beit3_jax.convert to-flax beit3_base_patch16_224.pth ckpt/beit3_base \
        --variant base
    python -c "from beit3_jax import params_io; \
        from beit3_jax.models import resize_vision_positions as r; \
        c = params_io.load_model_config('ckpt/beit3_base'); \
        p, c = r(params_io.load_params('ckpt/beit3_base', c), c, 480); \
        params_io.save_params('ckpt/beit3_base_480', p, c)"
(for a pretraining workdir of ours instead: `params_io.load_training_params(workdir)[0]
['beit3']` and `params_io.load_model_config(workdir)`). Get unilm's `beit3.spm` too.

Command (the part after `:` is the project data dir the data was prepared in; the config reads
the answer vocabulary from it and sets data.data_dir to it; it may also be the path of an
answer_vocabulary.json. Without it the default data dir is looked in, and if no vocabulary is
there `answers` stays () -- the built-in data's 18 answers -- with a warning: do not train so):
    python -m beit3_jax.main --config=configs/finetune/vqa_base.py:/data/beit3 \
        --workdir=workdirs/vqav2_base --config.init_from=ckpt/beit3_base_480 \
        --config.data.spm_path=/path/to/beit3.spm
Validation (every epoch) covers the held-out split (about 5.3k questions; up to 50 batches).

Expect (beit3_reference.md §6, unilm README): VQAv2 test-dev 77.65 (VQA accuracy; the
evaluation server scores test-dev, this job reports the held-out validation split, which is
not comparable). This repository has not run it.

Deviations from unilm (things the project lacks): no task_head_lr_weight (unilm's head gets 20x
the lr, 6e-4; here the head trains at 3e-5 like the backbone, which may cost accuracy); no
RandAugment (2 ops, magnitude 7); the training target is the one-hot `multiple_choice_answer`
(the input transform reads one answer per question), not unilm's soft scores of the 10
annotator answers (the builder stores them as answer_ids / answer_scores, unused here), and the
validation accuracy is arg-max == that answer, not the official VQA accuracy; questions whose
answer is not in the vocabulary are skipped in validation too; the warmup starts at 0, not
at 1e-6; bfloat16 compute instead of DeepSpeed fp16. The 1000 held-out images are chosen by
hash, not unilm's random draw.
"""

import json
import logging

from etils import epath

from beit3_jax.data import paths
from beit3_jax.models import get_config as model_config
from beit3_jax.train.finetune import finetune_config

TRAIN_EXAMPLES = 650_000                # estimate, see the docstring
BATCH_SIZE = 128                        # get_started: 8 GPUs x --batch_size 16
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH_SIZE   # 5078
EPOCHS, WARMUP_EPOCHS = 10, 1           # get_started: --epochs 10 --warmup_epochs 1
VOCABULARY_FILE = 'answer_vocabulary.json'       # beit3_jax.data.builders.vqa_nlvr2


def answer_vocabulary(arg):
  """(answers, data dir or None): the beit3_vqav2 answer vocabulary from `arg` (a project data
  dir, or an answer_vocabulary.json), else from the default data dir; () if none is found
  there (an error if `arg` names a place without one)."""
  if arg and str(arg).endswith('.json'):
    files, data_dir = [epath.Path(arg)], None
  else:
    root = epath.Path(paths.tfds_dir(arg or None)) / 'beit3_vqav2' / 'default'
    files = sorted(root.glob(f'*/{VOCABULARY_FILE}')) if root.exists() else []
    data_dir = arg or None
  files = [f for f in files if f.exists()]
  if not files:
    if arg:
      raise FileNotFoundError(f'No {VOCABULARY_FILE} at {arg!r}: prepare beit3_vqav2 there '
                              '(see configs/finetune/vqa_base.py).')
    logging.warning('No beit3_vqav2 %s in the default data dir: config.answers is () (the '
                    'built-in data\'s answers); pass the data dir as --config=<file>:DIR.',
                    VOCABULARY_FILE)
    return (), None
  return tuple(json.loads(files[-1].read_text())), data_dir


def get_config(arg=None):
  config = finetune_config('vqa')
  # beit3_base_patch16_480_vqav2: no final norm; --input_size 480, --drop_path 0.1.
  config.model = model_config('base', img_size=480, drop_path_rate=0.1,
                              normalize_output=False, vocab_size=64010, dtype='bfloat16')
  config.init_from = ''                 # pass --config.init_from (see the docstring)
  answers, data_dir = answer_vocabulary(arg)
  config.answers = answers              # 3129 answers (min count 9, as unilm)
  if data_dir:
    config.data.data_dir = str(data_dir)

  d = config.data
  d.source = 'beit3_vqav2/default'      # beit3_jax/data/builders/vqa_nlvr2.py
  d.fields.update({'image': 'image_bytes', 'question': 'question',
                   'answer': 'multiple_choice_answer'})
  d.train_split = 'train'               # train2014 + val2014 minus the held-out images
  d.eval_split = 'validation'           # the 1000 held-out val2014 images (unilm rest_val)
  d.spm_path = ''                       # pass --config.data.spm_path=<unilm's beit3.spm>
  d.text_len = 64                       # run_beit3_finetuning.py --num_max_bpe_tokens
  d.crop_scale = (0.5, 1.0)             # datasets.py build_transform: RandomResizedCrop
  d.flip_prob = 0.5
  d.image_mean = (0.5, 0.5, 0.5)        # datasets.py: IMAGENET_INCEPTION_MEAN / STD
  d.image_std = (0.5, 0.5, 0.5)
  d.read_threads = 16

  config.batch_size = BATCH_SIZE
  o = config.optimizer
  o.lr = 3e-5                           # get_started: --lr 3e-5
  o.min_lr = 1e-6                       # run_beit3_finetuning.py --min_lr default
  o.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH   # 5,078
  o.weight_decay = 0.01                 # get_started: --weight_decay 0.01
  o.layer_decay = 1.0                   # get_started: --layer_decay 1.0
  o.b1, o.b2 = 0.9, 0.98                # get_started: --opt_betas 0.9 0.98
  o.eps = 1e-8                          # --opt_eps default
  o.clip_norm = 0.0                     # --clip_grad None

  config.total_steps = EPOCHS * STEPS_PER_EPOCH      # 50,780
  config.eval_every = STEPS_PER_EPOCH
  config.eval_batches = 50              # the whole held-out split (the iterator ends first)
  config.checkpoint_every = STEPS_PER_EPOCH
  config.log_every = 100
  return config

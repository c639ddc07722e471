"""The fine-tuning config files (configs/finetune/*.py) load and fit the finetune job.

Each file is loaded from its path (importlib, as ml_collections' config_flags does) and its
`get_config()` is checked against `finetune_config(task)`: the same fields with the same types,
a sane schedule, a valid model, data fields that the named TFDS builder has, and a docstring
that gives the command with the file's own path. Nothing is trained or built.
"""

import importlib.util
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from beit3_jax import tasks
from beit3_jax.defaults import finetune_config
from beit3_jax.tasks.base import field_map
from beit3_jax.trainer.optimizer import make_optimizer

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'finetune'
CONFIG_FILES = sorted(CONFIG_DIR.glob('*.py'))
RECIPES = [f'{task}_{size}' for task in ('classification', 'vqa', 'nlvr2', 'retrieval',
                                         'captioning') for size in ('base', 'large')]


def _module(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f'_finetune_config_{path.stem}', str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load(path: pathlib.Path, *arg):
  return _module(path).get_config(*arg)


def _same_fields(config, reference, where=''):
  """Every field of `config` exists in `reference` with the same type (recursively)."""
  for key, value in config.items():
    name = f'{where}{key}'
    assert key in reference, f'{name} is not a field of finetune_config'
    ref = reference[key]
    if name == 'data.fields':
      assert isinstance(value, ml_collections.ConfigDict), name
      continue                      # free-form: checked by test_data_fields
    if isinstance(ref, ml_collections.ConfigDict):
      assert isinstance(value, ml_collections.ConfigDict), name
      assert set(value.keys()) == set(ref.keys()), name
      _same_fields(value, ref, f'{name}.')
    else:
      assert type(value) is type(ref), f'{name}: {type(value)} vs {type(ref)}'


def _builder_features(source: str) -> set[str] | None:
  """Feature names of the project's TFDS builder `source` (None for other sources)."""
  import tempfile
  from beit3_jax.data.builders import imagenet, karpathy_captions, vqa_nlvr2
  classes = {c.name: c for c in (imagenet.Beit3Imagenet2012, karpathy_captions.Beit3CocoKarpathy,
                                 karpathy_captions.Beit3Flickr30kKarpathy, vqa_nlvr2.Beit3Vqav2,
                                 vqa_nlvr2.Beit3Nlvr2)}
  cls = classes.get(source.split('/')[0].split(':')[0])
  if cls is None:
    return None
  with tempfile.TemporaryDirectory() as tmp:
    return set(cls(data_dir=tmp).info.features.keys())


def test_every_recipe_has_a_file():
  names = {p.stem for p in CONFIG_FILES}
  assert set(RECIPES) <= names, sorted(set(RECIPES) - names)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_config_fits_the_finetune_job(path):
  config = _load(path)
  assert config.job == 'finetune'
  assert config.task in tasks.names()
  _same_fields(config, finetune_config(config.task))
  assert config.total_steps > config.optimizer.warmup_steps > 0
  assert config.eval_every > 0 and config.checkpoint_every > 0 and config.eval_batches == 0
  m = config.model
  assert m.img_size % m.patch_size == 0
  assert m.embed_dim % m.num_heads == 0
  assert config.data.text_len <= m.max_text_positions - 2
  # The objective and the optimizer build from the config (no parameters are made).
  tasks.get(config.task).objective(config)
  make_optimizer(config.optimizer, config.total_steps, m.depth)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_docstring_gives_the_command(path):
  doc = _module(path).__doc__ or ''
  assert f'--config=configs/finetune/{path.name}' in doc


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_data_fields(path):
  config = _load(path)
  given = dict(config.data.fields)
  defaults = tasks.get(config.task).default_fields
  assert set(given) <= set(defaults), sorted(set(given) - set(defaults))
  features = _builder_features(config.data.source)
  if features is None:
    return
  for role, name in field_map(tasks.get(config.task), config).items():
    assert name.split('/')[0] in features, (role, name, sorted(features))


@pytest.mark.parametrize('name', RECIPES)
def test_recipe_sizes(name):
  config = _load(CONFIG_DIR / f'{name}.py')
  size = name.rsplit('_', 1)[1]
  assert config.model.variant == size
  assert config.model.vocab_size == 64010
  assert config.data.spm_path == ''   # users pass beit3.spm
  # unilm's classification and VQA models drop the backbone's final norm.
  assert config.model.normalize_output == (config.task not in ('classification', 'vqa'))


UNILM = json.loads((pathlib.Path(__file__).resolve().parent / 'fixtures' /
                    'unilm_finetuning_commands.json').read_text())


@pytest.mark.parametrize('name', RECIPES)
def test_optimizer_schedule_and_model_follow_unilm_s_command(name):
  """Each recipe against its unilm get_started training command; the fixture holds the flags
  parsed from a unilm snapshot (commit and files in it) and the script's argparse defaults for
  the flags a command leaves out."""
  from beit3_jax.tasks import recipes
  config = _load(CONFIG_DIR / f'{name}.py')
  command = UNILM['recipes'][name]
  flag = lambda n: command.get(n, UNILM['script_defaults'][n])  # noqa: E731
  o = config.optimizer
  assert config.batch_size == command['gpus'] * command['batch_size'] * flag('update_freq')
  assert o.lr == command['lr'] and o.min_lr == flag('min_lr') and o.eps == flag('opt_eps')
  assert o.layer_decay == flag('layer_decay') and o.weight_decay == flag('weight_decay')
  assert [o.b1, o.b2] == flag('opt_betas')
  assert (o.clip_norm or None) == flag('clip_grad')
  # run_beit3_finetuning.py: `if args.layer_decay < 1.0: ... elif args.task_head_lr_weight > 1`
  head = flag('task_head_lr_weight')
  assert o.task_head_lr_weight == (head if flag('layer_decay') >= 1.0 and head > 1 else 1.0)
  assert config.model.drop_path_rate == flag('drop_path')
  assert config.model.img_size == flag('input_size')
  assert config.model.remat == bool(command.get('checkpoint_activations'))
  epoch = recipes.steps_per_epoch(config.data.source, config.batch_size)
  assert config.total_steps == command['epochs'] * epoch
  assert o.warmup_steps == command['warmup_epochs'] * epoch
  if config.task != 'classification':
    assert config.data.text_len == flag('num_max_bpe_tokens')
  if config.task == 'captioning':
    assert config.captioning.mask_prob == flag('captioning_mask_prob')
    assert config.captioning.drop_worst_after == flag('drop_worst_after')
    assert config.captioning.drop_worst_ratio == flag('drop_worst_ratio')
    assert config.label_smoothing == flag('label_smoothing')
  assert f'patch16_{config.model.img_size}' in command['model']
  assert command['model'].split('_')[1] == config.model.variant


def test_classification_recipes_evaluate_on_unilm_s_imagenet_view(tmp_path):
  """unilm `build_imagenet_transform(is_train=False)`: Resize(int(224 / crop_pct)), crop_pct
  1.0 (the shorter side to 224, the longer to int(224 * long / short), PIL bicubic), then
  CenterCrop(224) at round((H' - 224) / 2), round((W' - 224) / 2); predict does the same."""
  from PIL import Image
  from beit3_jax import predict
  from beit3_jax.data import finetuning as ft
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)    # H 375, W 500
  reference = np.array(Image.fromarray(photo).resize((298, 224), Image.BICUBIC))[:, 37:261]
  for size in ('base', 'large'):
    config = _load(CONFIG_DIR / f'classification_{size}.py')
    got = ft.view(ft.FinetuneInputs.from_config(config, train=False), photo, rng)
    np.testing.assert_array_equal(got, reference)
  Image.fromarray(photo).save(tmp_path / 'photo.png')
  loaded = predict.load_images([str(tmp_path / 'photo.png')], 224, (0, 0, 0), (1, 1, 1), 1.0)
  np.testing.assert_allclose(loaded[0], reference / 255.0, atol=1e-6)


def test_retrieval_datasets():
  for size in ('base', 'large'):
    path = CONFIG_DIR / f'retrieval_{size}.py'
    coco, flickr = _load(path), _load(path, 'flickr30k')
    assert coco.data.source == 'beit3_coco_karpathy'
    assert flickr.data.source == 'beit3_flickr30k_karpathy'
    assert flickr.total_steps < coco.total_steps
    with pytest.raises(ValueError, match='flickr30k'):
      _load(path, 'nocaps')


def test_vqa_answer_vocabulary(tmp_path):
  vocab_dir = tmp_path / 'tfds' / 'beit3_vqav2' / 'default' / '1.0.0'
  vocab_dir.mkdir(parents=True)
  (vocab_dir / 'answer_vocabulary.json').write_text(json.dumps(['yes', 'no', '2']))
  for size in ('base', 'large'):
    path = CONFIG_DIR / f'vqa_{size}.py'
    config = _load(path, str(tmp_path))                  # a project data dir
    assert config.answers == ('yes', 'no', '2')
    assert config.data.data_dir == str(tmp_path)
    config = _load(path, str(vocab_dir / 'answer_vocabulary.json'))
    assert config.answers == ('yes', 'no', '2')
    with pytest.raises(FileNotFoundError):
      _load(path, str(tmp_path / 'missing'))

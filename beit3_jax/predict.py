"""Predictions with a BEiT-3 model: `python -m beit3_jax.predict COMMAND MODEL ...`.

MODEL is one of
  * a training workdir of ours (its newest checkpoint), its `checkpoints/` dir or one step dir
    `<workdir>/checkpoints/<N>`: a fine-tuning run (`job` 'finetune': the model of its `task`)
    or a pretraining run (`job` 'pretrain': its backbone only); the run's `config.json` gives
    the model config, image mean/std, text length, class names, VQA answers and captioning
    decoding settings;
  * a params directory written by `python -m beit3_jax.convert to-flax`: a backbone
    (e.g. unilm's pretrained `beit3_base_patch16_224.pth`) or, with `--task`, a fine-tuned
    unilm model with its head.

Commands (and the models they take):

  embed     image and/or text embeddings, (N, D) float32, unit norm. A retrieval model gives its
            `image_features` / `text_features` (the retrieval heads); a backbone gives
            encoder_out[:, 0] of the image-only / text-only pass, l2-normalised. The output
            says which (`features_from`: 'retrieval_heads' or 'backbone_cls').
  retrieve  a folder of images and a text file (one text per line): for each text its top-k
            images and for each image its top-k texts, scored by cosine similarity (retrieval).
  caption   a caption per image (captioning): greedy (beam size 1) or beam search.
  answer    an answer per (image, question) pair (vqa), with sigmoid scores of the top-k.
  classify  the top-k classes per image (classification), with softmax probabilities.

Images are resized to the model's square input (bicubic, no crop, as unilm's evaluation) and
normalised with the run's `data.image_mean/std` (a params directory: 0.5/0.5, except ImageNet's
for a classification model, unilm's in1k recipe; `--image-mean/--image-std` override). Texts are
tokenized with the SentencePiece model given by `--spm` (default: the run's `data.spm_path`,
or the demo's .spm for a run on the built-in data).

Every command prints its results; `--output FILE` also writes them as .npz or .json.

    python -m beit3_jax.predict embed out/base --image cat.jpg --text "a cat" --spm beit3.spm
    python -m beit3_jax.predict retrieve out/coco_retrieval --images photos/ --texts queries.txt \\
        --spm beit3.spm --top-k 5
    python -m beit3_jax.predict caption out/coco_captioning photo.jpg --spm beit3.spm
    python -m beit3_jax.predict answer out/vqa --image photo.jpg --question "what colour is it?" \\
        --spm beit3.spm --answers answer2label.txt
    python -m beit3_jax.predict classify out/in1k photo.jpg --class-names imagenet_classes.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# unilm's default text length (--num_max_bpe_tokens), capped by the model's position table.
DEFAULT_TEXT_LEN = 64
# The commands and the task each needs (None = a backbone without a head).
COMMAND_TASKS = {
    'embed': ('retrieval', None),
    'retrieve': ('retrieval',),
    'caption': ('captioning',),
    'answer': ('vqa',),
    'classify': ('classification',),
}
FEATURES_FROM = {'retrieval': 'retrieval_heads', None: 'backbone_cls'}


class PredictError(ValueError):
  """Input the predictor cannot use; the message says what to change."""


# ------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass
class LoadedModel:
  """A model ready for prediction. Its params are read on first use (`params`), so that bad
  input is reported before a large checkpoint is read.

  Attributes:
    task: a name of `beit3_jax.models.heads.TASKS`, or None (a backbone without a head).
    config: the backbone's model config.
    head_sizes: {'num_classes': C} / {'num_answers': A} / {}.
    run_config: the training run's config.json (a dict), None for a params directory.
    source: where the params come from (for messages).
    loader: () -> the params tree {'beit3': backbone, <head params>} (arrays).
    params: that tree as float32 arrays on the default device (loaded once, checked against
      the task model's shapes).
  """
  task: str | None
  config: Any
  head_sizes: dict
  run_config: dict | None
  source: str
  loader: Callable[[], Any] = dataclasses.field(repr=False)
  _params: Any = dataclasses.field(default=None, repr=False)

  @property
  def params(self):
    if self._params is None:
      import jax

      from beit3_jax import params_io
      tree = self.loader()
      if self.task is None:
        from beit3_jax.models import abstract_params
        abstract = {'beit3': abstract_params(self.config, boxed=False)}
      else:
        abstract = params_io.abstract_task_params(self.task, self.config, self.head_sizes)
      _check_fits(tree, abstract, self.source)
      self._params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), tree))
    return self._params

  def describe(self) -> str:
    c = self.config
    what = self.task or 'backbone (no head)'
    sizes = ''.join(f', {k}={v}' for k, v in self.head_sizes.items())
    return (f'{what}{sizes}: {c.variant} D={c.embed_dim} depth={c.depth} '
            f'{c.img_size}px/{c.patch_size}, from {self.source}')


def _run_head_sizes(task: str, run_config: dict) -> dict:
  """Head sizes of a fine-tuning run: its num_classes, or the size of its answer vocabulary."""
  if task == 'classification':
    return {'num_classes': int(run_config['num_classes'])}
  if task == 'vqa':
    from beit3_jax.train.finetune import answer_vocabulary
    return {'num_answers': len(answer_vocabulary(run_config))}
  return {}


def _check_fits(params, abstract, source: str) -> None:
  from beit3_jax.convert import flatten_params
  have, want = flatten_params(params), flatten_params(abstract)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = [f'{k} {tuple(np.shape(have[k]))} (expected {tuple(want[k].shape)})'
               for k in sorted(set(want) & set(have))
               if tuple(np.shape(have[k])) != tuple(want[k].shape)]
  if missing or unexpected or misshaped:
    raise PredictError(f'The params of {source} do not fit its config: missing '
                       f'{missing[:6]}, unexpected {unexpected[:6]}, wrong shape {misshaped[:6]}.')


def load_model(path: str) -> LoadedModel:
  """Opens a training workdir / step dir or a params directory (see the module docstring):
  reads its config now, its params on first use of `.params`.

  Raises:
    PredictError: nothing usable there (the message says what was found and what is expected).
  """
  from etils import epath

  from beit3_jax import params_io
  path_s = os.fspath(path)
  root = epath.Path(path_s)
  if not root.exists():
    raise PredictError(f'{path_s} does not exist (expected a training workdir, a step dir, or a '
                       'params directory from python -m beit3_jax.convert to-flax).')
  step_dir = params_io.find_step_dir(root)
  if step_dir is not None:
    run_dir = params_io.training_run_dir(step_dir)
    config_file = run_dir / params_io.CONFIG_FILE
    if not config_file.exists():
      raise PredictError(f'{step_dir} is a training checkpoint, but its workdir {run_dir} has no '
                         f'{params_io.CONFIG_FILE} (the run config).')
    run_config = json.loads(config_file.read_text())
    job = run_config.get('job')
    config = params_io.load_model_config(str(run_dir))
    source = f'training checkpoint {step_dir}'
    if job == 'pretrain':
      task, head_sizes = None, {}

      def loader():
        tree = params_io.load_training_params(step_dir)[0]
        if 'beit3' not in tree:
          raise PredictError(f'{source}: its params have {sorted(tree)}, no `beit3` backbone.')
        return {'beit3': tree['beit3']}
    elif job == 'finetune':
      from beit3_jax.models.heads import TASKS
      task = run_config.get('task')
      if task not in TASKS:
        raise PredictError(f'{run_dir}/config.json: task={task!r}; known: {TASKS}.')
      head_sizes = _run_head_sizes(task, run_config)
      loader = lambda: params_io.load_training_params(step_dir)[0]  # noqa: E731
    else:
      raise PredictError(f'{run_dir} is a {job!r} run; predict takes BEiT-3 fine-tuning or '
                         'pretraining runs.')
    return LoadedModel(task, config, head_sizes, run_config, source, loader)
  config_file = root / params_io.CONFIG_FILE
  if not config_file.exists():
    raise PredictError(f'{path_s}: neither a training checkpoint (checkpoints/<step>/state) '
                       'nor a params directory (config.json + params/, written by python -m '
                       'beit3_jax.convert to-flax).')
  if 'job' in json.loads(config_file.read_text()):
    raise PredictError(f'{path_s} is a training workdir without a checkpoint yet '
                       '(checkpoints/<step>/state).')
  if params_io.read_kind(root) != 'beit3':
    raise PredictError(f'{path_s} holds a {params_io.read_kind(root)} model (a visual '
                       'tokenizer), not BEiT-3.')
  if not (root / params_io.PARAMS_DIR).exists():
    raise PredictError(f'{path_s} has a {params_io.CONFIG_FILE} but no {params_io.PARAMS_DIR}/: '
                       'not a params directory.')
  task, head_sizes = params_io.read_task(root)
  config = params_io.load_model_config(path_s)

  def load_dir():
    tree = params_io.load_params(path_s, config)
    return tree if task is not None else {'beit3': tree}
  return LoadedModel(task, config, head_sizes, None,
                     f'params directory {root.absolute()}', load_dir)


def require_task(model: LoadedModel, command: str) -> None:
  """Raises PredictError if `command` does not take `model`'s task."""
  wanted = COMMAND_TASKS[command]
  if model.task in wanted:
    return
  fits = [c for c, tasks in COMMAND_TASKS.items() if model.task in tasks]
  names = ' or '.join('a backbone' if t is None else f'a {t} model' for t in wanted)
  have = 'a backbone without a head' if model.task is None else f'a {model.task} model'
  hint = (f'; for this model use: {", ".join(fits)}' if fits else
          '; no predict command takes it yet')
  raise PredictError(f'{command} needs {names}; {model.source} holds {have}{hint}.')


# ------------------------------------------------------------------------------------------
# Inputs.


def list_images(folder: str) -> list[str]:
  """The image files (by suffix, IMAGE_SUFFIXES) directly in `folder`, sorted by name."""
  if not os.path.isdir(folder):
    raise PredictError(f'{folder} is not a folder.')
  found = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                 if n.lower().endswith(IMAGE_SUFFIXES)
                 and os.path.isfile(os.path.join(folder, n)))
  if not found:
    raise PredictError(f'The folder {folder} has no images (files ending in '
                       f'{", ".join(IMAGE_SUFFIXES)}).')
  return found


def image_paths(items: Sequence[str]) -> list[str]:
  """Image files of `items`: files as given, folders expanded with `list_images`."""
  out = []
  for item in items:
    if os.path.isdir(item):
      out.extend(list_images(item))
    elif os.path.isfile(item):
      out.append(item)
    else:
      raise PredictError(f'No image file or folder at {item}.')
  if not out:
    raise PredictError('No images given.')
  return out


def load_images(paths: Sequence[str], img_size: int, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
  """The model inputs of image files: float32 (N, img_size, img_size, 3).

  Each image is decoded to RGB, resized to (img_size, img_size) with `image_ops.eval_resize`
  (bicubic, no crop) and normalised with `image_ops.normalize(x, mean, std)` (mean/std in
  [0, 1] units).
  """
  from beit3_jax.data import image_ops
  out = np.empty((len(paths), img_size, img_size, 3), np.float32)
  for i, p in enumerate(paths):
    with open(p, 'rb') as f:
      data = f.read()
    try:
      image = image_ops.decode_pil(data)
    except image_ops.CorruptImageError as e:
      raise PredictError(f'{p}: {e}') from None
    out[i] = image_ops.normalize(image_ops.eval_resize(image, img_size, 'bicubic'), mean, std)
  return out


def read_lines(path: str, what: str) -> list[str]:
  """The non-empty lines (stripped) of a UTF-8 text file."""
  if not os.path.isfile(path):
    raise PredictError(f'No {what} file at {path}.')
  with open(path, encoding='utf-8') as f:
    lines = [line.strip() for line in f]
  lines = [line for line in lines if line]
  if not lines:
    raise PredictError(f'The {what} file {path} has no non-empty line.')
  return lines


def read_answers(path: str) -> list[str]:
  """A VQA answer vocabulary: one answer per line, or unilm's answer2label.txt (one JSON
  object {"answer": str, "label": int} per line)."""
  lines = read_lines(path, 'answers')
  if not lines[0].startswith('{'):
    return lines
  by_label = {}
  for n, line in enumerate(lines, 1):
    try:
      item = json.loads(line)
      by_label[int(item['label'])] = str(item['answer'])
    except (ValueError, KeyError, TypeError) as e:
      raise PredictError(f'{path}:{n}: expected {{"answer": ..., "label": ...}}: {e}') from None
  if sorted(by_label) != list(range(len(by_label))):
    raise PredictError(f'{path}: the labels are not 0..{len(by_label) - 1}.')
  return [by_label[i] for i in range(len(by_label))]


def image_normalization(model: LoadedModel, mean=None, std=None
                        ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
  """(mean, std, where they come from) for `model`'s images; `mean`/`std` override."""
  from beit3_jax.data import image_ops
  data = (model.run_config or {}).get('data') or {}
  if 'image_mean' in data and 'image_std' in data:
    d_mean, d_std, why = data['image_mean'], data['image_std'], 'the run config'
  elif model.run_config is None and model.task == 'classification':
    d_mean, d_std = image_ops.IMAGENET_MEAN, image_ops.IMAGENET_STD
    why = 'ImageNet, unilm\'s classification recipe'
  else:
    d_mean, d_std, why = image_ops.BEIT3_MEAN, image_ops.BEIT3_STD, 'BEiT-3 default'
  if mean is not None or std is not None:
    why = f'{why}, overridden by flags'
  mean = tuple(float(v) for v in (mean if mean is not None else d_mean))
  std = tuple(float(v) for v in (std if std is not None else d_std))
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise PredictError(f'image mean/std need 3 values each (std > 0), got {mean} / {std}.')
  return mean, std, why


def run_spm_path(model: LoadedModel) -> str:
  """The .spm a training run used: its data.spm_path, or for built-in data the demo's .spm in
  the data dir when it is there; '' if neither."""
  data = (model.run_config or {}).get('data') or {}
  if data.get('spm_path'):
    return str(data['spm_path'])
  if str(data.get('source', '')).startswith('builtin'):
    from beit3_jax.data import builtin, paths
    path = os.path.join(paths.spm_dir(data.get('data_dir') or None), builtin.SPM_NAME)
    if os.path.exists(path):
      return path
  return ''


def load_tokenizer(model: LoadedModel, spm: str | None):
  """The TextTokenizer of `spm` (default: the run config's data.spm_path), checked against the
  model's text embedding."""
  from beit3_jax.data.text import TextTokenizer
  if not spm:
    spm = run_spm_path(model)
    if not spm:
      raise PredictError('This command reads text: give the SentencePiece model with --spm '
                         '(beit3.spm for unilm\'s released checkpoints; for a run of ours the '
                         'one its data used).')
    print(f'SentencePiece model: {spm} (of the run\'s data)')
  try:
    tokenizer = TextTokenizer.from_file(spm)
  except FileNotFoundError:
    raise PredictError(f'--spm {spm}: no such file (the SentencePiece model, e.g. '
                       'beit3.spm).') from None
  except ValueError as e:
    raise PredictError(f'--spm {spm}: {e}') from None
  if tokenizer.vocab_size > model.config.vocab_size:
    raise PredictError(f'--spm {spm} has {tokenizer.vocab_size} ids but the model\'s text '
                       f'embedding has {model.config.vocab_size} rows: not this model\'s .spm.')
  return tokenizer


def text_length(model: LoadedModel, text_len: int | None) -> int:
  """Tokens per text (bos and eos included): the flag, else the run's data.text_len, else 64;
  at most what the model's position table holds."""
  from beit3_jax.models.embeddings import POSITION_OFFSET
  longest = model.config.max_text_positions - POSITION_OFFSET
  if text_len is None:
    run_len = ((model.run_config or {}).get('data') or {}).get('text_len')
    text_len = min(int(run_len or DEFAULT_TEXT_LEN), longest)
  if not 2 <= text_len <= longest:
    raise PredictError(f'--text-len {text_len}: must lie in [2, {longest}] for this model.')
  return int(text_len)


def encode_texts(tokenizer, texts: Sequence[str], text_len: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(ids (T, text_len) int32, padding mask (T, text_len) bool, True = padding) of `texts`,
  each `TextTokenizer.encode_sequence(text, text_len)`."""
  pairs = [tokenizer.encode_sequence(t, text_len) for t in texts]
  return (np.stack([p[0] for p in pairs]).astype(np.int32),
          np.stack([p[1] for p in pairs]).astype(bool))


# ------------------------------------------------------------------------------------------
# Computation.


def _config_key(model: LoadedModel) -> tuple:
  return (model.task, json.dumps(model.config.to_dict(), sort_keys=True),
          tuple(sorted(model.head_sizes.items())))


def _l2(x):
  import jax.numpy as jnp
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=16)
def _function(name: str, key: tuple) -> Callable:
  """A jitted (params, *inputs) -> float32 array of the model of `key` (see `_config_key`)."""
  import jax

  from beit3_jax.models import BEiT3, heads
  from beit3_jax.models.config import config_from_dict
  task, config_json, sizes = key
  cfg = config_from_dict(json.loads(config_json))
  if name == 'backbone_image':
    net = BEiT3(cfg)
    fn = lambda p, x: _l2(net.apply({'params': p['beit3']}, images=x)['encoder_out'][:, 0])
  elif name == 'backbone_text':
    net = BEiT3(cfg)
    fn = lambda p, ids, pad: _l2(net.apply({'params': p['beit3']}, text_ids=ids,
                                           text_padding_mask=pad)['encoder_out'][:, 0])
  elif name == 'retrieval_image':
    net = heads.RetrievalModel(cfg)
    fn = lambda p, x: net.apply({'params': p}, images=x)['image_features']
  elif name == 'retrieval_text':
    net = heads.RetrievalModel(cfg)
    fn = lambda p, ids, pad: net.apply({'params': p}, text_ids=ids,
                                       text_padding_mask=pad)['text_features']
  elif name == 'logits':
    net = heads.task_model(task, cfg, **dict(sizes))
    fn = lambda p, *inputs: net.apply({'params': p}, *inputs)
  else:
    raise AssertionError(name)
  return jax.jit(fn)


def run_batched(fn: Callable, params, arrays: Sequence[np.ndarray], batch_size: int
                ) -> np.ndarray:
  """fn(params, *chunk) over chunks of min(batch_size, N) rows of `arrays` (the last chunk
  padded by repeating its last row, so one compiled shape serves all), concatenated."""
  n = arrays[0].shape[0]
  size = max(1, min(int(batch_size), n))
  outs = []
  for start in range(0, n, size):
    chunk = [a[start:start + size] for a in arrays]
    m = chunk[0].shape[0]
    if m < size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], size - m, axis=0)]) for c in chunk]
    outs.append(np.asarray(fn(params, *chunk))[:m])
  return np.concatenate(outs)


def embed_images(model: LoadedModel, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
  """Unit-norm image embeddings (N, D) float32 of normalised images (N, S, S, 3): the
  retrieval heads' `image_features`, or a backbone's l2-normalised encoder_out[:, 0]."""
  name = 'retrieval_image' if model.task == 'retrieval' else 'backbone_image'
  return run_batched(_function(name, _config_key(model)), model.params, [images], batch_size)


def embed_texts(model: LoadedModel, ids: np.ndarray, padding_mask: np.ndarray,
                batch_size: int = 8) -> np.ndarray:
  """Unit-norm text embeddings (T, D) float32 of ids (T, L) int32 / padding mask (T, L) bool:
  the retrieval heads' `text_features`, or a backbone's l2-normalised encoder_out[:, 0]."""
  name = 'retrieval_text' if model.task == 'retrieval' else 'backbone_text'
  return run_batched(_function(name, _config_key(model)), model.params, [ids, padding_mask],
                     batch_size)


def logits(model: LoadedModel, inputs: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
  """The task model's logits, float32: classification (images,) -> (N, C); vqa (images,
  ids, padding mask) -> (N, A)."""
  return run_batched(_function('logits', _config_key(model)), model.params, list(inputs),
                     batch_size)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices (N, k) int64, scores (N, k)) of the k largest per row, best first (ties: lower
  index first)."""
  k = min(int(k), scores.shape[-1])
  order = np.argsort(-scores, axis=-1, kind='stable')[:, :k]
  return order, np.take_along_axis(scores, order, axis=-1)


def caption_settings(model: LoadedModel, beam_size=None, length_penalty=None, max_len=None
                     ) -> tuple[int, float, int]:
  """(beam size, length penalty, max tokens): flags, else the run's `captioning` fields, else
  the fine-tuning defaults (`finetune_config('captioning').captioning`)."""
  run = dict((model.run_config or {}).get('captioning') or {})
  if any(k not in run for k in ('beam_size', 'length_penalty', 'max_len')):
    from beit3_jax.train.finetune import finetune_config
    run = {**finetune_config('captioning').captioning.to_dict(), **run}
  beam = int(beam_size if beam_size is not None else run['beam_size'])
  penalty = float(length_penalty if length_penalty is not None else run['length_penalty'])
  longest = int(max_len if max_len is not None else run['max_len'])
  if beam < 1 or longest < 1:
    raise PredictError(f'--beam-size {beam} / --max-len {longest}: both must be >= 1.')
  return beam, penalty, longest


def decode_tokens(tokenizer, tokens: np.ndarray) -> str:
  """The text of generated ids (1-D): up to the first eos, without special ids and without ids
  past the tokenizer's vocabulary (rows of the embedding no text maps to)."""
  tokens = np.asarray(tokens)
  eos = np.flatnonzero(tokens == tokenizer.eos_id)
  if eos.size:
    tokens = tokens[:eos[0]]
  return tokenizer.decode(tokens[(tokens >= 0) & (tokens < tokenizer.vocab_size)])


def generate(model: LoadedModel, images: np.ndarray, tokenizer, beam_size: int,
             length_penalty: float, max_len: int, batch_size: int = 8) -> np.ndarray:
  """Caption tokens (N, max_len) int32 of images (N, S, S, 3) with
  `tasks.captioning.generate_captions`, in chunks of `batch_size`."""
  from beit3_jax.tasks.captioning import generate_captions
  from beit3_jax.models.embeddings import POSITION_OFFSET
  longest = model.config.max_text_positions - POSITION_OFFSET - 1
  if max_len > longest:
    raise PredictError(f'--max-len {max_len}: this model\'s text positions allow at most '
                       f'{longest} tokens.')
  if model.config.num_vl_layers:
    raise PredictError('Captioning with a key/value cache needs num_vl_layers == 0.')
  out = []
  for start in range(0, images.shape[0], max(1, batch_size)):
    out.append(np.asarray(generate_captions(
        model.params, model.config, images[start:start + batch_size], tokenizer.bos_id,
        tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id, max_len, beam_size,
        length_penalty)))
  return np.concatenate(out)


# ------------------------------------------------------------------------------------------
# Output.


def write_output(path: str, result: dict) -> None:
  """Writes `result` (arrays, lists, str, numbers) as .npz (np.savez) or .json."""
  os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
  if path.endswith('.npz'):
    np.savez(path, **{k: np.asarray(v) for k, v in result.items()})
  elif path.endswith('.json'):
    plain = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(plain, f, indent=1, ensure_ascii=False)
  else:
    raise PredictError(f'--output {path}: expected a .npz or .json file name.')
  print(f'Wrote {path}')


def _short(text: str, width: int = 60) -> str:
  return text if len(text) <= width else text[:width - 3] + '...'


def _vector(x: np.ndarray, n: int = 4) -> str:
  head = ', '.join(f'{v:+.4f}' for v in x[:n])
  return f'[{head}, ...]' if x.shape[0] > n else f'[{head}]'


# ------------------------------------------------------------------------------------------
# Commands: each takes parsed args and the loaded model, prints, and returns its result dict.


def _images_for(args, model: LoadedModel, paths: Sequence[str]) -> np.ndarray:
  mean, std, why = image_normalization(model, args.image_mean, args.image_std)
  print(f'Images: {len(paths)}, resized to {model.config.img_size}px (bicubic), mean {mean}, '
        f'std {std} ({why}).')
  return load_images(paths, model.config.img_size, mean, std)


def _texts_for(args, model: LoadedModel, texts: Sequence[str]):
  tokenizer = load_tokenizer(model, args.spm)
  text_len = text_length(model, args.text_len)
  ids, pad = encode_texts(tokenizer, texts, text_len)
  print(f'Texts: {len(texts)}, {text_len} tokens each (padded/cut).')
  return tokenizer, ids, pad


def cmd_embed(args, model: LoadedModel) -> dict:
  texts = list(args.text or []) + (read_lines(args.texts, 'texts') if args.texts else [])
  if not args.image and not texts:
    raise PredictError('embed needs --image (files or folders) and/or --text / --texts.')
  source = FEATURES_FROM[model.task]
  print('Features: ' + ('the retrieval heads\' l2-normalised image_features / text_features.'
                        if source == 'retrieval_heads' else
                        'l2-normalised encoder_out[:, 0] of the image-only / text-only pass of '
                        'the backbone.'))
  result: dict = {'features_from': source}
  paths = image_paths(args.image) if args.image else []
  if texts:
    _, ids, pad = _texts_for(args, model, texts)
  if paths:
    feats = embed_images(model, _images_for(args, model, paths), args.batch_size)
    result.update(image_features=feats, image_files=paths)
    print(f'image_features {feats.shape} {feats.dtype}:')
    for p, f in zip(paths, feats):
      print(f'  {p}: {_vector(f)}')
  if texts:
    feats = embed_texts(model, ids, pad, args.batch_size)
    result.update(text_features=feats, texts=texts)
    print(f'text_features {feats.shape} {feats.dtype}:')
    for t, f in zip(texts, feats):
      print(f'  {_short(t)!r}: {_vector(f)}')
  if paths and texts:
    sim = result['image_features'] @ result['text_features'].T
    result['similarity'] = sim
    print('cosine similarity (rows: images, columns: texts):')
    for p, row in zip(result['image_files'], sim):
      print(f'  {os.path.basename(p)}: ' + ' '.join(f'{v:+.4f}' for v in row))
  return result


def cmd_retrieve(args, model: LoadedModel) -> dict:
  paths = list_images(args.images)
  texts = read_lines(args.texts, 'texts')
  _, ids, pad = _texts_for(args, model, texts)
  image_features = embed_images(model, _images_for(args, model, paths), args.batch_size)
  text_features = embed_texts(model, ids, pad, args.batch_size)
  sim = image_features @ text_features.T                      # (I, T) cosine similarity
  t2i, t2i_scores = top_k(sim.T, args.top_k)
  i2t, i2t_scores = top_k(sim, args.top_k)
  print(f'text -> images (top {t2i.shape[1]}, cosine similarity):')
  for t, idx, sc in zip(texts, t2i, t2i_scores):
    print(f'  {_short(t)!r}')
    for rank, (j, s) in enumerate(zip(idx, sc), 1):
      print(f'    {rank}. {os.path.basename(paths[j])}  {s:+.4f}')
  print(f'image -> texts (top {i2t.shape[1]}, cosine similarity):')
  for p, idx, sc in zip(paths, i2t, i2t_scores):
    print(f'  {os.path.basename(p)}')
    for rank, (j, s) in enumerate(zip(idx, sc), 1):
      print(f'    {rank}. {_short(texts[j])!r}  {s:+.4f}')
  return {'image_files': paths, 'texts': texts, 'similarity': sim,
          'text_to_image': t2i, 'text_to_image_scores': t2i_scores,
          'image_to_text': i2t, 'image_to_text_scores': i2t_scores,
          'image_features': image_features, 'text_features': text_features}


def cmd_caption(args, model: LoadedModel) -> dict:
  tokenizer = load_tokenizer(model, args.spm)
  paths = image_paths(args.images)
  beam, penalty, max_len = caption_settings(model, args.beam_size, args.length_penalty,
                                            args.max_len)
  images = _images_for(args, model, paths)
  print(f'Decoding: {"greedy" if beam == 1 else f"beam search of {beam}"}, length penalty '
        f'{penalty}, at most {max_len} tokens.')
  tokens = generate(model, images, tokenizer, beam, penalty, max_len, args.batch_size)
  captions = [decode_tokens(tokenizer, row) for row in tokens]
  for p, c in zip(paths, captions):
    print(f'{p}: {c}')
  return {'image_files': paths, 'captions': captions, 'tokens': tokens}


def _answer_vocabulary(args, model: LoadedModel) -> list[str]:
  if args.answers:
    answers = read_answers(args.answers)
    where = args.answers
  elif model.run_config is not None:
    from beit3_jax.train.finetune import answer_vocabulary
    answers, where = list(answer_vocabulary(model.run_config)), 'the run config'
  else:
    raise PredictError('A converted VQA model needs its answer vocabulary: --answers FILE (one '
                       'answer per line in the order of the head\'s outputs, or unilm\'s '
                       'answer2label.txt).')
  n = model.head_sizes['num_answers']
  if len(answers) != n:
    raise PredictError(f'{len(answers)} answers from {where}, but the head has {n} outputs.')
  return answers


def cmd_answer(args, model: LoadedModel) -> dict:
  paths, questions = image_paths(args.image), list(args.question)
  if len(paths) == 1 and len(questions) > 1:
    paths = paths * len(questions)
  elif len(questions) == 1 and len(paths) > 1:
    questions = questions * len(paths)
  elif len(paths) != len(questions):
    raise PredictError(f'{len(paths)} images and {len(questions)} questions: give one image and '
                       'several questions, one question and several images, or as many of each '
                       '(paired in order).')
  answers = _answer_vocabulary(args, model)
  _, ids, pad = _texts_for(args, model, questions)
  images = _images_for(args, model, paths)
  out = logits(model, [images, ids, pad], args.batch_size)    # (N, A)
  idx, scores = top_k(1.0 / (1.0 + np.exp(-out.astype(np.float64))), args.top_k)
  names = [[answers[j] for j in row] for row in idx]
  for p, q, row, sc in zip(paths, questions, names, scores):
    alts = ', '.join(f'{a} {s:.3f}' for a, s in zip(row[1:], sc[1:]))
    print(f'{p} | {q!r} -> {row[0]} ({sc[0]:.3f})' + (f'   [then: {alts}]' if alts else ''))
  return {'image_files': paths, 'questions': questions, 'answers': [r[0] for r in names],
          'logits': out, 'top_k': idx, 'top_k_scores': scores, 'top_k_answers': names}


def _class_names(args, model: LoadedModel) -> list[str] | None:
  n = model.head_sizes['num_classes']
  if args.class_names:
    names, where = read_lines(args.class_names, 'class names'), args.class_names
  else:
    names, where = list((model.run_config or {}).get('class_names') or []), 'the run config'
    if not names:
      return None
  if len(names) != n:
    raise PredictError(f'{len(names)} class names from {where}, but the head has {n} classes.')
  return [str(x) for x in names]


def cmd_classify(args, model: LoadedModel) -> dict:
  names = _class_names(args, model)
  paths = image_paths(args.images)
  out = logits(model, [_images_for(args, model, paths)], args.batch_size)   # (N, C)
  shifted = out.astype(np.float64) - out.max(axis=-1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
  idx, scores = top_k(probs, args.top_k)
  labels = [[names[j] if names else str(j) for j in row] for row in idx]
  for p, row, sc in zip(paths, labels, scores):
    print(f'{p}: ' + ', '.join(f'{c} {s:.3f}' for c, s in zip(row, sc)))
  return {'image_files': paths, 'logits': out, 'top_k': idx, 'top_k_probs': scores,
          'top_k_classes': labels}


COMMANDS = {'embed': cmd_embed, 'retrieve': cmd_retrieve, 'caption': cmd_caption,
            'answer': cmd_answer, 'classify': cmd_classify}


# ------------------------------------------------------------------------------------------
# CLI.


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m beit3_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('model', help='a training workdir / step dir, or a params directory '
                      '(python -m beit3_jax.convert to-flax)')
  common.add_argument('--spm', help='the SentencePiece model (e.g. beit3.spm); default: the '
                      "run's data.spm_path (built-in data: the demo's .spm in the data dir)")
  common.add_argument('--text-len', type=int, help="tokens per text incl. bos/eos (default: the "
                      "run's data.text_len, else 64, at most the model's table)")
  common.add_argument('--image-mean', type=_floats, metavar='R,G,B',
                      help="image mean in [0, 1] units (default: the run's data.image_mean)")
  common.add_argument('--image-std', type=_floats, metavar='R,G,B')
  common.add_argument('--batch-size', type=int, default=8, help='inputs per device call')
  common.add_argument('--output', help='also write the results to this .npz or .json file')
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('embed', parents=[common], help='image and/or text embeddings')
  p.add_argument('--image', action='append', metavar='PATH', help='an image file or a folder '
                 '(repeatable)')
  p.add_argument('--text', action='append', help='a text (repeatable)')
  p.add_argument('--texts', metavar='FILE', help='a file of texts, one per line')

  p = sub.add_parser('retrieve', parents=[common], help='image <-> text retrieval')
  p.add_argument('--images', required=True, metavar='DIR', help='a folder of images')
  p.add_argument('--texts', required=True, metavar='FILE', help='texts, one per line')
  p.add_argument('--top-k', type=int, default=5)

  p = sub.add_parser('caption', parents=[common], help='image captioning')
  p.add_argument('images', nargs='+', help='image files or folders')
  p.add_argument('--beam-size', type=int, help="default: the run's captioning.beam_size, else 3")
  p.add_argument('--length-penalty', type=float,
                 help="default: the run's captioning.length_penalty, else 0.6")
  p.add_argument('--max-len', type=int, help="default: the run's captioning.max_len, else 32")

  p = sub.add_parser('answer', parents=[common], help='visual question answering')
  p.add_argument('--image', action='append', required=True, metavar='PATH')
  p.add_argument('--question', action='append', required=True)
  p.add_argument('--answers', metavar='FILE', help='the answer vocabulary (one per line, or '
                 "unilm's answer2label.txt); default: the run config's")
  p.add_argument('--top-k', type=int, default=3)

  p = sub.add_parser('classify', parents=[common], help='image classification')
  p.add_argument('images', nargs='+', help='image files or folders')
  p.add_argument('--class-names', metavar='FILE', help="one name per line; default: the run's "
                 'class_names, else indices')
  p.add_argument('--top-k', type=int, default=5)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs a command; bad input exits with SystemExit('predict <command>: <what to change>')."""
  args = _parser().parse_args(argv)
  if args.batch_size < 1 or getattr(args, 'top_k', 1) < 1:
    raise SystemExit(f'predict {args.command}: --batch-size and --top-k must be >= 1.')
  try:
    model = load_model(args.model)
    require_task(model, args.command)
    print(f'Model: {model.describe()}')
    result = COMMANDS[args.command](args, model)
    if args.output:
      write_output(args.output, result)
  except PredictError as e:
    raise SystemExit(f'predict {args.command}: {e}') from None
  return 0


if __name__ == '__main__':
  sys.exit(main())

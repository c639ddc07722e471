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

Commands (and the models they take); `embed` is this module's, the others are the tasks'
(`Task.predict_commands` in beit3_jax/tasks/<task>.py):

  embed     image and/or text embeddings, (N, D) float32, unit norm. A retrieval model gives its
            `image_features` / `text_features` (the retrieval heads); a backbone gives
            encoder_out[:, 0] of the image-only / text-only pass, l2-normalised. The output
            says which (`features_from`: 'retrieval_heads' or 'backbone_cls').
  retrieve  a folder of images and a text file (one text per line): for each text its top-k
            images and for each image its top-k texts, scored by cosine similarity (retrieval).
  caption   a caption per image (captioning): greedy (beam size 1) or beam search.
  answer    an answer per (image, question) pair (vqa), with sigmoid scores of the top-k; the
            pairs from --image/--question, or a --questions file ("image<TAB>question" lines).
  classify  the top-k classes per image (classification), with softmax probabilities.
  verify    whether a statement is true of a pair of images (nlvr2), with P(true).

Images are resized to the model's square input (bicubic, no crop, as unilm's evaluation) and
normalised with the run's `data.image_mean/std` (a params directory: 0.5/0.5, except ImageNet's
for a classification model, unilm's in1k recipe; `--image-mean/--image-std` override). Texts are
tokenized with the SentencePiece model given by `--spm` (default: the run's `data.spm_path`,
or the demo's .spm for a run on the built-in data).

Every command prints its results; `--output FILE` also writes them as .npz or .json, and
`--report FILE.html` a self-contained HTML page (images embedded) of the inputs and their
predictions, for people to look at. MODEL, image files and folders, text files, --output and
--report may be gs:// URLs.

    python -m beit3_jax.predict embed out/base --image cat.jpg --text "a cat" --spm beit3.spm
    python -m beit3_jax.predict retrieve out/coco_retrieval --images photos/ --texts queries.txt \\
        --spm beit3.spm --top-k 5
    python -m beit3_jax.predict caption out/coco_captioning photo.jpg --spm beit3.spm
    python -m beit3_jax.predict answer out/vqa --image photo.jpg --question "what colour is it?" \\
        --spm beit3.spm --answers answer2label.txt
    python -m beit3_jax.predict answer out/vqa --image photos/ --questions questions.tsv \\
        --spm beit3.spm --report answers.html      # lines: photo.jpg<TAB>what colour is it?
    python -m beit3_jax.predict classify out/in1k photo.jpg --class-names imagenet_classes.txt
    python -m beit3_jax.predict verify out/nlvr2 --pair left.jpg right.jpg \\
        --statement "there are two dogs" --spm beit3.spm --report verdicts.html
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from beit3_jax import param_tree, params_io, platforms, tasks
from beit3_jax.data import builtin, image_ops, paths
from beit3_jax.data.text import TextTokenizer
from beit3_jax.models import BEiT3, abstract_params
from beit3_jax.models.config import config_from_dict
from beit3_jax.models.embeddings import POSITION_OFFSET
from beit3_jax.models.layers import l2_normalize
from beit3_jax.tasks import showcase
from beit3_jax.tasks.base import PredictCommand, PredictError, Task

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# unilm's default text length (--num_max_bpe_tokens), capped by the model's position table.
DEFAULT_TEXT_LEN = 64
# ------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass
class LoadedModel:
  """A model ready for prediction. Its params are read on first use (`params`), so that bad
  input is reported before a large checkpoint is read.

  Attributes:
    task: a registered task's name (`beit3_jax.tasks`), or None (a backbone without a head).
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
      tree = self.loader()
      if self.task is None:
        abstract = {'beit3': abstract_params(self.config, boxed=False)}
      else:
        abstract = tasks.get(self.task).abstract_params(self.config, self.head_sizes)
      _check_fits(tree, abstract, self.source)
      self._params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), tree))
    return self._params

  def describe(self) -> str:
    c = self.config
    what = self.task or 'backbone (no head)'
    sizes = ''.join(f', {k}={v}' for k, v in self.head_sizes.items())
    return (f'{what}{sizes}: {c.variant} D={c.embed_dim} depth={c.depth} '
            f'{c.img_size}px/{c.patch_size}, from {self.source}')


def _check_fits(params, abstract, source: str) -> None:
  param_tree.check_fits(abstract, params, f'The params of {source}', 'its config',
                        error=PredictError, limit=6)


def load_model(path: str) -> LoadedModel:
  """Opens a training workdir / step dir or a params directory (see the module docstring):
  reads its config now, its params on first use of `.params`.

  Raises:
    PredictError: nothing usable there (the message says what was found and what is expected).
  """
  from etils import epath
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
      task = run_config.get('task')
      if task not in tasks.names():
        raise PredictError(f'{run_dir}/config.json: task={task!r}; known: '
                           f'{", ".join(tasks.names())}.')
      head_sizes = tasks.get(task).head_sizes(run_config)
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


# ------------------------------------------------------------------------------------------
# Inputs.


def _epath(path: str):
  from etils import epath
  return epath.Path(path)


def _is_dir(path: str) -> bool:
  return _epath(path).is_dir() if paths.is_remote(path) else os.path.isdir(path)


def _is_file(path: str) -> bool:
  return _epath(path).is_file() if paths.is_remote(path) else os.path.isfile(path)


def list_images(folder: str) -> list[str]:
  """The image files (by suffix, IMAGE_SUFFIXES) directly in `folder` (local or gs://),
  sorted by name."""
  if not _is_dir(folder):
    raise PredictError(f'{folder} is not a folder.')
  if paths.is_remote(folder):
    found = sorted(str(p) for p in _epath(folder).iterdir()
                   if p.name.lower().endswith(IMAGE_SUFFIXES) and p.is_file())
  else:
    found = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, n)))
  if not found:
    raise PredictError(f'The folder {folder} has no images (files ending in '
                       f'{", ".join(IMAGE_SUFFIXES)}).')
  return found


def image_paths(items: Sequence[str]) -> list[str]:
  """Image files of `items` (local or gs://): files as given, folders expanded with
  `list_images`."""
  out = []
  for item in items:
    if _is_dir(item):
      out.extend(list_images(item))
    elif _is_file(item):
      out.append(item)
    else:
      raise PredictError(f'No image file or folder at {item}.')
  if not out:
    raise PredictError('No images given.')
  return out


def load_images(paths: Sequence[str], img_size: int, mean: Sequence[float],
                std: Sequence[float], crop_pct: float = 0.0) -> np.ndarray:
  """The model inputs of image files: float32 (N, img_size, img_size, 3).

  Each image is decoded to RGB, given the evaluation view `image_ops.eval_view` (bicubic; a
  plain resize when crop_pct is 0, else the shorter side to int(img_size / crop_pct) and the
  centre crop) and normalised with `image_ops.normalize(x, mean, std)` (mean/std in [0, 1]
  units).
  """
  out = np.empty((len(paths), img_size, img_size, 3), np.float32)
  for i, p in enumerate(paths):
    data = _read_bytes(p)
    try:
      image = image_ops.decode_pil(data)
    except image_ops.CorruptImageError as e:
      raise PredictError(f'{p}: {e}') from None
    out[i] = image_ops.normalize(image_ops.eval_view(image, img_size, crop_pct, 'bicubic'),
                                 mean, std)
  return out


def _read_bytes(path: str) -> bytes:
  if paths.is_remote(path):
    return _epath(path).read_bytes()
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str, what: str) -> str:
  """The text of a UTF-8 file (local or gs://), universal newlines.

  Raises:
    PredictError: no such file, or not UTF-8 text (saying where), naming it as `what`.
  """
  if not _is_file(path):
    raise PredictError(f'No {what} file at {path}.')
  try:
    data = _read_bytes(path)
  except OSError as e:
    raise PredictError(f'Cannot read the {what} file {path}: {e}') from None
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    raise PredictError(f'{path}:{line}: the {what} file is not UTF-8 text (byte {e.start}).'
                       ) from None
  return io.StringIO(text, newline=None).read()


def read_lines(path: str, what: str) -> list[str]:
  """The non-empty lines (stripped) of a UTF-8 text file (local or gs://)."""
  lines = [line.strip() for line in read_text(path, what).split('\n')]
  lines = [line for line in lines if line]
  if not lines:
    raise PredictError(f'The {what} file {path} has no non-empty line.')
  return lines


def read_table(path: str, what: str, columns: Sequence[str], image_columns: int = 1,
               folder: str | None = None) -> list[tuple[str, ...]]:
  """The rows of a tab-separated UTF-8 file (local or gs://): one line per row, the fields
  named by `columns` ('image<TAB>question'), blank lines skipped; the last field keeps any
  further tabs. The first `image_columns` fields are image files: a relative name is taken in
  `folder`, else in the file's folder.

  Raises:
    PredictError: the file cannot be read, has no row, or a line lacks a field or names no
      image file (with the file's name and the line number).
  """
  text = read_text(path, what)
  if folder is None:
    folder = path.rsplit('/', 1)[0] if '/' in path else '.'
  layout = '<TAB>'.join(columns)
  rows = []
  for n, line in enumerate(text.split('\n'), 1):
    if not line.strip():
      continue
    fields = [f.strip() for f in line.split('\t', len(columns) - 1)]
    if len(fields) < len(columns) or not all(fields):
      why = ('no tab' if len(fields) == 1 else
             f'{len(fields)} of {len(columns)} fields' if len(fields) < len(columns) else
             f'no {columns[fields.index("")]}')
      raise PredictError(f'{path}:{n}: expected "{layout}", got {line!r} ({why}).')
    for i in range(image_columns):
      name = fields[i]
      if not (name.startswith('/') or '://' in name):
        fields[i] = f'{folder.rstrip("/")}/{name}'
      if not _is_file(fields[i]):
        raise PredictError(f'{path}:{n}: no image file {fields[i]}.')
    rows.append(tuple(fields))
  if not rows:
    raise PredictError(f'The {what} file {path} has no "{layout}" line.')
  return rows


def thumbnails(paths: Sequence[str], max_size: int = 640) -> list[np.ndarray]:
  """The image files as uint8 (H, W, 3) RGB for people to look at (a report), the longer side
  shrunk to at most `max_size` pixels (aspect kept)."""
  out = []
  for p in paths:
    try:
      image = image_ops.decode_pil(_read_bytes(p)).convert('RGB')
    except image_ops.CorruptImageError as e:
      raise PredictError(f'{p}: {e}') from None
    image.thumbnail((max_size, max_size))
    out.append(np.asarray(image, np.uint8))
  return out


def image_normalization(model: LoadedModel, mean=None, std=None
                        ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
  """(mean, std, where they come from) for `model`'s images; `mean`/`std` override."""
  data = (model.run_config or {}).get('data') or {}
  task_norm = tasks.get(model.task).default_image_norm if model.task else None
  if 'image_mean' in data and 'image_std' in data:
    d_mean, d_std, why = data['image_mean'], data['image_std'], 'the run config'
  elif model.run_config is None and task_norm is not None:
    d_mean, d_std, why = task_norm
  else:
    d_mean, d_std, why = image_ops.BEIT3_MEAN, image_ops.BEIT3_STD, 'BEiT-3 default'
  if mean is not None or std is not None:
    why = f'{why}, overridden by flags'
  mean = tuple(float(v) for v in (mean if mean is not None else d_mean))
  std = tuple(float(v) for v in (std if std is not None else d_std))
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise PredictError(f'image mean/std need 3 values each (std > 0), got {mean} / {std}.')
  return mean, std, why


def eval_crop_pct(model: LoadedModel) -> float:
  """The evaluation view of `model`'s run (`data.eval_crop_pct`); for converted weights, which
  carry no run config, their task's (`Task.default_eval_crop_pct`)."""
  data = (model.run_config or {}).get('data') or {}
  if 'eval_crop_pct' in data:
    return float(data['eval_crop_pct'])
  if model.run_config is None and model.task:
    return float(tasks.get(model.task).default_eval_crop_pct)
  return 0.0


def run_spm_path(model: LoadedModel) -> str:
  """The .spm a training run used: its data.spm_path, or for built-in data the demo's .spm in
  the data dir when it is there; '' if neither."""
  data = (model.run_config or {}).get('data') or {}
  if data.get('spm_path'):
    return str(data['spm_path'])
  if str(data.get('source', '')).startswith('builtin'):
    path = paths.join(paths.spm_dir(data.get('data_dir') or None), builtin.SPM_NAME)
    if _is_file(path):
      return path
  return ''


def load_tokenizer(model: LoadedModel, spm: str | None):
  """The TextTokenizer of `spm` (default: the run config's data.spm_path), checked against the
  model's text embedding."""
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


@functools.lru_cache(maxsize=16)
def _function(name: str, key: tuple) -> Callable:
  """A jitted (params, *inputs) -> float32 array of the model of `key` (see `_config_key`):
  'embed_image' / 'embed_text' (the task's `embed` features, else the backbone's l2-normalised
  CLS output) or 'logits' (the task model)."""
  import jax
  task_name, config_json, sizes = key
  cfg = config_from_dict(json.loads(config_json))
  task = tasks.get(task_name) if task_name else None
  embed = task.embed(cfg) if task is not None else None
  if name == 'embed_image':
    if embed is not None:
      fn = embed[0]
    else:
      net = BEiT3(cfg)
      fn = lambda p, x: l2_normalize(  # noqa: E731
          net.apply({'params': p['beit3']}, images=x)['encoder_out'][:, 0].astype('float32'))
  elif name == 'embed_text':
    if embed is not None:
      fn = embed[1]
    else:
      net = BEiT3(cfg)
      fn = lambda p, ids, pad: l2_normalize(net.apply(  # noqa: E731
          {'params': p['beit3']}, text_ids=ids,
          text_padding_mask=pad)['encoder_out'][:, 0].astype('float32'))
  elif name == 'logits':
    net = task.model(cfg, **dict(sizes))
    fn = lambda p, *inputs: net.apply({'params': p}, *inputs)  # noqa: E731
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
  """Unit-norm image embeddings (N, D) float32 of normalised images (N, S, S, 3): the task's
  `embed` features (retrieval: its heads), or a backbone's l2-normalised encoder_out[:, 0]."""
  return run_batched(_function('embed_image', _config_key(model)), model.params, [images],
                     batch_size)


def embed_texts(model: LoadedModel, ids: np.ndarray, padding_mask: np.ndarray,
                batch_size: int = 8) -> np.ndarray:
  """Unit-norm text embeddings (T, D) float32 of ids (T, L) int32 / padding mask (T, L) bool:
  the task's `embed` features (retrieval: its heads), or a backbone's l2-normalised
  encoder_out[:, 0]."""
  return run_batched(_function('embed_text', _config_key(model)), model.params,
                     [ids, padding_mask], batch_size)


def logits(model: LoadedModel, inputs: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
  """The task model's outputs, float32, for positional `inputs` (e.g. classification
  (images,) -> (N, C); vqa (images, ids, padding mask) -> (N, A))."""
  return run_batched(_function('logits', _config_key(model)), model.params, list(inputs),
                     batch_size)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices (N, k) int64, scores (N, k)) of the k largest per row, best first (ties: lower
  index first)."""
  k = min(int(k), scores.shape[-1])
  order = np.argsort(-scores, axis=-1, kind='stable')[:, :k]
  return order, np.take_along_axis(scores, order, axis=-1)


# ------------------------------------------------------------------------------------------
# Output.


def _write_bytes(path: str, data: bytes) -> None:
  if paths.is_remote(path):
    _epath(path).write_bytes(data)
  else:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)


def check_report_path(path: str) -> None:
  """Raises PredictError unless `path` names an .html (or .htm) file."""
  if not path.lower().endswith(('.html', '.htm')) or path.endswith(('/', os.sep)):
    raise PredictError(f'--report {path}: expected an .html file name (e.g. report.html).')
  if not paths.is_remote(path) and os.path.isdir(path):
    raise PredictError(f'--report {path} is a folder; give an .html file name.')


def write_report(path: str, examples, title: str, notes: Sequence[str] = ()) -> None:
  """Writes `showcase.html_page(examples, title, notes=notes)` to `path` (local or gs://) and
  prints 'Report: PATH'."""
  _write_bytes(path, showcase.html_page(examples, title, notes=notes).encode('utf-8'))
  print(f'Report: {path}')


def write_output(path: str, result: dict) -> None:
  """Writes `result` (arrays, lists, str, numbers) as .npz (np.savez) or .json, to a local
  path or a gs:// URL."""
  if path.endswith('.npz'):
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in result.items()})
    data = buffer.getvalue()
  elif path.endswith('.json'):
    plain = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
    data = json.dumps(plain, indent=1, ensure_ascii=False).encode('utf-8')
  else:
    raise PredictError(f'--output {path}: expected a .npz or .json file name.')
  _write_bytes(path, data)
  print(f'Wrote {path}')


def _vector(x: np.ndarray, n: int = 4) -> str:
  head = ', '.join(f'{v:+.4f}' for v in x[:n])
  return f'[{head}, ...]' if x.shape[0] > n else f'[{head}]'


# ------------------------------------------------------------------------------------------
# Commands: each takes parsed args and a session, prints, and returns its result dict. `embed`
# is this module's; the others come from the tasks (`Task.predict_commands`).


class Session:
  """What a predict command works with: the loaded model and helpers that read its inputs the
  way the model expects (the flags in `args`: --spm, --text-len, --image-mean/std), and
  `report`, which writes the page of `--report`."""

  def __init__(self, model: LoadedModel):
    self.model = model
    self.reported: str | None = None   # the page `report` wrote

  image_paths = staticmethod(image_paths)
  list_images = staticmethod(list_images)
  read_lines = staticmethod(read_lines)
  read_text = staticmethod(read_text)
  read_table = staticmethod(read_table)
  is_file = staticmethod(_is_file)
  is_dir = staticmethod(_is_dir)
  thumbnails = staticmethod(thumbnails)
  top_k = staticmethod(top_k)

  def report(self, args, examples, notes: Sequence[str] = ()) -> None:
    """Writes the --report page of `examples` (`showcase.Example`s, or {section heading:
    examples}): titled with the command, noting the model and `notes`. A no-op without
    --report."""
    if not args.report:
      return
    write_report(args.report, examples, f'predict {args.command}',
                 [f'Model: {self.model.describe()}', *notes])
    self.reported = args.report

  @staticmethod
  def name(path: str) -> str:
    """A file's name without its folder (for headings)."""
    return os.path.basename(path.rstrip('/'))

  @staticmethod
  def short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + '...'

  def images(self, args, paths: Sequence[str]) -> np.ndarray:
    """Normalised float32 (N, S, S, 3) of image files, as the model was trained."""
    mean, std, why = image_normalization(self.model, args.image_mean, args.image_std)
    crop_pct = eval_crop_pct(self.model)
    size = self.model.config.img_size
    view = (f'resized to {size}px' if crop_pct == 0 else
            f'shorter side resized to {int(size / crop_pct)}px, centre {size}px crop')
    print(f'Images: {len(paths)}, {view} (bicubic), mean {mean}, std {std} ({why}).')
    return load_images(paths, size, mean, std, crop_pct)

  def tokenizer(self, args):
    return load_tokenizer(self.model, args.spm)

  def texts(self, args, texts: Sequence[str]):
    """(tokenizer, ids (T, L) int32, padding (T, L) bool) of `texts`."""
    tokenizer = self.tokenizer(args)
    text_len = text_length(self.model, args.text_len)
    ids, pad = encode_texts(tokenizer, texts, text_len)
    print(f'Texts: {len(texts)}, {text_len} tokens each (padded/cut).')
    return tokenizer, ids, pad

  def embed_images(self, images: np.ndarray, batch_size: int) -> np.ndarray:
    return embed_images(self.model, images, batch_size)

  def embed_texts(self, ids: np.ndarray, padding_mask: np.ndarray, batch_size: int
                  ) -> np.ndarray:
    return embed_texts(self.model, ids, padding_mask, batch_size)

  def logits(self, inputs: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    return logits(self.model, inputs, batch_size)


def cmd_embed(args, session: Session) -> dict:
  texts = list(args.text or []) + (read_lines(args.texts, 'texts') if args.texts else [])
  if not args.image and not texts:
    raise PredictError('embed needs --image (files or folders) and/or --text / --texts.')
  model = session.model
  task = tasks.get(model.task) if model.task else None
  source = (f'{model.task}_heads' if task is not None and task.embed(model.config) is not None
            else 'backbone_cls')
  print('Features: ' + (f'the {model.task} heads\' l2-normalised image_features / '
                        'text_features.' if source != 'backbone_cls' else
                        'l2-normalised encoder_out[:, 0] of the image-only / text-only pass of '
                        'the backbone.'))
  result: dict = {'features_from': source}
  paths = image_paths(args.image) if args.image else []
  if texts:
    _, ids, pad = session.texts(args, texts)
  if paths:
    feats = session.embed_images(session.images(args, paths), args.batch_size)
    result.update(image_features=feats, image_files=paths)
    print(f'image_features {feats.shape} {feats.dtype}:')
    for p, f in zip(paths, feats):
      print(f'  {p}: {_vector(f)}')
  if texts:
    feats = session.embed_texts(ids, pad, args.batch_size)
    result.update(text_features=feats, texts=texts)
    print(f'text_features {feats.shape} {feats.dtype}:')
    for t, f in zip(texts, feats):
      print(f'  {session.short(t)!r}: {_vector(f)}')
  if paths and texts:
    sim = result['image_features'] @ result['text_features'].T
    result['similarity'] = sim
    print('cosine similarity (rows: images, columns: texts):')
    for p, row in zip(result['image_files'], sim):
      print(f'  {os.path.basename(p)}: ' + ' '.join(f'{v:+.4f}' for v in row))
  if args.report:
    _report_embed(args, session, result)
  return result


def _report_embed(args, session: Session, result: dict) -> None:
  """Each image with the start of its embedding and, with texts, the texts by similarity; each
  text with the start of its embedding."""
  files, texts = result.get('image_files', []), result.get('texts', [])
  sim = result.get('similarity')
  examples = {}
  if files:
    pictures = session.thumbnails(files)
    examples['Images'] = [
        showcase.Example(os.path.basename(p), picture, [f'embedding: {_vector(f)}'],
                [] if sim is None else [(texts[j], sim[i, j]) for j in np.argsort(-sim[i])])
        for i, (p, picture, f) in enumerate(zip(files, pictures, result['image_features']))]
  if texts:
    examples['Texts'] = [showcase.Example(t, lines=[f'embedding: {_vector(f)}'])
                         for t, f in zip(texts, result['text_features'])]
  session.report(args, examples, [f'Features: {result["features_from"]}.'])


def _add_embed_arguments(p) -> None:
  p.add_argument('--image', action='append', metavar='PATH', help='an image file or a folder '
                 '(repeatable)')
  p.add_argument('--text', action='append', help='a text (repeatable)')
  p.add_argument('--texts', metavar='FILE', help='a file of texts, one per line')


def commands() -> dict[str, tuple[tuple[str | None, ...], PredictCommand]]:
  """Command name -> (the tasks it takes, None = a backbone without a head; the command).
  `embed` takes a backbone and every task with its own `embed` features."""
  embedders = tuple(n for n in tasks.names() if type(tasks.get(n)).embed is not Task.embed)
  out = {'embed': ((None, *embedders), PredictCommand(
      'embed', 'image and/or text embeddings', _add_embed_arguments, cmd_embed))}
  for name in tasks.names():
    for command in tasks.get(name).predict_commands():
      taken = out[command.name][0] if command.name in out else ()
      out[command.name] = ((*taken, name), command)
  return out


def require_task(model: LoadedModel, command: str, table=None) -> None:
  """Raises PredictError if `command` does not take `model`'s task."""
  table = table if table is not None else commands()
  wanted = table[command][0]
  if model.task in wanted:
    return
  fits = [c for c, (taken, _) in table.items() if model.task in taken]
  names = ' or '.join('a backbone' if t is None else f'a {t} model' for t in wanted)
  have = 'a backbone without a head' if model.task is None else f'a {model.task} model'
  hint = (f'; for this model use: {", ".join(fits)}' if fits else
          '; no predict command takes it yet')
  raise PredictError(f'{command} needs {names}; {model.source} holds {have}{hint}.')


# ------------------------------------------------------------------------------------------
# CLI.


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None


def _parser(table) -> argparse.ArgumentParser:
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
  common.add_argument('--report', metavar='FILE.html', help='also write a self-contained HTML '
                      'page of the inputs and the predictions (images embedded)')
  sub = parser.add_subparsers(dest='command', required=True)
  for name, (_, command) in table.items():
    command.add_arguments(sub.add_parser(name, parents=[common], help=command.help))
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs a command; bad input exits with SystemExit('predict <command>: <what to change>')."""
  platforms.cpu_unless_accelerators()
  table = commands()
  args = _parser(table).parse_args(argv)
  if args.batch_size < 1 or getattr(args, 'top_k', 1) < 1:
    raise SystemExit(f'predict {args.command}: --batch-size and --top-k must be >= 1.')
  try:
    if args.report:
      check_report_path(args.report)
    model = load_model(args.model)
    require_task(model, args.command, table)
    print(f'Model: {model.describe()}')
    session = Session(model)
    result = table[args.command][1].run(args, session)
    if args.output:
      write_output(args.output, result)
    if args.report and session.reported is None:
      raise PredictError('--report: this command writes no report.')
  except PredictError as e:
    raise SystemExit(f'predict {args.command}: {e}') from None
  return 0


if __name__ == '__main__':
  sys.exit(main())

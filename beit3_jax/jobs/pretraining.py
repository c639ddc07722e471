"""The `pretrain` job: BEiT-3 masked data modeling from a config (configs/pretrain/*.py).

Builds, from the config: the text tokenizer (.spm), the visual tokenizer (loaded, or for the
demo trained first), the three input streams (train and validation), the objective,
the optimizer; then hands them to `loop.train`.

Config fields (besides the loop's, see `beit3_jax.trainer.loop`):
  model                  the backbone (`beit3_jax.models.get_config`).
  tokenizer.path         a VQ-KD params directory (the convert CLI's `to-flax --model vqkd`
                         output, or a tokenizer run's export); or
  tokenizer.train_config a tokenizer config file: when `path` is empty, the tokenizer is
                         `<data_dir>/tokenizers/<config name>`.
  tokenizer.train_if_missing  True (the demo): that tokenizer, when missing, is trained first;
                         False: a missing one is an error that names the command to train it.
  data.*                 sources ('builtin:images', 'builtin:text' or TFDS names), splits,
                         spm_path, text_len, mask ratios, crop scale, colour jitter.
  batch_size.{image,text,pair}, loss_weights.{image,text,pair,pair_image}, optimizer.*.
Every field, with its default and doc: `beit3_jax.defaults.pretrain_fields`.
"""

from __future__ import annotations

import os
import shlex

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from beit3_jax import params_io
from beit3_jax import sharding as sharding_lib
from beit3_jax.data import builtin as builtin_lib
from beit3_jax.data import paths, pretraining as inputs_lib, schema
from beit3_jax.data.masking import BlockMaskConfig
from beit3_jax.data.text import TextTokenizer
from beit3_jax.defaults import ConfigError
from beit3_jax.jobs import tokenizer_training
from beit3_jax.jobs.data_splits import open_split
from beit3_jax.jobs.masked_modeling import MaskedModeling, make_spec
from beit3_jax.models import flops as flops_lib
from beit3_jax.models import num_patches
from beit3_jax.tokenizers import get_vqkd_config
from beit3_jax.tokenizers import vqkd as vqkd_lib
from beit3_jax.trainer import loop
from beit3_jax.trainer.optimizer import make_optimizer

STREAMS = ('image', 'text', 'pair')


def resolve_sources(data_cfg):
  """(tfds_dir, stream -> TFDS name, spm path), building the built-in data if it is used."""
  tfds_dir, names, spm_path = builtin_lib.resolve_names(
      {s: data_cfg[s] for s in STREAMS if data_cfg[s]}, data_cfg.data_dir or None,
      data_cfg.builtin_image_size, data_cfg.spm_path)
  if not spm_path:
    raise ConfigError('data.spm_path is empty: give the SentencePiece model (e.g. beit3.spm).')
  return tfds_dir, names, spm_path


def input_settings(config, tokenizer_image_size: int) -> inputs_lib.PretrainInputs:
  d = config.data
  return inputs_lib.PretrainInputs(
      image_size=config.model.img_size, tokenizer_image_size=tokenizer_image_size,
      patch_size=config.model.patch_size, text_len=d.text_len,
      image_mask=BlockMaskConfig(ratio=d.image_mask_ratio,
                                 min_block=d.min_mask_block),
      pair_image_mask_ratio=d.pair_image_mask_ratio, text_mask_ratio=d.text_mask_ratio,
      pair_text_mask_ratio=d.pair_text_mask_ratio, crop_scale=tuple(d.crop_scale),
      color_jitter=d.color_jitter)


def stream_split(data_cfg, stream: str, kind: str) -> str:
  """The TFDS split a stream reads for `kind` ('train' or 'eval'): data.splits[stream][kind],
  else data.train_split / data.eval_split."""
  default = data_cfg.train_split if kind == 'train' else data_cfg.eval_split
  return dict(data_cfg.splits.get(stream, {}) if 'splits' in data_cfg else {}).get(kind, default)


def open_sources(config, tfds_dir, names, kind: str) -> dict:
  """stream -> the random-access source of its `kind` split, for the streams with a batch;
  a split the data set lacks is a ConfigError naming the data set, the split and the field."""
  sources = {}
  for stream, name in names.items():
    if not int(config.batch_size[stream]):
      continue
    field = (f'data.splits.{stream}.{kind}' if kind in config.data.splits.get(stream, {})
             else f'data.{kind}_split')
    sources[stream] = open_split(name, stream_split(config.data, stream, kind), field,
                                 tfds_dir)
  return sources


def make_data(config, text_tokenizer, tokenizer_image_size, tfds_dir, names, kind: str,
              seed: int, sources: dict | None = None):
  """The mixture of the configured streams on their `kind` ('train' or 'eval') splits
  (`sources`: those splits already opened by `open_sources`)."""
  batch_sizes = {s: int(config.batch_size[s]) for s in names}
  sources = sources or open_sources(config, tfds_dir, names, kind)
  # data.fields is free-form: a stream it does not name reads its inputs where TFDS puts them.
  fields = {s: dict(config.data.fields.get(s, {})) for s in sources}
  # Validation passes read a few batches each: worker processes would cost more to start.
  workers = int(config.data.workers) if kind == 'train' else 0
  return inputs_lib.make_mixture(input_settings(config, tokenizer_image_size), text_tokenizer,
                                 sources, batch_sizes, seed, fields=fields,
                                 read_threads=config.data.read_threads, workers=workers,
                                 on_bad_example=config.data.on_bad_example)


def _command(*args: str) -> str:
  return ' '.join(shlex.quote(a) for a in args)


def _has_tokenizer(path: str) -> bool:
  return (epath.Path(path) / params_io.CONFIG_FILE).exists()


def visual_tokenizer_path(config) -> str:
  """Where the visual tokenizer of `config` is: `tokenizer.path`, or, when that is '', the
  output of the tokenizer config `tokenizer.train_config` in <data dir>/tokenizers/<config
  name>. A tokenizer that does not exist there is a ConfigError naming the command that makes
  it, unless `tokenizer.train_if_missing` (the demo) has `load_visual_tokenizer` train it."""
  path = config.tokenizer.path
  data_dir = config.data.data_dir
  if path:
    if not _has_tokenizer(path):
      raise ConfigError(
          f'tokenizer.path={path} holds no visual tokenizer (no config.json). Make it: convert '
          'BEiT v2\'s with\n  '
          + _command('python', '-m', 'beit3_jax.convert', 'to-flax', '<vqkd .pth>', path,
                     '--model', 'vqkd', '--variant', 'base')
          + '\nor train one with\n  '
          + _command('python', '-m', 'beit3_jax.main',
                     '--config=configs/pretrain/tokenizer_base.py', '--workdir=<run dir>',
                     '--config.teacher.path=<teacher params dir>', f'--config.output={path}'))
    return path
  train_config = config.tokenizer.train_config
  if not train_config:
    raise ConfigError('Set tokenizer.path (a VQ-KD params directory) or '
                      'tokenizer.train_config (a tokenizer config whose output to use).')
  name = os.path.splitext(os.path.basename(train_config.split(':')[0]))[0]
  path = f'{paths.tokenizers_dir(data_dir or None)}/{name}'
  if not _has_tokenizer(path) and not config.tokenizer.train_if_missing:
    raise ConfigError(
        f'No visual tokenizer at {path} (the output of tokenizer.train_config={train_config}). '
        'Train it first with\n  '
        + _command('python', '-m', 'beit3_jax.main', f'--config={train_config}',
                   f'--workdir={tokenizer_training.run_dir_of(path)}',
                   f'--config.output={path}',
                   *([f'--config.data.data_dir={data_dir}'] if data_dir else []))
        + '\nor set --config.tokenizer.train_if_missing=True to train it as part of this run.')
  return path


def load_visual_tokenizer(config):
  """(VQ-KD params, its config, where from) of `visual_tokenizer_path(config)`; with
  `tokenizer.train_if_missing`, a missing train_config tokenizer is trained first, and the
  screen says so."""
  path = visual_tokenizer_path(config)
  if not _has_tokenizer(path):
    train_config = config.tokenizer.train_config
    tok_config = tokenizer_training.load_config_file(train_config)
    t = tok_config.tokenizer
    run_dir = tokenizer_training.run_dir_of(path)
    print(f'No visual tokenizer at {path} yet: training it first (tokenizer.train_if_missing) '
          f'from {train_config}: a VQ-KD of {t.n_embed} codes, {tok_config.total_steps} steps '
          f'of {tok_config.batch_size} images (the demo\'s takes about 2 minutes on a 2-core '
          f'CPU); its run goes to {run_dir}. Pretraining starts when it is done; later '
          'runs reuse it.', flush=True)
    result = tokenizer_training.train_into(tok_config, output=path,
                                           data_dir=config.data.data_dir)
    print('Trained the visual tokenizer: ' + ', '.join(
        f'{k} {v:.4f}' for k, v in sorted(result['val'].items())) + f' ({run_dir})')
  params, _, tok_cfg = params_io.load_vqkd_params(path)
  return params, tok_cfg, path


def tokenizer_for_grid(tok_cfg, model_cfg):
  """The VQ-KD config fed a view whose token grid is the model's patch grid (e.g. a 256 px view
  for giant's 16 x 16 patches of 14 px at 224 px)."""
  grid = model_cfg.img_size // model_cfg.patch_size
  if (tok_cfg.input_size // tok_cfg.patch_size) == grid:
    return tok_cfg
  fields = tok_cfg.to_dict()
  variant = fields.pop('variant')
  return get_vqkd_config(variant, **{**fields, 'input_size': grid * tok_cfg.patch_size})


def planned_streams(config) -> tuple[str, ...]:
  """The streams a config trains on: those with a source and a batch size."""
  return tuple(s for s in STREAMS if config.data[s] and config.batch_size[s])


def _step_parts(config, tok_cfg, streams, mesh_shape):
  """(objective, tx, schedule, per-stream batch sizes, FLOPs per step, tokens per step) of a
  config: everything the step needs that is not data."""
  batch = {s: int(config.batch_size[s]) for s in streams}
  try:
    sharding_lib.check_batch({f'batch_size.{s}': b for s, b in batch.items()}, mesh_shape,
                             int(config.micro_batches))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  d = config.data
  spec = make_spec(config.model, d.text_len, d.image_mask_ratio, d.pair_image_mask_ratio,
                   d.text_mask_ratio, d.pair_text_mask_ratio, dict(config.loss_weights), streams)
  objective = MaskedModeling(config.model, tok_cfg, spec)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps, config.model.depth)
  n = num_patches(config.model)
  tokens = (batch.get('image', 0) * (1 + n) + batch.get('text', 0) * d.text_len
            + batch.get('pair', 0) * (1 + n + d.text_len))
  flops = flops_lib.pretraining_step_flops(config.model, tok_cfg, batch, d.text_len, spec)
  return objective, tx, schedule, batch, flops, tokens


def abstract_batch(config, tok_cfg, batch: dict[str, int]) -> dict:
  """ShapeDtypeStructs of one global batch (`data.schema`): stream -> key -> array."""
  m = config.model
  out = {}
  for stream, size in batch.items():
    visual_tokens = stream == 'image' or float(config.data.pair_image_mask_ratio) > 0
    sizes = {'B': size, 'H': m.img_size, 'W': m.img_size, 'T': tok_cfg.input_size,
             'V': tok_cfg.input_size if visual_tokens else m.img_size,
             'N': num_patches(m), 'L': config.data.text_len}
    out[stream] = {k: jax.ShapeDtypeStruct(shape, dtype)
                   for k, (shape, dtype) in schema.shapes(stream, sizes).items()}
  return out


def _tokenizer_shardings(tok_cfg, mesh):
  abstract = jax.eval_shape(
      lambda r: vqkd_lib.VQKD(tok_cfg).init(r, vqkd_lib.example_images(tok_cfg))['params'],
      jax.random.key(0))
  return abstract, sharding_lib.mesh_shardings(abstract, mesh)


def planned_tokenizer_config(config):
  """The visual tokenizer's config without its weights (for `beit3_jax.plan`): the config.json
  at `visual_tokenizer_path` if it is there, else the model of `tokenizer.train_config`, else
  BEiT v2's base VQ-KD."""
  path = config.tokenizer.path
  if not path and config.tokenizer.train_config:
    path = f'{paths.tokenizers_dir(config.data.data_dir or None)}/' + os.path.splitext(
        os.path.basename(config.tokenizer.train_config.split(':')[0]))[0]
  if path and _has_tokenizer(path):
    tok_cfg = params_io.load_model_config(path)
  elif config.tokenizer.train_config:
    tok_cfg = tokenizer_training.load_config_file(config.tokenizer.train_config).tokenizer
  else:
    tok_cfg = get_vqkd_config('base')
  return tokenizer_for_grid(tok_cfg, config.model)


def plan_job(config, mesh) -> loop.Job:
  """The job of `config` without data or weights, for compiling its step ahead of time: the
  frozen tokenizer as ShapeDtypeStructs, `abstract_batch` set, no data iterators."""
  tok_cfg = planned_tokenizer_config(config)
  streams = planned_streams(config)
  objective, tx, schedule, batch, flops, tokens = _step_parts(config, tok_cfg, streams,
                                                              dict(mesh.shape))
  tok_abstract, tok_shardings = _tokenizer_shardings(tok_cfg, mesh)
  frozen = {'tokenizer': jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(tok_abstract), tok_shardings)}
  return loop.Job(objective=objective, tx=tx, schedule=schedule, train_data=None,
                  eval_data=None, frozen=frozen, frozen_shardings={'tokenizer': tok_shardings},
                  flops_per_step=flops, examples_per_step=sum(batch.values()),
                  tokens_per_step=tokens, abstract_batch=abstract_batch(config, tok_cfg, batch))


def build_job(config) -> loop.Job:
  """Everything the loop needs for a pretraining run of `config`."""
  visual_tokenizer_path(config)  # a missing tokenizer: say so before anything is built
  tfds_dir, names, spm_path = resolve_sources(config.data)
  text_tokenizer = TextTokenizer.from_file(spm_path)
  if config.model.vocab_size < text_tokenizer.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                      f'{text_tokenizer.vocab_size} ids of {spm_path}.')
  tok_params, tok_cfg, tok_path = load_visual_tokenizer(config)
  tok_cfg = tokenizer_for_grid(tok_cfg, config.model)
  streams = tuple(s for s in names if config.batch_size[s])
  mesh = sharding_lib.make_mesh(config.mesh_shape)
  objective, tx, schedule, batch, flops, tokens = _step_parts(config, tok_cfg, streams,
                                                              dict(mesh.shape))
  view = tok_cfg.input_size
  # Every split the run will read is opened now, so that a missing one stops the run before
  # anything compiles, not at its first evaluation.
  eval_sources = open_sources(config, tfds_dir, names, 'eval') if config.eval_every else None
  train_data = make_data(config, text_tokenizer, view, tfds_dir, names, 'train', config.seed)
  eval_data = None
  if config.eval_every:
    eval_data = lambda: make_data(config, text_tokenizer, view, tfds_dir, names,  # noqa: E731
                                  'eval', config.seed + 1, eval_sources)

  _, tok_shardings = _tokenizer_shardings(tok_cfg, mesh)
  frozen = {'tokenizer': jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s),
                                      tok_params, tok_shardings)}
  describe = [
      f'Model: {config.model.variant} D={config.model.embed_dim} depth={config.model.depth} '
      f'heads={config.model.num_heads} {config.model.img_size}px/{config.model.patch_size} '
      f'vocab {config.model.vocab_size}; dtype {config.model.dtype}',
      f'Visual tokenizer: {tok_path} ({tok_cfg.n_embed} codes, {tok_cfg.input_size}px view)',
      f'Text tokenizer: {spm_path} ({text_tokenizer.vocab_size} ids)',
      'Data: ' + ', '.join(f'{s} {names[s]} x{batch[s]}' for s in streams)
      + f' (TFDS dir {tfds_dir}); tasks {objective.tasks}',
  ]
  return loop.Job(
      objective=objective, tx=tx, schedule=schedule, train_data=train_data, eval_data=eval_data,
      frozen=frozen, frozen_shardings={'tokenizer': tok_shardings},
      flops_per_step=flops, examples_per_step=sum(batch.values()), tokens_per_step=tokens,
      describe=describe)


def check(config) -> None:
  """Raises ConfigError for what a run of `config` cannot start with (a missing visual
  tokenizer), before anything is written or built (`beit3_jax.main` calls it first)."""
  visual_tokenizer_path(config)


def run(config, workdir) -> dict:
  return loop.train(config, workdir, build_job(config))

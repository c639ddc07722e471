"""The `tokenizer` job: train a VQ-KD visual tokenizer (BEiT v2) with the same trainer.

Per image (B, S, S, 3) in [-1, 1]:

    z   = l2norm(encode_task_layer(encoder(image)))          (B, N, code_dim)
    ids = nearest code of z by cosine;  z_q = z + stop_grad(codebook[ids] - z)
    rec = decode_task_layer(decoder(z_q))                     (B, N, decoder_out_dim)
    loss = mean_tokens(1 - cos(rec, teacher(image)))          reconstruction
         + mean(|stop_grad(codebook[ids]) - z|^2)             commitment (beta 1, as beit2)

The codebook gets no gradient: it starts from spherical k-means of the first batch's features
and then moves by EMA (decay `tokenizer.decay`, 0.99) of the features assigned to each code
(`tokenizer_objective.ema_codebook_update`). Metrics: `vqkd/rec_loss`, `vqkd/quant_loss` and
`vqkd/codebook_usage` (share of codes used by the batch; in evaluation, by the whole split).
With `dead_code_fraction` > 0 (not in BEiT v2; the demo uses it), codes whose EMA count falls
below that share of the mean are moved onto features of the batch
(`tokenizer_objective.restart_dead_codes`).

Teachers (`teacher.kind`):
  'pixel'   a fixed feature of the image itself (`tokenizer_objective.pixel_teacher`: each
            patch's 2x2 pooled colours plus a constant), so that small data such as the
            built-in world gets meaningful targets in minutes on a CPU;
  'beit3'   a frozen BEiT-3 backbone from a params directory (`teacher.path`; e.g. a converted
            PyTorch checkpoint): its image-only output on the patches (B, N, D);
  'vit'     the frozen ViT encoder of a VQ-KD params directory (`teacher.path`), e.g. a
            released BEiT v2 tokenizer converted with the convert CLI: (B, N, D);
  'clip'    a frozen CLIP vision tower (`teacher.path`: a directory written by
            `python -m beit3_jax.tokenizers.clip_convert`, e.g. from OpenAI's ViT-B-16.pt), BEiT
            v2's own teacher: the image rescaled to CLIP's mean/std (`clip.to_clip_input`), then
            every patch token after `ln_post`, projected by `proj`: (B, N, 512) for ViT-B/16
            (`ClipVisionTower.patch_features`).
The tokenizer's `decoder_out_dim` must equal the teacher's feature size.

At the end the tokenizer is exported as a params directory (`output`, default
`<workdir>/tokenizer`): what a pretraining config's `tokenizer.path` points to.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from beit3_jax import defaults, params_io
from beit3_jax import sharding as sharding_lib
from beit3_jax.data import builtin as builtin_lib
from beit3_jax.data import image_ops, pipeline
from beit3_jax.data.pretraining import load_image
from beit3_jax.defaults import ConfigError, check_fields
from beit3_jax.jobs import tokenizer_objective as tobj
from beit3_jax.jobs.data_splits import open_split
from beit3_jax.models import BEiT3, abstract_params
from beit3_jax.models import get_config as get_model_config
from beit3_jax.models import flops as flops_lib
from beit3_jax.tokenizers import clip as clip_lib
from beit3_jax.tokenizers import clip_convert
from beit3_jax.tokenizers import vqkd as vqkd_lib
from beit3_jax.trainer import loop
from beit3_jax.trainer.optimizer import make_optimizer
from beit3_jax.trainer.run_config import save_run_config

TEACHERS = ('pixel', 'beit3', 'vit', 'clip')
CODEBOOK = ('quantize', 'embedding', 'embedding')


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _with(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _with(tree[path[0]], path[1:], value)}


class Teacher:
  """Frozen targets: `features(frozen, images_in_[-1,1]) -> (B, N, F)` float32."""

  def __init__(self, cfg, tokenizer_cfg, *, planning: bool = False):
    """planning: for `beit3_jax.plan`, which needs only the teacher's shapes: without
    `cfg.path` they come from the named `cfg.variant`."""
    self.kind = cfg.kind
    self.grid = tokenizer_cfg.input_size // tokenizer_cfg.patch_size
    self.cells = cfg.cells
    self.model = None
    self.model_cfg = None
    if self.kind not in TEACHERS:
      raise ConfigError(f'teacher.kind={self.kind!r}; expected one of {TEACHERS}.')
    if self.kind == 'pixel':
      self.size = tobj.teacher_feature_size('pixel', self.cells)
      return
    variant = cfg.get('variant', '')
    if not cfg.path and not (planning and variant):
      raise ConfigError(f'teacher.kind={self.kind!r} needs teacher.path (a params directory)'
                        + ('; to plan without it, name its size in teacher.variant.'
                           if planning else '.'))
    if self.kind == 'beit3':
      self.model_cfg = (params_io.load_model_config(cfg.path) if cfg.path
                        else get_model_config(variant))
      self.model = BEiT3(self.model_cfg)
      self.size = self.model_cfg.embed_dim
      teacher_grid = self.model_cfg.img_size // self.model_cfg.patch_size
      side = self.model_cfg.img_size
    elif self.kind == 'clip':
      self.model_cfg = (clip_convert.load_clip_config(cfg.path) if cfg.path
                        else clip_lib.get_clip_config(variant))
      self.model = clip_lib.ClipVisionTower(self.model_cfg)
      self.size = clip_lib.feature_size(self.model_cfg)
      teacher_grid = self.model_cfg.image_size // self.model_cfg.patch_size
      side = self.model_cfg.image_size
    else:
      self.model_cfg = (params_io.load_model_config(cfg.path) if cfg.path
                        else vqkd_lib.get_vqkd_config(variant))
      self.model = vqkd_lib.VQKD(self.model_cfg)
      self.size = self.model_cfg.embed_dim
      teacher_grid = self.model_cfg.input_size // self.model_cfg.patch_size
      side = self.model_cfg.input_size
    if teacher_grid != self.grid or side != tokenizer_cfg.input_size:
      raise ConfigError(f'The teacher at {cfg.path or variant} sees {side}px images on a {teacher_grid}-patch '
                       f'grid; the tokenizer sees {tokenizer_cfg.input_size}px on a {self.grid} '
                       'grid: they must match.')

  def abstract_params(self):
    """ShapeDtypeStructs of the teacher's params ({} for the pixel teacher)."""
    if self.kind == 'beit3':
      return abstract_params(self.model_cfg, boxed=False)
    if self.kind == 'vit':
      return vqkd_lib.abstract_variables(self.model_cfg)[0]
    if self.kind == 'clip':
      return clip_lib.abstract_params(self.model_cfg)
    return {}

  def load(self, path):
    if self.kind == 'beit3':
      return params_io.load_params(path, self.model_cfg)
    if self.kind == 'vit':
      return params_io.load_vqkd_params(path, self.model_cfg)[0]
    if self.kind == 'clip':
      return clip_convert.load_clip_params(path, self.model_cfg)[0]
    return {}

  def features(self, frozen, images: jax.Array) -> jax.Array:
    if self.kind == 'pixel':
      return tobj.pixel_teacher(images, self.grid, cells=self.cells)
    if self.kind == 'beit3':
      out = self.model.apply({'params': frozen['teacher']}, images=images)  # 0.5/0.5 norm
      return jax.lax.stop_gradient(out['encoder_out'][:, 1:].astype(jnp.float32))
    if self.kind == 'clip':
      feats = self.model.apply({'params': frozen['teacher']}, clip_lib.to_clip_input(images),
                               method=clip_lib.ClipVisionTower.patch_features)
      return jax.lax.stop_gradient(feats)
    feats = self.model.apply({'params': frozen['teacher']}, images,
                             method=vqkd_lib.VQKD.encoder_features)
    return jax.lax.stop_gradient(feats.astype(jnp.float32))


class VQKDTraining:
  """The tokenizer objective the trainer drives (see `beit3_jax.trainer.step`).

  Params: the VQKD tree (its codebook frozen in the optimizer). Extra state: the quantizer's
  'vq_stats' and the current `codebook` (mirrored into the params after every update).
  """
  tasks = ('vqkd',)

  def __init__(self, tokenizer_cfg, teacher: Teacher, seed: int = 0,
               dead_code_fraction: float = 0.0):
    self.cfg = tokenizer_cfg
    self.dead_code_fraction = float(dead_code_fraction)
    self.model = vqkd_lib.VQKD(tokenizer_cfg)
    self.teacher = teacher
    self.seed = seed
    if teacher.size != tokenizer_cfg.decoder_out_dim:
      raise ConfigError(f'tokenizer.decoder_out_dim={tokenizer_cfg.decoder_out_dim} must equal '
                       f'the {teacher.kind} teacher\'s feature size {teacher.size}.')

  def init_params(self, rng):
    return self.model.init(rng, vqkd_lib.example_images(self.cfg))['params']

  def init_extra(self, params):
    stats = jax.eval_shape(lambda: self.model.init(jax.random.key(0),
                                                   vqkd_lib.example_images(self.cfg)))
    stats = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.meta.unbox(stats['vq_stats']))
    stats['quantize']['embedding']['embed_avg'] = _get(params, CODEBOOK)
    return {'vq_stats': stats, 'codebook': _get(params, CODEBOOK)}  # initted 0: k-means first

  def normalizers(self, batch):
    b = batch['image']['image']
    return {'tokens': jnp.float32(b.shape[0] * (self.cfg.input_size // self.cfg.patch_size) ** 2)}

  def _features(self, params, images):
    z = self.model.apply({'params': params}, images, method=vqkd_lib.VQKD.code_features)
    return vqkd_lib.l2_normalize(z)

  def first_batch_init(self, params, extra, frozen, batch):
    """k-means of the first batch's features -> the codebook (decay 1: no EMA step)."""
    del frozen
    z = jax.lax.stop_gradient(self._features(params, image_ops.tokenizer_view(
        batch['image']['image'])))
    ids = vqkd_lib.nearest_code(z, extra['codebook'])
    codebook, quantize = tobj.ema_codebook_update(
        extra['codebook'], extra['vq_stats']['quantize'], z, ids, 1.0,
        kmeans_rng=jax.random.key(self.seed))
    # The EMA counts start from the k-means cluster sizes (not 0), so that no code looks dead.
    quantize = {**quantize, 'cluster_size': quantize['embedding']['cluster_size']}
    extra = {'vq_stats': {**extra['vq_stats'], 'quantize': quantize}, 'codebook': codebook}
    return _with(params, CODEBOOK, codebook), extra

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
    images = image_ops.tokenizer_view(batch['image']['image'])
    z = self._features(params, images)
    codebook = extra['codebook']
    ids = vqkd_lib.nearest_code(z, codebook)
    codes = jnp.take(codebook, ids, axis=0)
    z_q = z + jax.lax.stop_gradient(codes - z)
    rec = self.model.apply({'params': params}, z_q, method=vqkd_lib.VQKD.decode)
    target = self.teacher.features(frozen, images)
    rec_sum = jnp.sum(1.0 - _cosine(rec, target))
    quant_sum = jnp.sum(jnp.square(jax.lax.stop_gradient(codes) - z)) / z.shape[-1]
    tokens = normalizers['tokens']
    loss = (rec_sum + quant_sum) / tokens
    histogram = jnp.zeros((self.cfg.n_embed,), jnp.int32).at[ids.reshape(-1)].add(1)
    sums = {'vqkd': {'rec': rec_sum, 'quant': quant_sum,
                     'count': jnp.float32(ids.size), 'histogram': histogram}}
    if train:
      new_codebook, quantize = tobj.ema_codebook_update(
          codebook, extra['vq_stats']['quantize'], jax.lax.stop_gradient(z), ids,
          self.cfg.decay)
      if self.dead_code_fraction > 0:
        new_codebook, sizes = tobj.restart_dead_codes(
            rng, new_codebook, quantize['cluster_size'], jax.lax.stop_gradient(z),
            self.dead_code_fraction)
        quantize = {**quantize, 'cluster_size': sizes}
      extra = {'vq_stats': {**extra['vq_stats'], 'quantize': quantize}, 'codebook': new_codebook}
    return loss, (sums, extra)

  def finish(self, params, extra):
    return _with(params, CODEBOOK, extra['codebook']), extra

  def reduce(self, sums):
    s = sums['vqkd']
    return {'vqkd': {'rec': s['rec'], 'quant': s['quant'], 'count': s['count'],
                     'codes_used': jnp.sum(s['histogram'] > 0).astype(jnp.float32),
                     'batches': jnp.float32(1)}}

  def summarize(self, sums) -> dict[str, float]:
    s = sums['vqkd']
    count = max(float(s['count']), 1.0)
    if 'histogram' in s:
      usage = float(np.mean(np.asarray(s['histogram']) > 0))
    else:
      usage = float(s['codes_used']) / max(float(s['batches']), 1.0) / self.cfg.n_embed
    return {'vqkd/rec_loss': float(s['rec']) / count, 'vqkd/quant_loss': float(s['quant']) / count,
            'vqkd/codebook_usage': usage}


def _cosine(a, b, eps=1e-6):
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1),
                                          eps)


def _image_transform(size: int, crop_scale, field: str):
  aug = image_ops.ImageAugConfig(size=size, scale=tuple(crop_scale), color_jitter=0.0,
                                 second_size=None)

  def transform(example, rng):
    image = load_image(example, field)
    if isinstance(image, pipeline.Skip):
      return image
    return {'image': image_ops.augment(rng, image, aug)['image']}
  return transform


def _data(config, source, seed, train: bool = True):
  d = config.data
  stream = pipeline.Stream(
      source,
      _image_transform(config.tokenizer.input_size, d.crop_scale, d.image_field),
      global_batch=int(config.batch_size), seed=seed * 1000,
      on_bad_example=d.on_bad_example, name='image')
  return pipeline.Mixture({'image': stream}, workers=int(d.workers) if train else 0,
                          read_threads=d.read_threads)


def _step_parts(config, mesh, planning: bool = False):
  """(objective, tx, schedule, teacher, teacher shardings, FLOPs per step) of a config
  (planning: see `Teacher`)."""
  tok_cfg = config.tokenizer
  try:
    sharding_lib.check_batch({'batch_size': int(config.batch_size)}, dict(mesh.shape),
                             int(config.micro_batches))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  teacher = Teacher(config.teacher, tok_cfg, planning=planning)
  objective = VQKDTraining(tok_cfg, teacher, config.seed, config.dead_code_fraction)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps, tok_cfg.depth,
                                frozen=(r'^quantize/',))
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), teacher.abstract_params())
  teacher_flops = 0.0
  if teacher.kind == 'beit3':
    teacher_flops = flops_lib.beit3_forward_flops(teacher.model_cfg, images=True)
  elif teacher.kind == 'vit':
    teacher_flops = flops_lib.vqkd_encode_flops(teacher.model_cfg)
  elif teacher.kind == 'clip':
    teacher_flops = clip_lib.patch_features_flops(teacher.model_cfg)
  flops = flops_lib.tokenizer_step_flops(tok_cfg, int(config.batch_size), teacher_flops)
  return objective, tx, schedule, teacher, shardings, flops


def plan_job(config, mesh) -> loop.Job:
  """The job of `config` without data or weights, for compiling its step ahead of time
  (`beit3_jax.plan`): the teacher as ShapeDtypeStructs (its config.json is read, or without
  teacher.path its teacher.variant is built), one batch of images as shapes."""
  objective, tx, schedule, teacher, shardings, flops = _step_parts(config, mesh, planning=True)
  frozen, frozen_shardings = {}, {}
  if teacher.kind != 'pixel':
    frozen = {'teacher': jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        teacher.abstract_params(), shardings)}
    frozen_shardings = {'teacher': shardings}
  b, size = int(config.batch_size), config.tokenizer.input_size
  n = (size // config.tokenizer.patch_size) ** 2
  return loop.Job(objective=objective, tx=tx, schedule=schedule, train_data=None,
                  eval_data=None, frozen=frozen, frozen_shardings=frozen_shardings,
                  flops_per_step=flops, examples_per_step=b, tokens_per_step=b * n,
                  abstract_batch={'image': {'image': jax.ShapeDtypeStruct((b, size, size, 3),
                                                                          np.uint8)}})


def build_job(config, output: str | None = None) -> loop.Job:
  tok_cfg = config.tokenizer
  d = config.data
  tfds_dir, names, _ = builtin_lib.resolve_names(
      {'image': d.image}, d.data_dir or None, d.builtin_image_size)
  mesh = sharding_lib.make_mesh(config.mesh_shape)
  objective, tx, schedule, teacher, shardings, flops = _step_parts(config, mesh)
  frozen, frozen_shardings = {}, {}
  if teacher.kind != 'pixel':
    params = teacher.load(config.teacher.path)
    frozen = {'teacher': jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params,
                                      shardings)}
    frozen_shardings = {'teacher': shardings}
  train_data = _data(config, open_split(names['image'], d.train_split, 'data.train_split',
                                        tfds_dir), config.seed)
  eval_data = None
  if config.eval_every:
    eval_source = open_split(names['image'], d.eval_split, 'data.eval_split', tfds_dir)
    eval_data = lambda: _data(config, eval_source, config.seed + 1, train=False)  # noqa: E731
  n = (tok_cfg.input_size // tok_cfg.patch_size) ** 2
  out = output or config.output

  def on_finish(state, workdir):
    path = out or str(epath.Path(workdir) / 'tokenizer')
    if jax.process_index() == 0:
      params_io.save_params(path, jax.device_get(state.params), tok_cfg, kind='vqkd',
                            overwrite=True, extra={'vq_stats': jax.device_get(
                                state.extra['vq_stats'])})
    print(f'Exported the visual tokenizer to {path}')

  return loop.Job(
      objective=objective, tx=tx, schedule=schedule, train_data=train_data, eval_data=eval_data,
      frozen=frozen, frozen_shardings=frozen_shardings,
      flops_per_step=flops,
      examples_per_step=int(config.batch_size), tokens_per_step=int(config.batch_size) * n,
      describe=[f'VQ-KD: {tok_cfg.input_size}px/{tok_cfg.patch_size} D={tok_cfg.embed_dim} '
                f'depth={tok_cfg.depth}, {tok_cfg.n_embed} codes x {tok_cfg.code_dim}, decoder '
                f'depth {tok_cfg.decoder_depth} -> {tok_cfg.decoder_out_dim}; teacher '
                f'{teacher.kind}',
                f'Data: {names["image"]} x{config.batch_size} (TFDS dir {tfds_dir})'],
      on_finish=on_finish)


def run(config, workdir, output: str | None = None) -> dict:
  return loop.train(config, workdir, build_job(config, output))


def run_dir_of(output: str) -> str:
  """Where the run (checkpoints, metrics) of a tokenizer trained into `output` goes."""
  return output.rstrip('/') + '_run'


def load_config_file(config_file: str):
  """The config of a tokenizer config file (`path.py[:arg]`), its fields checked."""
  config = defaults.load_config_file(config_file)
  job = config.job if 'job' in config else None
  if job != 'tokenizer':
    raise ConfigError(f'{config_file} is a config of the {job} job, not of the tokenizer job.')
  check_fields(config, source=config_file)
  return config


def train_into(config, *, output: str, data_dir: str = '') -> dict:
  """Trains the tokenizer of `config` into params directory `output` (the run's checkpoints
  and metrics go to `run_dir_of(output)`), as `python -m beit3_jax.main --config=FILE
  --workdir=<output>_run --config.output=<output>` does."""
  if data_dir:
    with config.unlocked():
      config.data.data_dir = data_dir
  workdir = run_dir_of(output)
  save_run_config(config, workdir)
  return run(config, workdir, output)


def train_from_file(config_file: str, *, output: str, data_dir: str = '') -> dict:
  """Trains the tokenizer of a config file (`path.py[:arg]`) into params directory `output`
  (the run's checkpoints and metrics go to `output` + '_run')."""
  return train_into(load_config_file(config_file), output=output, data_dir=data_dir)

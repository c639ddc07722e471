"""The entry point: `python -m beit3_jax.main --config=configs/<job>.py --workdir=DIR`.

Flags: `--config` is an ml_collections config file; any field can be overridden on the command
line (`--config.seed=1`, `--config.model.img_size=384`). The job is chosen by `config.job`.

On a multi-host TPU slice every host runs the same command (launch/tpu_pod.sh sets
BEIT3_JAX_DISTRIBUTED=1); `jax.distributed.initialize()` is called first whenever more than one
process is detected (see `maybe_initialize_distributed`).

Jobs (`config.job`):
- `pretrain` (configs/pretrain/demo.py, base.py, large.py, giant.py): BEiT-3 masked data
  modeling; resumes from the newest checkpoint in the workdir (`beit3_jax.train.pretrain`).
- `tokenizer` (configs/pretrain/tokenizer_*.py): train a VQ-KD visual tokenizer
  (`beit3_jax.train.tokenizer_training`); exports it to `<workdir>/tokenizer`.
- `smoke`: build the backbone (params born sharded over the mesh of `config.mesh_shape`),
  encode a generated image and a sentence in the three routing modes, print the shapes and the
  parameter count, and write `smoke_summary.json` (and the run's `config.json`) to the workdir.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from beit3_jax.train.run_config import save_run_config  # noqa: F401 (used below)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the run\'s outputs.')

JOBS = ('pretrain', 'tokenizer', 'finetune', 'smoke')


def synthetic_image(size: int):
  """A (size, size, 3) float32 RGB picture in [0, 1]: a large red disc and a small blue square
  on a grey gradient (deterministic; no data download)."""
  import numpy as np
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  image = np.stack([0.4 + 0.2 * yy, 0.4 + 0.2 * xx, 0.5 * np.ones_like(xx)], axis=-1)
  disc = (yy - 0.5) ** 2 + (xx - 0.3) ** 2 < 0.2 ** 2
  image[disc] = (0.9, 0.1, 0.1)
  square = (np.abs(yy - 0.5) < 0.08) & (np.abs(xx - 0.75) < 0.08)
  image[square] = (0.1, 0.2, 0.9)
  return image


def byte_token_ids(sentence: str, vocab_size: int):
  """<s> + one id per UTF-8 byte + </s> in the XLM-R layout (bos 0, eos 2, pieces from 3).

  Only for the smoke job, which runs before a SentencePiece model exists; real text goes
  through the project's SentencePiece tokenizer.
  """
  ids = [0] + [3 + b % (vocab_size - 3) for b in sentence.encode('utf-8')] + [2]
  return ids


def run_smoke(config, workdir: str | None) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from beit3_jax import models, sharding

  cfg = config.model
  devices = jax.devices()
  mesh = sharding.make_mesh(config.mesh_shape)
  print(f'Devices: {len(devices)} x {devices[0].platform}; mesh {dict(mesh.shape)}')
  print(f'Model: {cfg.variant} (D={cfg.embed_dim}, {cfg.depth} layers, {cfg.num_heads} heads, '
        f'F={cfg.mlp_dim}, {cfg.img_size}px, patch {cfg.patch_size}, dtype {cfg.dtype})')

  model = models.BEiT3(cfg)
  example = models.example_inputs(cfg, batch_size=1)
  steps = ['init params (born sharded)', 'image only', 'text only', 'image + text']
  t0 = time.perf_counter()

  def progress(i, what, started):
    print(f'[{i}/{len(steps)}] {what:28s} {time.perf_counter() - started:6.1f} s', flush=True)

  started = time.perf_counter()
  params = sharding.init_sharded(lambda r: model.init(r, **example)['params'], mesh,
                                 jax.random.key(config.seed))
  jax.block_until_ready(params)
  n_params = models.count_params(params)
  progress(1, steps[0], started)

  batch = config.batch_size
  image = synthetic_image(cfg.img_size)
  images = jnp.asarray(np.broadcast_to((image - 0.5) / 0.5, (batch,) + image.shape))
  ids = byte_token_ids(config.sentence, cfg.vocab_size)[:cfg.max_text_positions - 2]
  text_ids = jnp.asarray(np.tile(np.asarray(ids, np.int32), (batch, 1)))
  forward = jax.jit(lambda p, a: model.apply({'params': p}, **a))
  results = {}
  with sharding.use_mesh(mesh):
    for i, (name, inputs) in enumerate([
        ('image', dict(images=images)),
        ('text', dict(text_ids=text_ids)),
        ('image+text', dict(images=images, text_ids=text_ids))], start=2):
      started = time.perf_counter()
      out = forward(params, inputs)
      encoder_out = jax.block_until_ready(out['encoder_out'])
      progress(i, steps[i - 1], started)
      results[name] = dict(encoder_out_shape=list(encoder_out.shape),
                           split_position=int(out['split_position']),
                           mean_abs=float(jnp.mean(jnp.abs(encoder_out))),
                           finite=bool(jnp.isfinite(encoder_out).all()))

  summary = dict(variant=cfg.variant, num_params=n_params, devices=len(devices),
                 mesh=dict(mesh.shape), sentence=config.sentence, num_text_tokens=len(ids),
                 seconds=round(time.perf_counter() - t0, 2), outputs=results)
  print(f'Parameters: {n_params:,}')
  for name, r in results.items():
    print(f'  {name:11s} encoder_out {tuple(r["encoder_out_shape"])}  '
          f'split_position {r["split_position"]:4d}  mean|x| {r["mean_abs"]:.4f}')
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'smoke_summary.json')
    with open(path, 'w') as f:
      json.dump(summary, f, indent=2)
    print(f'Wrote the summary to {os.path.abspath(path)}')
  return summary


def _multi_process_env() -> bool:
  env = os.environ
  if env.get('BEIT3_JAX_DISTRIBUTED') == '1' or env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return True
  return any(int(env.get(k, '1') or 1) > 1 for k in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when more than one process is detected.

  Detected: BEIT3_JAX_DISTRIBUTED=1 (launch/tpu_pod.sh), a multi-host TPU slice
  (TPU_WORKER_HOSTNAMES lists several hosts), SLURM or Open MPI with several tasks, or an
  explicit JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID (e.g. several
  CPU processes on one machine).
  """
  if not _multi_process_env():
    return False
  import jax
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()
  return True


def run_training(job: str, config, workdir: str) -> dict:
  if not workdir:
    raise app.UsageError(f'The {job} job needs --workdir.')
  if job == 'pretrain':
    from beit3_jax.train import pretrain
    result = pretrain.run(config, workdir)
  elif job == 'finetune':
    from beit3_jax.train import finetune
    result = finetune.run(config, workdir)
  else:
    from beit3_jax.train import tokenizer_training
    result = tokenizer_training.run(config, workdir)
  train, val = result['train'], result['val']
  shown = ('accuracy', 'usage', 'rec_loss', 'cider', 'bleu4', '_r1', 'r_mean')
  head = ('Evaluated' if config.get('mode', 'train') == 'eval'
          else f'Finished: loss {train.get("loss", float("nan")):.4f}')
  print(head + ''.join(f'; val {k} {v:.4f}' for k, v in sorted(val.items())
                       if any(s in k for s in shown)))
  print(f'Checkpoints: {result["checkpoints"]}')
  print(f'Metrics:     {result["metrics"]} (TensorBoard: {result["tensorboard"]})')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/smoke.py')
  job = config.get('job')
  if job not in JOBS:
    raise app.UsageError(f'config.job={job!r}; known jobs: {JOBS}.')
  workdir = _WORKDIR.value
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  maybe_initialize_distributed()
  if workdir and '://' not in workdir:
    workdir = os.path.abspath(workdir)
  print(f'Job: {job}; config {flags.FLAGS["config"].config_filename}; '
        f'workdir {workdir or "(none)"}')
  if workdir and config.get('mode', 'train') == 'eval':
    # Evaluation reads a run (or init_from) and adds val/ rows to its metrics; the run's own
    # config.json stays as it is.
    print(f'Evaluating with this config (mode=eval; {workdir}/config.json is left as it is)')
  elif workdir:
    print(f'Saved the config to {save_run_config(config, workdir)}')
  if job == 'smoke':
    run_smoke(config, workdir)
  else:
    run_training(job, config, workdir)
  return 0


if __name__ == '__main__':
  sys.exit(app.run(main))

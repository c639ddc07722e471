"""The `smoke` job (configs/smoke.py): build the backbone (params born sharded over the mesh of
`config.mesh_shape`), encode a generated image and a sentence in the three routing modes,
print the shapes and the parameter count, and write `smoke_summary.json` to the workdir.

No data, tokenizer or checkpoint is read: the image is drawn (`synthetic_image`) and the text
is one id per UTF-8 byte (`byte_token_ids`).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from beit3_jax import models, sharding


def synthetic_image(size: int) -> np.ndarray:
  """A (size, size, 3) float32 RGB picture in [0, 1]: a large red disc and a small blue square
  on a grey gradient (deterministic; no data download)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  image = np.stack([0.4 + 0.2 * yy, 0.4 + 0.2 * xx, 0.5 * np.ones_like(xx)], axis=-1)
  disc = (yy - 0.5) ** 2 + (xx - 0.3) ** 2 < 0.2 ** 2
  image[disc] = (0.9, 0.1, 0.1)
  square = (np.abs(yy - 0.5) < 0.08) & (np.abs(xx - 0.75) < 0.08)
  image[square] = (0.1, 0.2, 0.9)
  return image


def byte_token_ids(sentence: str, vocab_size: int) -> list[int]:
  """<s> + one id per UTF-8 byte + </s> in the XLM-R layout (bos 0, eos 2, pieces from 3).

  Only for the smoke job, which runs before a SentencePiece model exists; real text goes
  through the project's SentencePiece tokenizer.
  """
  ids = [0] + [3 + b % (vocab_size - 3) for b in sentence.encode('utf-8')] + [2]
  return ids


def run(config, workdir: str | None) -> dict:
  """Runs the smoke job of `config` (see the module doc); returns the summary it writes."""
  import jax
  import jax.numpy as jnp


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

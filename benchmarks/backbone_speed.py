"""Speed of the BEiT-3 backbone: a forward and a full training step, JAX vs torchscale, on CPU.

What it measures (the defaults are the workload of an earlier measurement of ours on an AMD
Zen 5 machine, which timed a JAX BEiT-3 train step against torchscale 0.3.0's BEiT3):

  BEiT-3 `--variant base` (beit3_jax.models.get_config), `--batch 4` pairs of one 224x224 image
  (1 CLS + 196 patches = 197 tokens) and `--text_len 64` text tokens (S = 261, 1044 tokens a
  step), fp32, a Linear(D, vocab_size=64010) head with softmax cross-entropy on the text
  positions, AdamW (lr 1e-4, weight decay 1e-4, the optax.adamw defaults otherwise; torch's
  AdamW gets the same hyper-parameters).

  mode 'forward': the loss (backbone + head + cross-entropy) without gradients: a jitted
    `model.apply` (JAX) / `torch.no_grad()` in eval mode (torch).
  mode 'train':   one full step: loss, gradients and the AdamW update. JAX: one jitted function
    (`jax.value_and_grad` + `optax` update) with the train state donated. torch: eager
    zero_grad / forward / backward / `optimizer.step()` in train mode.

  Both frameworks start from the same weights: the torchscale model (unilm's init) is built
  first and converted with `beit3_jax.convert.torch_to_flax`; the head is copied. The forward
  losses of the two are printed side by side as a check. Without torch (`--no_torch`, or
  torchscale not importable) JAX uses `beit3_jax.models.init_params`.

  Every mode runs `--warmup` untimed calls (the first is reported as "first s"), then `--steps`
  timed calls: median and min are reported. "compile s" is JAX's trace (`jit.lower`) + XLA
  compile (`.compile()`), done ahead of time, so no call below includes compilation; torch runs
  eagerly (no compile). Everything is synchronised with `block_until_ready` (JAX); torch on
  CPU is synchronous.

Analytic FLOP count (matmuls only; biases, norms, softmax, GELU and AdamW are not counted):

  per token, each layer routes the token through ONE expert of each Multiway module, so the
  matmul parameters a token uses are N = depth * (4 D^2 + 2 D F)   (q, k, v, out; fc1, fc2);
  the patch embedding and the embedding tables are left out (< 0.5 % at base).
  With B pairs, S = 1 + N_p + T_text tokens a pair, T = B * S tokens a step:

    forward = 2 N T  +  4 depth B S^2 D  +  2 D V B T_text     (linears, QK^T and AV, head)
    train   = 3 x forward = 6 N T + 12 depth B S^2 D + 6 D V B T_text

  Base at the defaults: 532 + 30 + 75 = 638 GFLOP a train step, 213 GFLOP a forward (the
  earlier AMD Zen 5 measurement estimated about 637 GFLOP). GFLOP/s = that count / median
  seconds.

Floor of the JAX step (skip with `--no_floor`; ~15-30 s at base): the time the step's matmuls
alone would take at the rate XLA reaches on them on this machine, measured in the same run.

  Every dot_general of the traced forward and train step (`jit(...).trace(...).jaxpr`, nested
  jaxprs included) is listed with its (batch, M, K, N) and dtypes: the Multiway Linears as
  expert A on the B (1 + N_p) image tokens and expert B on the B T text tokens, the attention
  core's batched q k^T and p v (batch B H), the head, the patch embedding, and, for each
  forward matmul, the backward's dX and dW (dp, dq, dk, dv for the attention core; no dX for
  the patch embedding, whose input is the images). The list is checked against an
  enumeration written out from the model code (`hand_matmuls`; a matmul and its transpose
  count as one shape). Each distinct shape is then timed alone as a jitted
  (batch, M, K) x (batch, K, N) `lax.dot_general` in its dtypes, warm; its time is the fastest
  of 7 samples of >= 100 ms each (the rate XLA reaches on that shape: a floor, so a sample slowed
  by another process must not raise it), and

    floor = sum over shapes of count x seconds per call,   measured / floor = median / floor.

  The table gives each shape's count in the train step and the forward, GFLOP and ms per call,
  its GFLOP/s, its seconds in the train floor and their share, and the matmuls it stands for
  (A/B expert, fwd/dX/dW). The sum of matmul FLOPs is compared with the analytic count: it is
  larger by the patch embedding (forward + dW, 1.85 GFLOP at base), which the analytic count
  leaves out; XLA's cost_analysis counts a further ~10 GFLOP of elementwise work.

Also printed: parameter counts, devices, whether GLIBC_TUNABLES is set, XLA's
`compiled.memory_analysis()` of the JAX train step (argument / output / alias / temp bytes)
and the process's peak RSS (`resource.getrusage`, monotone: the value after the JAX phase is
the JAX peak, the final one is the max over both frameworks).

Run (from the repository root):

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/backbone_speed.py
    .venv/bin/python benchmarks/backbone_speed.py --variant small --steps 3 --warmup 1  # quick

Set `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for the best JAX CPU speed: XLA:CPU mmaps its
temporaries afresh every step, and with transparent huge pages the page faults drop tenfold
(-19 to -21 % per JAX train step in an earlier measurement on an AMD Zen 5 machine; no effect
on torch). It must be set before the process starts; the script prints whether it is.

What to expect on our 2-core CPU machines, base, batch 4, fp32. An earlier measurement of
ours on a 2-core AMD Zen 5 host: torchscale ~4.2 s a train step and ~1.25 s a forward, peak
RSS 5.65 GiB; a tuned JAX step 2.08 s, a plain first JAX port 3.30 s.

On a 2-core AMD EPYC KVM guest on 2026-12-07 (quiet, hugetlb=1), two runs: JAX train 4.63-4.72
s, forward 1.43-1.59 s; torch train 5.84-6.12 s, forward 1.50-1.76 s; the floor 3.47 s (train)
and 1.16 s (forward), so JAX's step is 1.33x its floor and torch's 1.76x.

Measured with this script on 2026-11-28 (jax
0.10.2, torch 2.13.0) on a 2-core *Intel Xeon* KVM guest (AVX-512/AMX; a 2048^3 fp32 matmul
runs at ~270 GFLOP/s in XLA and ~290 in torch/MKL there), three full runs back to back:

    JAX   train 5.0-6.6 s median (100-125 GFLOP/s), forward 1.4-1.7 s, compile 15-19 s (trace ~4 s)
    torch train 5.2-5.4 s median (~120 GFLOP/s),    forward 1.3-2.0 s
    JAX/torch train 0.96-1.25x; peak RSS 6.9 GiB JAX alone, 9.0 GiB with both models alive.

Neither the host (Intel, where torch's MKL is fast) nor the model (beit3_jax's plain port:
3-D dot_generals, no custom VJPs) is the setup of that earlier AMD measurement, and its 2x
over torch does not show here. GLIBC_TUNABLES=...hugetlb=1 made no difference that the noise
(+-20 % between identical runs) could show on this host (THP `madvise`). Full table:
benchmarks/README.md.

The "cpu/wall" column (process CPU s / wall s over the timed calls) and the load averages
show whether another process took a core. With the cores free: torch rows 1.9-2.0, the JAX
train step ~1.9, the JAX forward 1.5-1.8 (XLA leaves one core idle part of the time). A row
clearly below that was contended: discard it (two torch threads sharing one core ran a small
train step 27x slower).

These machines are noisy (a matmul probe ranged 70-220 GFLOP/s): compare only figures from one
run of this script, which measures both frameworks back to back.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

# This benchmark is about the CPU: without this, an installed libtpu is probed for a TPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The torchscale reference helper lives with the tests (it imports torchscale without timm's
# data package, which fails on the CPU torch); reuse it rather than copy it.
sys.path.insert(0, os.path.join(REPO, 'tests'))

GIB = 1024 ** 3


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', default='base', help='base, large, giant or small (default base)')
  p.add_argument('--batch', type=int, default=4, help='image + text pairs a step (default 4)')
  p.add_argument('--text_len', type=int, default=64, help='text tokens a pair (default 64)')
  p.add_argument('--steps', type=int, default=5, help='timed calls a mode (default 5)')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls first (default 2)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='JAX compute dtype (the config dtype; params stay fp32). torch: fp32.')
  p.add_argument('--lr', type=float, default=1e-4)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no_torch', action='store_true', help='skip the torchscale measurements')
  p.add_argument('--no_jax', action='store_true', help='skip the JAX measurements')
  p.add_argument('--no_floor', action='store_true',
                 help='skip the matmul floor of the JAX step (times every distinct matmul '
                      'shape of the step; ~20-40 s at base)')
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- helpers


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def load_average() -> str:
  try:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return 'unknown'


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def analytic_gflop(cfg, batch: int, text_len: int) -> dict[str, float]:
  """Matmul GFLOP of one forward and one train step (formula in the module docstring)."""
  d, f, depth, vocab = cfg.embed_dim, cfg.mlp_dim, cfg.depth, cfg.vocab_size
  s = 1 + (cfg.img_size // cfg.patch_size) ** 2 + text_len
  tokens = batch * s
  n_lin = depth * (4 * d * d + 2 * d * f)
  linears = 2 * n_lin * tokens
  attention = 4 * depth * batch * s * s * d
  head = 2 * d * vocab * batch * text_len
  fwd = linears + attention + head
  return {'forward': fwd / 1e9, 'train': 3 * fwd / 1e9,
          'train_linears': 3 * linears / 1e9, 'train_attention': 3 * attention / 1e9,
          'train_head': 3 * head / 1e9}


def run_timed(call, warmup: int, steps: int):
  """(first call s, [timed call s], process CPU s / wall s over the timed calls).

  `call` must block until its result is ready. cpu/wall near os.cpu_count() means this process
  had the cores to itself; well below it, something else ran (or the work was serial).
  """
  first = None
  for i in range(warmup):
    t = time.perf_counter()
    call()
    if i == 0:
      first = time.perf_counter() - t
  times = []
  cpu0 = _cpu_seconds()
  for _ in range(steps):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
  cpu_per_wall = (_cpu_seconds() - cpu0) / sum(times) if times else None
  return first, times, cpu_per_wall


def _cpu_seconds() -> float:
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return ru.ru_utime + ru.ru_stime


def make_batch(cfg, batch: int, text_len: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      'images': rng.standard_normal((batch, cfg.img_size, cfg.img_size, cfg.in_chans),
                                    dtype=np.float32),  # NHWC
      'text_ids': rng.integers(0, cfg.vocab_size, (batch, text_len)).astype(np.int32),
      'labels': rng.integers(0, cfg.vocab_size, (batch, text_len)).astype(np.int32),
  }


# ----------------------------------------------------------------------------- torch


def build_torch(cfg, seed: int):
  """(torchscale BEiT3, head Linear(D, V)) or None with the reason when torch is unusable."""
  try:
    import torch
    import torchscale_ref
    torchscale_ref.import_torchscale()
  except Exception as e:  # noqa: BLE001 - any import failure just skips torch
    return None, f'{type(e).__name__}: {e}'
  torch.set_num_threads(os.cpu_count())
  model = torchscale_ref.build_reference(cfg, seed=seed, init='unilm')
  torch.manual_seed(seed + 1)
  head = torch.nn.Linear(cfg.embed_dim, cfg.vocab_size)
  return (model, head), None


def bench_torch(cfg, model, head, batch_np, args, rows, losses):
  import torch
  import torch.nn.functional as F
  imgs = torch.from_numpy(np.ascontiguousarray(batch_np['images'].transpose(0, 3, 1, 2)))
  ids = torch.from_numpy(batch_np['text_ids'].astype(np.int64))
  labels = torch.from_numpy(batch_np['labels'].astype(np.int64)).reshape(-1)
  t_len = args.text_len

  def loss_fn():
    out = model(textual_tokens=ids, visual_tokens=imgs)['encoder_out']
    logits = head(out[:, -t_len:])
    return F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels)

  model.eval()
  head.eval()

  def forward():
    with torch.no_grad():
      losses['torch'] = float(loss_fn())

  first, times, cpw = run_timed(forward, args.warmup, args.steps)
  rows.append(('torch', 'forward', None, first, times, cpw))

  model.train()
  head.train()
  opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=args.lr,
                          betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)

  def train():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()

  first, times, cpw = run_timed(train, args.warmup, args.steps)
  rows.append(('torch', 'train', None, first, times, cpw))
  del opt


# ----------------------------------------------------------------------------- JAX


def bench_jax(cfg, backbone_np, head_np, batch_np, args, rows, losses, info):
  import jax
  import jax.numpy as jnp
  import optax

  from beit3_jax import models

  model = models.BEiT3(cfg)
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  t_len = args.text_len
  if backbone_np is None:
    backbone = models.init_params(cfg, jax.random.key(args.seed))
  else:
    backbone = jax.tree.map(jnp.asarray, backbone_np)
  if head_np is None:
    k = jax.random.key(args.seed + 1)
    head_np = {'kernel': 0.02 * jax.random.normal(k, (cfg.embed_dim, cfg.vocab_size)),
               'bias': jnp.zeros((cfg.vocab_size,))}
  params = {'backbone': backbone, 'head': jax.tree.map(jnp.asarray, head_np)}
  batch = jax.tree.map(jnp.asarray, batch_np)
  info['jax_params'] = models.count_params(params['backbone'])

  def loss_fn(p, b):
    out = model.apply({'params': p['backbone']}, text_ids=b['text_ids'],
                      images=b['images'])['encoder_out']
    text = out[:, -t_len:, :].astype(dtype)
    logits = text @ p['head']['kernel'].astype(dtype) + p['head']['bias'].astype(dtype)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), b['labels']).mean()

  # (a) forward only.
  t0 = time.perf_counter()
  traced = jax.jit(loss_fn).trace(params, batch)
  lowered = traced.lower()
  t1 = time.perf_counter()
  info['jax_forward_matmuls'] = traced_matmuls(traced.jaxpr)
  del traced
  fwd = lowered.compile()
  t2 = time.perf_counter()
  info['jax_forward_trace_s'] = t1 - t0

  def forward():
    losses['jax'] = float(jax.block_until_ready(fwd(params, batch)))

  first, times, cpw = run_timed(forward, args.warmup, args.steps)
  rows.append(('jax', 'forward', t2 - t0, first, times, cpw))
  del fwd, lowered

  # (b) full train step, state donated.
  tx = optax.adamw(args.lr)

  def train_step(state, b):
    p, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  state = (params, tx.init(params))
  del params, backbone
  t0 = time.perf_counter()
  traced = jax.jit(train_step, donate_argnums=0).trace(state, batch)
  lowered = traced.lower()
  t1 = time.perf_counter()
  info['jax_train_matmuls'] = traced_matmuls(traced.jaxpr)
  del traced
  step = lowered.compile()
  t2 = time.perf_counter()
  info['jax_train_trace_s'] = t1 - t0
  try:
    info['jax_train_memory'] = step.memory_analysis()
  except Exception as e:  # noqa: BLE001 - not every backend implements it
    info['jax_train_memory'] = f'unavailable ({type(e).__name__})'
  try:
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    info['jax_train_xla_gflop'] = float(cost['flops']) / 1e9
  except Exception:  # noqa: BLE001 - optional
    pass
  holder = [state]
  del state

  def train():
    holder[0], loss = step(holder[0], batch)
    jax.block_until_ready((holder[0], loss))

  first, times, cpw = run_timed(train, args.warmup, args.steps)
  rows.append(('jax', 'train', t2 - t0, first, times, cpw))
  del holder, step, lowered
  gc.collect()


# ----------------------------------------------------------------------------- floor


def _subjaxprs(params):
  """(jaxpr, multiplicity) of the sub-jaxprs in an equation's params (scan bodies x length)."""
  length = params.get('length', 1)
  for value in params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      inner = getattr(v, 'jaxpr', v)          # ClosedJaxpr -> Jaxpr
      if hasattr(inner, 'eqns'):
        yield inner, length


def traced_matmuls(jaxpr, mult: int = 1, out=None):
  """Counter {(batch, M, K, N, lhs dtype, rhs dtype, out dtype): count} of every dot_general
  in a (closed) jaxpr, nested ones included (a scan body counts `length` times).

  A dot_general's operand dims are batch, contracting and free: batch = product of the batch
  dims, K = product of the contracting dims, M = product of the lhs free dims, N = product of
  the rhs free dims. FLOPs = 2 batch M K N."""
  import collections
  out = collections.Counter() if out is None else out
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
      lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
      prod = lambda shape, dims: int(np.prod([shape[i] for i in dims], dtype=np.int64))
      b = prod(lhs.shape, lb)
      k = prod(lhs.shape, lc)
      m = prod(lhs.shape, [i for i in range(lhs.ndim) if i not in lc and i not in lb])
      n = prod(rhs.shape, [i for i in range(rhs.ndim) if i not in rc and i not in rb])
      out_dtype = eqn.outvars[0].aval.dtype
      out[(b, m, k, n, str(lhs.dtype), str(rhs.dtype), str(out_dtype))] += mult
    else:
      for sub, length in _subjaxprs(eqn.params):
        traced_matmuls(sub, mult * length, out)
  return out


def hand_matmuls(cfg, batch: int, text_len: int, train: bool = True):
  """The matmuls of one step written out from the model code, as a check of the traced list:
  (Counter {(batch, M, K, N): count}, {(batch, M, K, N): set of labels}). Released layout only
  (Multiway attention and FFN, no vision-language expert), image + text input.

  A forward Y (M, N) = X (M, K) W (K, N) adds, in the backward, dX = dY W^T: (M, N, K) and
  dW = X^T dY: (K, M, N). Every Multiway Linear runs as expert A on the B (1 + N_p) image
  tokens and expert B on the B T text tokens (`layers.Multiway` slices the sequence). The
  attention core ('xla', batch B H) does q k^T (S, d, S) and p v (S, S, d) forward; dp = dO v^T
  (S, d, S), dv = p^T dO, dq = ds k and dk = ds^T q (all (S, S, d)) backward. The patch
  embedding (a matmul over flattened P x P x C patches) has no dX (the images are inputs);
  the head is Linear(D, V) on the B T text tokens.
  """
  import collections
  d, f, h, depth, vocab = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.depth, cfg.vocab_size
  n_p = (cfg.img_size // cfg.patch_size) ** 2
  s = 1 + n_p + text_len
  count, labels = collections.Counter(), collections.defaultdict(set)

  def add(key, n, label):
    count[key] += n
    labels[key].add(label)

  def linear(name, m, k, n, times=1, dx=True):
    add((1, m, k, n), times, f'{name} fwd')
    if train:
      if dx:
        add((1, m, n, k), times, f'{name} dX')
      add((1, k, m, n), times, f'{name} dW')

  for expert, m in (('A', batch * (1 + n_p)), ('B', batch * text_len)):
    linear(f'{expert} qkvo', m, d, d, 4 * depth)
    linear(f'{expert} fc1', m, d, f, depth)
    linear(f'{expert} fc2', m, f, d, depth)
  bh = batch * h
  add((bh, s, d // h, s), depth, 'qk^T fwd')
  add((bh, s, s, d // h), depth, 'pv fwd')
  if train:
    add((bh, s, d // h, s), depth, 'dp')
    add((bh, s, s, d // h), 3 * depth, 'dv dq dk')
  linear('head', batch * text_len, d, vocab)
  linear('patch', batch * n_p, cfg.patch_size ** 2 * cfg.in_chans, d, dx=False)
  return count, labels


def time_matmul(b, m, k, n, lhs_dtype, rhs_dtype, out_dtype, min_sample_s=0.1, samples=7):
  """(fastest seconds of one jitted `lax.dot_general` (b, M, K) x (b, K, N) -> (b, M, N) (no
  batch dim when b = 1), warm; process CPU s and wall s of the timed samples). A sample runs
  the call enough times back to back to last >= `min_sample_s`; the fastest of `samples`
  samples counts."""
  import jax
  import jax.numpy as jnp
  key = jax.random.key(0)
  ka, kb = jax.random.split(key)
  lhs = jax.random.normal(ka, ((b,) if b > 1 else ()) + (m, k), jnp.float32).astype(lhs_dtype)
  rhs = jax.random.normal(kb, ((b,) if b > 1 else ()) + (k, n), jnp.float32).astype(rhs_dtype)
  dims = (([2], [1]), ([0], [0])) if b > 1 else (([1], [0]), ([], []))
  fn = jax.jit(lambda x, y: jax.lax.dot_general(x, y, dims, preferred_element_type=out_dtype))
  fn = fn.lower(lhs, rhs).compile()
  jax.block_until_ready(fn(lhs, rhs))
  t = time.perf_counter()
  jax.block_until_ready(fn(lhs, rhs))
  one = max(time.perf_counter() - t, 1e-7)
  reps = max(1, min(1000, int(min_sample_s / one)))
  times = []
  cpu0 = _cpu_seconds()
  for _ in range(samples):
    t = time.perf_counter()
    for _ in range(reps):
      r = fn(lhs, rhs)
    jax.block_until_ready(r)
    times.append((time.perf_counter() - t) / reps)
  return min(times), _cpu_seconds() - cpu0, sum(times) * reps


def measure_floor(train_matmuls, forward_matmuls):
  """Times every distinct matmul shape of the step; returns (rows, info). A row: (key, count in
  the train step, count in the forward, GFLOP per call, seconds per call). info: the totals."""
  keys = sorted(set(train_matmuls) | set(forward_matmuls),
                key=lambda k: -train_matmuls.get(k, 0) * 2 * k[0] * k[1] * k[2] * k[3])
  rows = []
  t0, cpu, wall = time.perf_counter(), 0.0, 0.0
  for key in keys:
    b, m, k, n = key[:4]
    gflop = 2 * b * m * k * n / 1e9
    sec, c, w = time_matmul(*key)
    cpu, wall = cpu + c, wall + w
    rows.append((key, train_matmuls.get(key, 0), forward_matmuls.get(key, 0), gflop, sec))
  info = {'wall_s': time.perf_counter() - t0, 'cpu_per_wall': cpu / wall}
  for mode, col in (('train', 1), ('forward', 2)):
    info[f'{mode}_floor_s'] = sum(r[col] * r[4] for r in rows)
    info[f'{mode}_gflop'] = sum(r[col] * r[3] for r in rows)
  return rows, info


# ----------------------------------------------------------------------------- report


def fmt(x, spec='.3f'):
  return '-' if x is None else format(x, spec)


def print_table(rows, gflop, tokens):
  header = ('framework', 'mode', 'compile s', 'first s', 'median s', 'min s', 'tokens/s',
            'GFLOP', 'GFLOP/s', 'cpu/wall')
  lines = []
  for fw, mode, compile_s, first, times, cpw in rows:
    med = statistics.median(times) if times else None
    lo = min(times) if times else None
    lines.append((fw, mode, fmt(compile_s, '.2f'), fmt(first), fmt(med), fmt(lo),
                  fmt(tokens / med if med else None, '.0f'), f'{gflop[mode]:.1f}',
                  fmt(gflop[mode] / med if med else None, '.0f'), fmt(cpw, '.2f')))
  widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
  out = [' | '.join(str(h).ljust(w) for h, w in zip(header, widths))]
  out.append('-+-'.join('-' * w for w in widths))
  out += [' | '.join(str(c).ljust(w) for c, w in zip(r, widths)) for r in lines]
  print('\n'.join(out))
  print()
  by = {(r[0], r[1]): statistics.median(r[4]) for r in rows if r[4]}
  for mode in ('forward', 'train'):
    if ('jax', mode) in by and ('torch', mode) in by:
      print(f'{mode}: jax / torch median time = {by["jax", mode] / by["torch", mode]:.2f}x')


def print_memory(mem):
  if isinstance(mem, str) or mem is None:
    print(f'XLA memory_analysis (jax train step): {mem}')
    return
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  parts = [f'{f.replace("_size_in_bytes", "")} {getattr(mem, f) / GIB:.2f} GiB'
           for f in fields if getattr(mem, f, None) is not None]
  print('XLA memory_analysis (jax train step): ' + ', '.join(parts))


def _canonical(key):
  """(batch, M, K, N) with M <= N: a matmul and its transpose (the same work with the operands
  swapped, as autodiff and einsum often emit it) compare equal."""
  b, m, k, n = key[:4]
  return (b, min(m, n), k, max(m, n))


def _canonical_counter(counter):
  import collections
  out = collections.Counter()
  for key, n in counter.items():
    out[_canonical(key)] += n
  return out


def _short_dtype(name: str) -> str:
  return {'float32': 'f32', 'bfloat16': 'bf16', 'float16': 'f16'}.get(name, name)


def print_floor(floor_rows, finfo, info, rows, gflop, cfg, args):
  """The matmul-floor table, its totals, the check against the hand enumeration and the
  analytic count, and measured / floor."""
  import collections
  hand, labels = hand_matmuls(cfg, args.batch, args.text_len, train=True)
  hand_fwd, _ = hand_matmuls(cfg, args.batch, args.text_len, train=False)
  canon_labels = collections.defaultdict(set)
  for key, names in labels.items():
    canon_labels[_canonical(key)] |= names
  hand, hand_fwd = _canonical_counter(hand), _canonical_counter(hand_fwd)
  header = ('train #', 'fwd #', 'batch', 'M', 'K', 'N', 'dtype', 'GFLOP', 'ms', 'GFLOP/s',
            'train s', 'share', 'what (hand enumeration)')
  total = finfo['train_floor_s']
  lines = []
  for key, n_train, n_fwd, g, sec in floor_rows:
    b, m, k, n, lt, rt, ot = key
    dt = (_short_dtype(lt) if lt == rt == ot
          else f'{_short_dtype(lt)}x{_short_dtype(rt)}->{_short_dtype(ot)}')
    lines.append((str(n_train), str(n_fwd), str(b), str(m), str(k), str(n), dt, f'{g:.3f}',
                  f'{sec * 1e3:.2f}', f'{g / sec:.0f}', f'{n_train * sec:.3f}',
                  f'{100 * n_train * sec / total:.1f}%',
                  ', '.join(sorted(canon_labels.get(_canonical(key), {'?'})))))
  widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
  print(' | '.join(str(h).ljust(w) for h, w in zip(header, widths)))
  print('-+-'.join('-' * w for w in widths))
  for r in lines:
    print(' | '.join(str(c).ljust(w) for c, w in zip(r, widths)))
  print()

  # The traced list against the hand enumeration (shapes and counts; dtypes from the trace).
  for mode, mine in (('train', hand), ('forward', hand_fwd)):
    traced = _canonical_counter(info[f'jax_{mode}_matmuls'])
    if cfg.shared_attention or cfg.num_vl_layers:
      print(f'{mode}: {sum(traced.values())} dot_generals traced (the hand enumeration covers '
            'the released layout only)')
    elif traced == mine:
      print(f'{mode}: the {sum(traced.values())} traced dot_generals ({len(traced)} shapes) '
            'match the hand enumeration')
    else:
      diff = {k: (traced.get(k, 0), mine.get(k, 0)) for k in set(traced) | set(mine)
              if traced.get(k, 0) != mine.get(k, 0)}
      print(f'{mode}: traced dot_generals differ from the hand enumeration, '
            f'(batch, M, K, N): (traced, hand): {diff}')

  n_p = (cfg.img_size // cfg.patch_size) ** 2
  patch = 2 * args.batch * n_p * cfg.patch_size ** 2 * cfg.in_chans * cfg.embed_dim / 1e9
  for mode, n_patch in (('train', 2), ('forward', 1)):
    got = finfo[f'{mode}_gflop']
    rest = got - gflop[mode] - n_patch * patch
    print(f'{mode}: sum of matmul GFLOP {got:.1f} = analytic {gflop[mode]:.1f} + patch '
          f'embedding {n_patch * patch:.2f} (fwd{" + dW" if n_patch == 2 else ""}; the '
          f'analytic count leaves it out) {rest:+.2f} ({100 * (got / gflop[mode] - 1):+.2f} % '
          'in all)')
  if 'jax_train_xla_gflop' in info:
    print(f'XLA cost_analysis counts {info["jax_train_xla_gflop"]:.1f} GFLOP for the train '
          f'step: {info["jax_train_xla_gflop"] - finfo["train_gflop"]:.1f} more than its '
          'matmuls (elementwise work: norms, GELU, softmax, AdamW, ...)')
  by = {(r[0], r[1]): statistics.median(r[4]) for r in rows if r[4]}
  print(f'matmul timing: {len(floor_rows)} shapes in {finfo["wall_s"]:.1f} s (compiles '
        f'included); cpu/wall over the timed calls {finfo["cpu_per_wall"]:.2f}')
  for mode in ('train', 'forward'):
    fl = finfo[f'{mode}_floor_s']
    line = (f'{mode} floor: {fl:.3f} s ({finfo[f"{mode}_gflop"]:.1f} GFLOP at '
            f'{finfo[f"{mode}_gflop"] / fl:.0f} GFLOP/s, the measured rate of its shapes)')
    if ('jax', mode) in by:
      line += f'; JAX median {by["jax", mode]:.3f} s = {by["jax", mode] / fl:.2f}x the floor'
    if ('torch', mode) in by:
      line += f'; torch {by["torch", mode] / fl:.2f}x'
    print(line)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.warmup < 1:
    raise SystemExit('--warmup must be >= 1 (the first call is reported apart).')
  import jax

  from beit3_jax import convert, models

  cfg = models.get_config(args.variant, dtype=args.dtype)
  cfg32 = models.get_config(args.variant)  # torch side and the weight conversion: fp32
  batch_np = make_batch(cfg, args.batch, args.text_len, args.seed)
  s = 1 + models.num_patches(cfg) + args.text_len
  tokens = args.batch * s
  gflop = analytic_gflop(cfg, args.batch, args.text_len)
  head_params = cfg.embed_dim * cfg.vocab_size + cfg.vocab_size

  print(f'BEiT-3 {args.variant}: D={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads} '
        f'F={cfg.mlp_dim} V={cfg.vocab_size}; JAX dtype {args.dtype}, torch float32')
  print(f'batch {args.batch} x ({s - args.text_len} image + {args.text_len} text) = '
        f'{tokens} tokens/step (S={s}); warmup {args.warmup}, steps {args.steps}')
  print(f'jax {jax.__version__} devices {jax.devices()}; CPU: {cpu_name()}, '
        f'os.cpu_count()={os.cpu_count()}')
  print(f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "<unset>")}'
        + ('' if 'hugetlb=1' in os.environ.get('GLIBC_TUNABLES', '')
           else '  (set glibc.malloc.hugetlb=1 for the best JAX CPU speed)')
        + f'; XLA_FLAGS={os.environ.get("XLA_FLAGS", "<unset>")}')
  print(f'load average at start: {load_average()} (another busy process on these 2 cores '
        'skews every figure)')
  print(f'analytic GFLOP: train {gflop["train"]:.1f} (linears {gflop["train_linears"]:.1f}, '
        f'attention {gflop["train_attention"]:.1f}, head {gflop["train_head"]:.1f}), '
        f'forward {gflop["forward"]:.1f}')

  rows, losses, info = [], {}, {}
  torch_parts, why = (None, 'skipped (--no_torch)') if args.no_torch else build_torch(
      cfg32, args.seed)
  backbone_np = head_np = None
  if torch_parts is not None:
    import torch
    model, head = torch_parts
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
          f'torchscale params {sum(p.numel() for p in model.parameters()):,}')
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    backbone_np = convert.torch_to_flax(sd, cfg32)
    head_np = {'kernel': head.weight.detach().numpy().T.copy(),
               'bias': head.bias.detach().numpy().copy()}
    del sd
  else:
    print(f'torch: {why}')
  sys.stdout.flush()

  rss_after_jax = None
  if not args.no_jax:
    bench_jax(cfg, backbone_np, head_np, batch_np, args, rows, losses, info)
    if not args.no_floor:
      print('timing every distinct matmul shape of the JAX step (the floor; --no_floor skips '
            'it) ...')
      sys.stdout.flush()
      info['floor'] = measure_floor(info['jax_train_matmuls'], info['jax_forward_matmuls'])
    rss_after_jax = peak_rss_gib()
    print(f'JAX: backbone params {info["jax_params"]:,} + head {head_params:,} = '
          f'{info["jax_params"] + head_params:,} trained; trace s: forward '
          f'{info["jax_forward_trace_s"]:.2f}, train {info["jax_train_trace_s"]:.2f} '
          f'(included in compile s); peak RSS so far {rss_after_jax:.2f} GiB')
    sys.stdout.flush()
  del backbone_np, head_np
  gc.collect()
  if torch_parts is not None:
    bench_torch(cfg32, *torch_parts, batch_np, args, rows, losses)

  print()
  print_table(rows, gflop, tokens)
  if losses:
    print('forward loss on the initial weights: '
          + ', '.join(f'{k} {v:.6f}' for k, v in losses.items()))
  if 'jax_train_xla_gflop' in info:
    print(f'XLA cost_analysis of the jax train step: {info["jax_train_xla_gflop"]:.1f} GFLOP '
          f'(analytic {gflop["train"]:.1f})')
  if 'jax_train_memory' in info:
    print_memory(info['jax_train_memory'])
  if 'floor' in info:
    print()
    print('Floor of the JAX step: every matmul (dot_general) of the traced step, timed alone as '
          'a jitted (batch, M, K) x (batch, K, N) lax.dot_general in its dtypes (fastest of 7 '
          'samples, warm):')
    print_floor(*info['floor'], info, rows, gflop, cfg, args)
    print()
  if rss_after_jax is not None:
    print(f'peak RSS after the JAX phase: {rss_after_jax:.2f} GiB'
          + ('' if torch_parts is None else ' (the torch model and its weights were alive too)'))
  print(f'peak RSS of the process (max over all phases): {peak_rss_gib():.2f} GiB')
  print(f'load average at the end: {load_average()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Roofline of one BEiT-3 encoder layer on one TPU v5p chip: where its HBM bytes come from.

The planner (`python -m beit3_jax.plan`) reads the FLOPs and bytes of the whole train step;
this script takes ONE encoder layer apart. Everything is compiled ahead of time by XLA's real
TPU compiler (libtpu; no TPU needed) for a single v5p chip (a one-device mesh of the
`v5p:2x2x1` topology, with the trainer's axis names) and read from `compiled.cost_analysis()`
('flops', 'bytes accessed') and `compiled.memory_analysis()` (temporaries). Nothing runs.

Every measured function is the *training work* of its piece, as the trainer does it per layer:
`jax.value_and_grad` (w.r.t. the parameters and the input activations) of the scalar
sum(y * g), where y is the piece's output and g a cotangent passed in as an argument (so the
backward pass reads a real incoming gradient, as in the scanned layer stack). The piece is
wrapped in `jax.checkpoint(policy=REMAT_POLICIES[--remat])` (default 'full', the trainer's
`remat=True`) with `prevent_cse=True`: in the trainer the forward and the rematerialised
forward sit in different loops (`nn.scan`), so XLA cannot merge them; compiled standalone it
would, unless told not to. Parameters come in as float32 (the trainer keeps them so; every use
casts to bfloat16), activations and cotangents as bfloat16 (`dtype='bfloat16'`). Drop path is
on (`deterministic=False`, `--drop_path_rate`) and the layer index is a traced int32 scalar,
as in the scan. Parameters of Multiway experts a stream does not route through (text tokens
never reach expert A) are passed but not differentiated: their gradients are zeros. The
trainer's per-stream backward scans probably write them all the same (differentiating every
parameter made a giant text layer 0.07 GB larger), but they are not the layer's work.

Streams (per chip, `--batch` examples each; the pretraining step runs all three):
  image    B x (1 + N_p) tokens, every token through expert A (split -1), no padding
  text     B x L tokens, expert B (split 0), key padding
  pair     B x (1 + N_p + L) tokens, A on the image part, B on the text part (split 1 + N_p)
  pair_vl  the pair stream in a top layer that owns the vision-language FFN expert C (only
           variants with `num_vl_layers`, e.g. giant)

Sections (`--sections`, default all but prototypes):
  layer       (a) `EncoderLayer` as a whole, per stream, and the breakdown of its HBM bytes
              (below).
  pieces      (b) its pieces, each compiled alone: the pre-attention LayerNorm, the attention
              sublayer (`Attention`: projections, core, inner LayerNorm, out projection), the
              pre-FFN LayerNorm, the FFN (`FeedForward` experts as the layer routes them) and
              the two residual + drop-path adds (one compiled, counted twice). They do not add
              up exactly to the layer: in the layer XLA fuses across their boundaries, alone
              each pays its own input and output round trip.
  core        (c) the attention core alone, `dot_product_attention` 'xla' and 'splash'
              (q, k, v (B, S, H, d) bfloat16, key padding as the stream has it).
  matmuls     (d) the layer's dot_generals alone, bfloat16 operands and outputs, no bias, no
              cast: q/k/v/out projections, fc1 and fc2 per expert, q.k^T and p.v, each compiled
              as its forward (x . w) and its backward (dx, dw) and counted as the remat policy
              runs it (forward twice under remat, then the backward): the ideal a layer could
              reach. The row without q.k^T and p.v is the ideal with flash attention (no S^2
              tensor in HBM at all).
  prototypes  the whole layer again with one change (`PROTOTYPES`), patched into this
              process while tracing (the package is not edited): bfloat16 LayerNorm / GELU /
              softmax / parameters, splash attention, no remat, one expert for the pair, and
              all streams fused into one layer call (`_FusedStreamsLayer`).

Table columns: GFLOP and GB as XLA's TPU cost model counts them, FLOP/byte, roofline ms =
max(FLOP / 459e12, bytes / 2.765e12) (v5p, `beit3_jax.chips`), the bound, the share of the
whole layer's bytes for that stream, and the compiled program's temporaries. The cost model's
'bytes accessed' is what the planner's roofline uses. It counts every operand and output of
every fusion, including buffers XLA keeps on chip (prefetched into memory space S(1)), plus
the re-reads its tiling implies: a matmul with a few thousand tokens is charged 2-4x its
operands (a bf16 (2056, 1408) x (1408, 6144) matmul: 118 MB for 48 MB of operands and
output; an 8192^3 one: 1.0x). Pallas kernels (splash) report no FLOPs, and as bytes their
operands and outputs once.

HBM breakdown of each whole layer: its optimized HLO, every top-level instruction counted as
its operands + outputs at their logical sizes, only those in HBM (on-chip S(1) buffers left
out; the copy that prefetches one counts its HBM source), no re-reads; get-tuple-element,
bitcast, parameter, tuple and constant cost nothing. A lower bound on the HBM traffic (the
cost model's number is the upper end), grouped by pass (forward / rematerialised forward /
backward, from op_name metadata), kind (matmul fusion, LayerNorm, GELU, softmax, copy...),
module, with the largest instructions listed.

Whole model: a plain layer's image + text + pair x (depth - num_vl_layers) + image + text +
pair_vl x num_vl_layers. The planner's whole step holds more: embeddings, heads, the visual
tokenizer, the optimizer, FSDP's gathered parameters, the idle experts' zero gradients.

Compiling is slow: XLA:TPU generates code for every fusion (a giant layer takes 30-150 s on
one core of our 2-core host, depending on the load). Costs are cached in `--cache` (default
~/.cache/beit3_jax/layer_roofline.json; '' for none), keyed by a hash of the lowered program
and the jax and libtpu versions (the whole layers keep their optimized HLO there, compressed,
for the breakdown), so a second run only lowers. `--jobs N` compiles N programs at once.

Run (from the repository root; needs libtpu, the `test` or `tpu` extra; no TPU):

    .venv/bin/python benchmarks/layer_roofline.py                      # giant, 8 / stream
    .venv/bin/python benchmarks/layer_roofline.py --variant base --batch 32
    .venv/bin/python benchmarks/layer_roofline.py --sections layer --streams pair --top 30
    .venv/bin/python benchmarks/layer_roofline.py --sections layer,prototypes \\
        --prototypes splash,params_bf16,fused_all
"""

from __future__ import annotations

import os

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import argparse
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import re
import sys
import threading
import time
import zlib
from typing import Any, Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from beit3_jax import sharding as sharding_lib
from beit3_jax.chips import CHIPS
from beit3_jax.models import attention as attention_lib
from beit3_jax.models import encoder, get_config
from beit3_jax.models.config import num_patches
from beit3_jax.models.layers import TEXT_ONLY, VISION_ONLY, LayerNorm, Linear, Multiway
from beit3_jax.planning import slices

CHIP = CHIPS['v5p']
F32, BF16 = jnp.float32, jnp.bfloat16
SECTIONS = ('layer', 'pieces', 'core', 'matmuls', 'prototypes')
STREAMS = ('image', 'text', 'pair', 'pair_vl')

# ---------------------------------------------------------------------------------------------
# Shapes


def _expert_ranges(split: int, seq: int, ffn: bool, shared: bool, use_vl: bool):
  """Expert -> (first, end) token of a sequence, as `Multiway` routes it."""
  if shared and not ffn:
    return {'shared': (0, seq)}
  if split == VISION_ONLY:
    return {'A': (0, seq)}
  if split == TEXT_ONLY:
    return {'B': (0, seq)}
  if ffn and use_vl:
    return {'C': (0, seq)}
  return {'A': (0, split), 'B': (split, seq)}


@dataclasses.dataclass(frozen=True)
class Stream:
  """One stream's per-chip shape and Multiway routing."""
  name: str
  batch: int
  seq: int
  split: int          # the layer's static split position (VISION_ONLY, TEXT_ONLY or 1 + N_p)
  padded: bool        # has key padding (text tokens)
  use_vl: bool        # the layer owns the vision-language FFN expert C

  def expert_tokens(self, ffn: bool, shared_attention: bool,
                    split: int | None = None) -> dict[str, int]:
    """Expert name -> tokens per example that pass through it, for the attention modules
    (`ffn=False`: projections, their LayerNorms) or the FFN ones (the FFN, its LayerNorm)."""
    split = self.split if split is None else split
    ranges = _expert_ranges(split, self.seq, ffn, shared_attention, self.use_vl)
    return {e: hi - lo for e, (lo, hi) in ranges.items()}


def make_streams(cfg, batch: int, text_len: int, names) -> list[Stream]:
  n = 1 + num_patches(cfg)
  table = {
      'image': Stream('image', batch, n, VISION_ONLY, False, False),
      'text': Stream('text', batch, text_len, TEXT_ONLY, True, False),
      'pair': Stream('pair', batch, n + text_len, n, True, False),
      'pair_vl': Stream('pair_vl', batch, n + text_len, n, True, True),
  }
  out = []
  for name in names:
    if name == 'pair_vl' and not cfg.num_vl_layers:
      continue
    out.append(table[name])
  return out


# ---------------------------------------------------------------------------------------------
# Compiling and reading the cost


@dataclasses.dataclass
class Cost:
  flops: float
  bytes: float
  temp: float = 0.0
  compile_s: float = 0.0
  cached: bool = False
  breakdown: dict | None = None

  def __add__(self, other: 'Cost') -> 'Cost':
    return Cost(self.flops + other.flops, self.bytes + other.bytes,
                max(self.temp, other.temp), self.compile_s + other.compile_s,
                self.cached and other.cached)

  def scale(self, k: float) -> 'Cost':
    return Cost(self.flops * k, self.bytes * k, self.temp, self.compile_s, self.cached)

  @property
  def intensity(self) -> float:
    return self.flops / self.bytes if self.bytes else float('nan')

  @property
  def ms(self) -> float:
    return 1e3 * max(self.flops / CHIP.peak_flops, self.bytes / CHIP.hbm_bandwidth)

  @property
  def bound(self) -> str:
    return 'compute' if self.flops / CHIP.peak_flops >= self.bytes / CHIP.hbm_bandwidth \
        else 'memory'


class Compiler:
  """Lowers and compiles functions for one v5p chip; caches the costs on disk."""

  def __init__(self, cache_path: str | None, jobs: int, dump_dir: str = ''):
    self.dump_dir = dump_dir
    devs = slices.devices(slices.parse('v5p-8'))
    # The trainer's axis names, all of size 1: activation constraints and splash's shard_map
    # see the mesh they see in training, on one chip.
    self.mesh = sharding_lib.make_mesh((1, 1, 1), devs[:1])
    self.replicated = NamedSharding(self.mesh, P())
    self.cache_path = cache_path
    self.cache = {}
    if cache_path and os.path.exists(cache_path):
      with open(cache_path) as f:
        self.cache = json.load(f)
    import libtpu  # pylint: disable=import-outside-toplevel (only here: its version)
    self.versions = f'jax {jax.__version__} libtpu {getattr(libtpu, "__version__", "?")}'
    self.lock = threading.Lock()
    self.pool = concurrent.futures.ThreadPoolExecutor(max(1, jobs))
    self.compile_seconds = 0.0
    self.compiles = 0

  def abstract(self, tree):
    """ShapeDtypeStructs on the chip for a tree of (shape, dtype) structs or arrays."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), tree)

  def submit(self, label: str, fn: Callable, args, *, breakdown: bool = False,
             patch: Callable[[], Any] | None = None) -> concurrent.futures.Future:
    """Lowers fn(*args) now (patches apply while tracing) and compiles in the pool."""
    with (patch() if patch else contextlib.nullcontext()), \
        sharding_lib.use_mesh(self.mesh):
      lowered = jax.jit(fn).lower(*self.abstract(args))
    text = lowered.as_text()
    keys = {flag: hashlib.sha256(f'{self.versions}\n{flag}\n{text}'.encode()).hexdigest()
            for flag in (False, True)}
    # A program compiled for its breakdown keeps its optimized HLO (compressed) in the cache;
    # its costs answer a plain request for the same program as well.
    hit = self.cache.get(keys[True]) or (None if breakdown else self.cache.get(keys[False]))
    if hit is not None and (not breakdown or 'hlo_z' in hit):
      result = Cost(**{k: v for k, v in hit.items() if k not in ('hlo_z', 'breakdown')},
                    cached=True)
      if breakdown:
        result.breakdown = logical_breakdown(
            zlib.decompress(base64.b64decode(hit['hlo_z'])).decode())
      future = concurrent.futures.Future()
      future.set_result(result)
      return future
    return self.pool.submit(self._compile, label, keys[breakdown], lowered, breakdown)

  def _compile(self, label, key, lowered, breakdown) -> Cost:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    dt = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    result = Cost(float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0)),
                  float(getattr(mem, 'temp_size_in_bytes', 0) or 0), dt)
    entry = {k: v for k, v in dataclasses.asdict(result).items()
             if k not in ('cached', 'breakdown')}
    if breakdown:
      text = compiled.as_text()
      result.breakdown = logical_breakdown(text)
      entry['hlo_z'] = base64.b64encode(zlib.compress(text.encode(), 9)).decode()
    if self.dump_dir:
      os.makedirs(self.dump_dir, exist_ok=True)
      with open(os.path.join(self.dump_dir, re.sub(r'\W+', '_', label) + '.hlo.txt'), 'w') as f:
        f.write(compiled.as_text())
    with self.lock:
      self.compile_seconds += dt
      self.compiles += 1
      self.cache[key] = entry
      if self.cache_path:
        self._save(key, entry)
    print(f'  compiled {label} in {dt:.1f} s', file=sys.stderr, flush=True)
    return result

  def _save(self, key, entry):
    """Adds one entry to the cache file (re-read first: another run may have added some)."""
    os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
    on_disk = {}
    if os.path.exists(self.cache_path):
      try:
        with open(self.cache_path) as f:
          on_disk = json.load(f)
      except (OSError, ValueError):
        pass
    on_disk[key] = entry
    tmp = f'{self.cache_path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(on_disk, f)
    os.replace(tmp, self.cache_path)


# ---------------------------------------------------------------------------------------------
# The training work of a piece


def train_work(apply: Callable, remat: str) -> Callable:
  """value_and_grad over (params, activations) of sum(apply(params, acts, aux) * g).

  The returned function takes (params, acts, g, aux, idle): `idle` are the parameters of the
  Multiway experts this stream does not route through; they are passed (Flax needs the whole
  tree) but not differentiated, so their all-zero gradients are not counted as the layer's
  work (see the module docstring)."""
  policy = encoder.REMAT_POLICIES[remat]
  f = apply if policy is None else jax.checkpoint(apply, policy=policy, prevent_cse=True)

  def loss(params, acts, g, aux, idle):
    y = f(_merge(params, idle), acts, aux)
    return sum(jnp.sum(a.astype(F32) * b.astype(F32))
               for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(g)))

  return jax.value_and_grad(loss, argnums=(0, 1))


def _merge(a: dict, b: dict) -> dict:
  flat = {**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)}
  return traverse_util.unflatten_dict(flat) if flat else {}


def split_idle(params: dict, cfg, stream: Stream, split: int | None = None):
  """(used, idle) parameters: idle = experts ('A', 'B', 'C') the stream does not use."""
  used_attn = set(stream.expert_tokens(False, cfg.shared_attention, split))
  used_ffn = set(stream.expert_tokens(True, cfg.shared_attention, split))
  used, idle = {}, {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    experts = used_attn if path[0] in ('self_attn', 'self_attn_layer_norm') else used_ffn
    if any(p in ('A', 'B', 'C') and p not in experts for p in path):
      idle[path] = leaf
    else:
      used[path] = leaf
  unflat = lambda d: traverse_util.unflatten_dict(d) if d else {}
  return unflat(used), unflat(idle)


def module_apply(make_module: Callable[[Any], nn.Module], call: Callable) -> Callable:
  """apply(params, acts, aux) of a module built inside the trace (the layer index is traced)."""
  def apply(params, acts, aux):
    layer, rng, key_padding = aux
    module = make_module(layer)
    return module.apply({'params': params}, *call(acts, key_padding),
                        rngs={'drop_path': rng})
  return apply


def abstract_params(make_module, call, acts, key_padding, layer: int):
  module = make_module(layer)
  rngs = {'params': jax.random.key(0), 'drop_path': jax.random.key(1)}
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), acts)
  kp = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), key_padding)
  tree = jax.eval_shape(lambda: module.init(rngs, *call(zeros, kp))).get('params', {})
  return nn.meta.unbox(tree)


def aux_args(stream: Stream):
  kp = (jax.ShapeDtypeStruct((stream.batch, 1, 1, stream.seq), jnp.bool_)
        if stream.padded else None)
  return (jax.ShapeDtypeStruct((), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)), kp)


def act(stream: Stream, *tail, dtype=BF16):
  return jax.ShapeDtypeStruct((stream.batch, stream.seq) + tuple(tail), dtype)


# ---------------------------------------------------------------------------------------------
# Pieces (flax modules built the way `EncoderLayer` builds them)


def _norm(cfg, name, shared, use_vl=False):
  ln = functools.partial(encoder.LayerNorm, cfg.layernorm_eps, 'norm', BF16)
  if shared:
    m = ln(name=name)
    return lambda x, split: m(x)
  return Multiway(ln, use_vl, name=name)


class _PreAttentionNorm(nn.Module):
  cfg: Any
  split: int

  @nn.compact
  def __call__(self, x):
    return _norm(self.cfg, 'self_attn_layer_norm', self.cfg.shared_attention)(x, self.split)


class _FinalNorm(nn.Module):
  cfg: Any
  split: int
  use_vl: bool

  @nn.compact
  def __call__(self, x):
    return _norm(self.cfg, 'final_layer_norm', False, self.use_vl)(x, self.split)


class _Attention(nn.Module):
  cfg: Any
  layer: Any
  split: int

  @nn.compact
  def __call__(self, x, key_padding):
    return encoder.Attention(self.cfg, self.layer, name='self_attn')(x, self.split, None,
                                                                      key_padding)


class _FFN(nn.Module):
  cfg: Any
  layer: Any
  split: int
  use_vl: bool

  @nn.compact
  def __call__(self, x):
    ffn = Multiway(functools.partial(encoder.FeedForward, self.cfg, self.layer), self.use_vl,
                   name='ffn')
    return ffn(x, self.split)


class _Residual(nn.Module):
  cfg: Any
  layer: Any

  @nn.compact
  def __call__(self, x, h):
    return x + encoder.drop_path(self, h, encoder.drop_path_rate(self.cfg, self.layer), False)


def layer_job(cfg, stream: Stream, remat: str, params_dtype=F32, split=None):
  """(fn, args) of the whole layer's training work."""
  split = stream.split if split is None else split
  make = lambda layer: encoder.EncoderLayer(cfg, layer, stream.use_vl)
  call = lambda acts, kp: (acts[0], split, None, kp, False)
  return _module_job(cfg, stream, remat, make, call, (act(stream, cfg.embed_dim),),
                     params_dtype, split)


def _module_job(cfg, stream, remat, make, call, acts, params_dtype=F32, split=None):
  aux = aux_args(stream)
  params = abstract_params(make, call, acts, aux[2], cfg.depth // 2)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, params_dtype), params)
  out = jax.eval_shape(lambda p, a, x: module_apply(make, call)(p, a, x), params, acts, aux)
  g = jax.ShapeDtypeStruct(out.shape, out.dtype)
  used, idle = split_idle(params, cfg, stream, split)
  return train_work(module_apply(make, call), remat), (used, acts, g, aux, idle)


def piece_jobs(cfg, stream: Stream, remat: str):
  """name -> (fn, args, multiplicity) of the layer's pieces."""
  d = cfg.embed_dim
  x = (act(stream, d),)
  jobs = {}
  jobs['LayerNorm before attention'] = (*_module_job(
      cfg, stream, remat, lambda layer: _PreAttentionNorm(cfg, stream.split),
      lambda a, kp: (a[0],), x), 1)
  jobs['attention sublayer'] = (*_module_job(
      cfg, stream, remat, lambda layer: _Attention(cfg, layer, stream.split),
      lambda a, kp: (a[0], kp), x), 1)
  jobs['LayerNorm before FFN'] = (*_module_job(
      cfg, stream, remat, lambda layer: _FinalNorm(cfg, stream.split, stream.use_vl),
      lambda a, kp: (a[0],), x), 1)
  jobs['FFN (' + '+'.join(stream.expert_tokens(True, cfg.shared_attention)) + ')'] = (
      *_module_job(cfg, stream, remat,
                   lambda layer: _FFN(cfg, layer, stream.split, stream.use_vl),
                   lambda a, kp: (a[0],), x), 1)
  jobs['residual + drop-path add (x2)'] = (*_module_job(
      cfg, stream, remat, lambda layer: _Residual(cfg, layer),
      lambda a, kp: (a[0], a[1]), x + x), 2)
  return jobs


def core_jobs(cfg, stream: Stream, remat: str):
  h, d = cfg.num_heads, cfg.embed_dim // cfg.num_heads
  qkv = tuple(act(stream, h, d) for _ in range(3))
  jobs = {}
  for impl in ('xla', 'splash'):
    def apply(params, acts, aux, impl=impl):
      del params
      return attention_lib.dot_product_attention(*acts, key_padding=aux[2],
                                                 implementation=impl)
    jobs[f'attention core {impl}'] = (train_work(apply, remat),
                                      ({}, qkv, qkv[0], aux_args(stream), {}))
  return jobs


# ---------------------------------------------------------------------------------------------
# The matmuls alone


def _dot_fwd(spec):
  return lambda a, b: jnp.einsum(spec, a, b)


def _dot_bwd(spec):
  def bwd(a, b, g):
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
    return vjp(g)
  return bwd


def matmul_list(cfg, stream: Stream):
  """(label, einsum spec, a shape, b shape, count) of every dot_general of the layer."""
  b, s, dm, f = stream.batch, stream.seq, cfg.embed_dim, cfg.mlp_dim
  h, d = cfg.num_heads, dm // cfg.num_heads
  out = []
  for e, n in stream.expert_tokens(False, cfg.shared_attention).items():
    out.append((f'q/k/v proj {e}', 'bsm,mhd->bshd', (b, n, dm), (dm, h, d), 3))
    out.append((f'out proj {e}', 'bshd,hdm->bsm', (b, n, h, d), (h, d, dm), 1))
  out.append(('q.k^T', 'bqhd,bkhd->bhqk', (b, s, h, d), (b, s, h, d), 1))
  out.append(('p.v', 'bhqk,bkhd->bqhd', (b, h, s, s), (b, s, h, d), 1))
  for e, n in stream.expert_tokens(True, cfg.shared_attention).items():
    out.append((f'fc1 {e}', 'bsm,mf->bsf', (b, n, dm), (dm, f), 1))
    out.append((f'fc2 {e}', 'bsf,fm->bsm', (b, n, f), (f, dm), 1))
  return out


def submit_matmuls(comp: Compiler, cfg, stream: Stream, remat: str):
  """label -> (forward future, backward future, count, forward passes)."""
  passes = 1 if remat == 'none' else 2
  jobs = {}
  for label, spec, a, bshape, count in matmul_list(cfg, stream):
    sa, sb = jax.ShapeDtypeStruct(a, BF16), jax.ShapeDtypeStruct(bshape, BF16)
    out = jax.eval_shape(_dot_fwd(spec), sa, sb)
    jobs[label] = (comp.submit(f'{stream.name} matmul {label} fwd', _dot_fwd(spec), (sa, sb)),
                   comp.submit(f'{stream.name} matmul {label} bwd', _dot_bwd(spec),
                               (sa, sb, jax.ShapeDtypeStruct(out.shape, BF16))),
                   count, passes)
  return jobs


def matmul_cost(fwd: Cost, bwd: Cost, count: int, passes: int) -> Cost:
  return dataclasses.replace((fwd.scale(passes) + bwd).scale(count), temp=0.0)


# ---------------------------------------------------------------------------------------------
# Prototypes: the layer with one change, patched into this process while tracing


class _LayerNormBF16(LayerNorm):
  """LayerNorm with the statistics accumulated in float32 but everything elementwise in
  bfloat16 (input, normalisation, scale, bias)."""

  @nn.compact
  def __call__(self, x):
    n = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)), (n,), F32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (self.axis_name,)), (n,), F32)
    x = x.astype(BF16)
    mean = jnp.mean(x, axis=-1, keepdims=True, dtype=F32)
    var = jnp.mean(jnp.square(x.astype(F32) - mean), axis=-1, keepdims=True)
    y = (x - mean.astype(BF16)) * jax.lax.rsqrt(var + self.eps).astype(BF16)
    return (y * scale.astype(BF16) + bias.astype(BF16)).astype(self.dtype)


class _FeedForwardGeluBF16(encoder.FeedForward):
  """`FeedForward` with the exact GELU computed in bfloat16 instead of float32."""

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d, f = cfg.embed_dim, cfg.mlp_dim

    def linear(role, n_in, n_out, axes):
      kinit, binit = encoder.initializers.linear_inits(cfg.init, n_in, role=role,
                                                       layer=self.layer, depth=cfg.depth)
      return Linear((n_in,), (n_out,), axes, kinit, binit, BF16, name=role)

    h = linear('fc1', d, f, ('embed', 'mlp'))(x)
    h = jax.nn.gelu(h, approximate=False)
    h = encoder.constrain(h, ('batch', 'length', 'mlp'))
    h = encoder.LayerNorm(cfg.layernorm_eps, 'mlp', BF16, name='ffn_layernorm')(h)
    return linear('fc2', f, d, ('mlp', 'embed'))(h)


def _xla_attention_bf16_softmax(q, k, v, attn_bias, key_padding):
  """The 'xla' core with bfloat16 logits and softmax (the model's are float32)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  if attn_bias is not None:
    logits = logits + attn_bias.astype(logits.dtype)
  if key_padding is not None:
    logits = jnp.where(key_padding, jnp.finfo(logits.dtype).min, logits)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)


@contextlib.contextmanager
def _patched(module, **attrs):
  old = {k: getattr(module, k) for k in attrs}
  for k, v in attrs.items():
    setattr(module, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(module, k, v)


@contextlib.contextmanager
def _all_patches():
  with _patched(encoder, LayerNorm=_LayerNormBF16, FeedForward=_FeedForwardGeluBF16):
    yield


class _Segments(nn.Module):
  """Multiway generalised to any contiguous segments of the sequence axis: `segments` is a
  tuple of (first, end, expert); each expert runs once on its segment (adjacent segments of
  one expert merged), the outputs are concatenated back in order."""
  make_expert: Callable
  segments: tuple[tuple[int, int, str], ...]

  @nn.compact
  def __call__(self, x):
    merged = []
    for lo, hi, e in self.segments:
      if merged and merged[-1][2] == e and merged[-1][1] == lo:
        merged[-1] = (merged[-1][0], hi, e)
      else:
        merged.append((lo, hi, e))
    experts = {e: self.make_expert(name=e) for _, _, e in merged}
    if len(merged) == 1:
      return experts[merged[0][2]](x)
    return jnp.concatenate([experts[e](x[:, lo:hi]) for lo, hi, e in merged], axis=1)


class _FusedStreamsLayer(nn.Module):
  """The layer of `EncoderLayer` run on all streams in ONE call. The streams (equal batch B)
  are one sequence per row, (B, S_1 + S_2 + ..., D), ordered image | pair | text so that each
  expert's tokens are contiguous (A: image + pair image, B: pair text + text). Every
  projection, LayerNorm and FFN expert then runs once on the tokens of all streams: its weights
  are read and their gradients written once per layer and step instead of once per stream.
  Only the attention core runs per stream, on slices. Drop path draws one Bernoulli per
  (row, stream). Same parameters (in a slightly different tree), same routing, same math."""
  config: Any
  layer: Any
  use_vl: bool
  streams: tuple[tuple[int, int, int], ...]   # (first token, end, split) of every stream

  def _segments(self, ffn: bool):
    shared = self.config.shared_attention and not ffn
    out = []
    for lo, hi, split in self.streams:
      for e, (a, b) in _expert_ranges(split, hi - lo, ffn, shared, self.use_vl).items():
        out.append((lo + a, lo + b, e))
    return tuple(sorted(out))

  @nn.compact
  def __call__(self, x, key_paddings):
    cfg = self.config
    dm, h = cfg.embed_dim, cfg.num_heads
    d = dm // h
    ln = functools.partial(encoder.LayerNorm, cfg.layernorm_eps, 'norm', BF16)
    attn, ffn = self._segments(False), self._segments(True)

    def linear(role, n_in, n_out, axes):
      kinit, binit = encoder.initializers.linear_inits(cfg.init, int(np.prod(n_in)), role=role,
                                                       layer=self.layer, depth=cfg.depth)
      return functools.partial(Linear, n_in, n_out, axes, kinit, binit, BF16)

    rate = encoder.drop_path_rate(cfg, self.layer)

    def drop_path(y):
      if isinstance(rate, float) and rate == 0.0:
        return y
      keep = 1.0 - rate
      mask = jax.random.bernoulli(self.make_rng('drop_path'), keep,
                                  (y.shape[0], len(self.streams)))
      stream_of = np.concatenate([np.full(hi - lo, i) for i, (lo, hi, _) in
                                  enumerate(self.streams)])
      mask = jnp.take(mask, jnp.asarray(stream_of), axis=1)[..., None]
      keep = keep if isinstance(keep, float) else keep.astype(y.dtype)
      return jnp.where(mask, y / keep, jnp.zeros_like(y))

    hs = _Segments(ln, attn, name='self_attn_layer_norm')(x)
    qkv_axes = ('embed', 'heads', 'kv')
    q, k, v = (_Segments(linear(r, (dm,), (h, d), qkv_axes), attn, name=r)(hs)
               for r in ('q_proj', 'k_proj', 'v_proj'))
    q = q * jnp.asarray(d ** -0.5, BF16)
    outs = [attention_lib.dot_product_attention(
        q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], key_padding=kp, implementation=cfg.attention)
        for (lo, hi, _), kp in zip(self.streams, key_paddings)]
    o = jnp.concatenate(outs, axis=1)
    b, s = o.shape[:2]
    o = _Segments(ln, attn, name='inner_attn_ln')(o.reshape(b, s, dm)).reshape(b, s, h, d)
    o = _Segments(linear('out_proj', (h, d), (dm,), ('heads', 'kv', 'embed')), attn,
                  name='out_proj')(o)
    x = x + drop_path(o)
    hs = _Segments(ln, ffn, name='final_layer_norm')(x)
    hs = _Segments(functools.partial(encoder.FeedForward, cfg, self.layer), ffn, name='ffn')(hs)
    return x + drop_path(hs)


def fused_layer_job(cfg, streams: list[Stream], remat: str, params_dtype=F32):
  """(fn, args) of `_FusedStreamsLayer`'s training work over `streams` (equal batch; the
  ordering image | pair | text is made here)."""
  order = {'image': 0, 'pair': 1, 'pair_vl': 1, 'text': 2}
  streams = sorted(streams, key=lambda s: order[s.name])
  if len({s.batch for s in streams}) != 1:
    raise ValueError('fused streams need one batch size')
  use_vl = any(s.use_vl for s in streams)
  spans, lo = [], 0
  for s in streams:
    spans.append((lo, lo + s.seq, s.split))
    lo += s.seq
  make = lambda layer: _FusedStreamsLayer(cfg, layer, use_vl, tuple(spans))
  call = lambda acts, kps: (acts[0], kps)
  x = jax.ShapeDtypeStruct((streams[0].batch, lo, cfg.embed_dim), BF16)
  kps = tuple(aux_args(s)[2] for s in streams)
  aux = aux_args(streams[0])[:2] + (kps,)
  params = abstract_params(make, call, (x,), kps, cfg.depth // 2)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, params_dtype), params)
  return train_work(module_apply(make, call), remat), (params, (x,), x, aux, {})


@dataclasses.dataclass(frozen=True)
class Prototype:
  what: str
  config: dict = dataclasses.field(default_factory=dict)  # model config overrides
  patch: Callable | None = None                            # context manager while tracing
  params_dtype: Any = F32
  remat: str | None = None                                 # overrides --remat
  no_split: bool = False                                   # pair streams: one expert for all
  fused: bool = False                                      # `_FusedStreamsLayer`
  streams: tuple[str, ...] | None = None                   # None: every stream


PROTOTYPES: dict[str, Prototype] = {
    'splash': Prototype("attention='splash' (Pallas flash kernel: no S^2 logits in HBM)",
                        config={'attention': 'splash'}),
    'softmax_bf16': Prototype("'xla' attention with bfloat16 logits and softmax",
                              patch=lambda: _patched(attention_lib,
                                                     _xla_attention=_xla_attention_bf16_softmax)),
    'ln_bf16': Prototype('every LayerNorm elementwise in bfloat16 (statistics in float32)',
                         patch=lambda: _patched(encoder, LayerNorm=_LayerNormBF16)),
    'gelu_bf16': Prototype('GELU in bfloat16 instead of float32',
                           patch=lambda: _patched(encoder, FeedForward=_FeedForwardGeluBF16)),
    'params_bf16': Prototype("parameters (and their gradients) in bfloat16: no per-use cast "
                             "(param_dtype='bfloat16', or FSDP gathering bfloat16)",
                             params_dtype=BF16),
    'no_remat': Prototype("remat 'none': no rematerialised forward (activations kept)",
                          remat='none'),
    'no_split': Prototype('the pair through expert A only (split -1): no second expert, no '
                          'Multiway slice / concatenate', no_split=True, streams=('pair',)),
    'all': Prototype('splash + LayerNorm and GELU in bfloat16 + bfloat16 parameters',
                     config={'attention': 'splash'}, patch=_all_patches, params_dtype=BF16),
    'fused_streams': Prototype('image | pair | text as one sequence per row through one layer '
                               'call (attention per stream): each weight read and its gradient '
                               'written once per layer, not once per stream', fused=True),
    'fused_all': Prototype('fused_streams + all', config={'attention': 'splash'},
                           patch=_all_patches, params_dtype=BF16, fused=True),
}


# ---------------------------------------------------------------------------------------------
# HBM breakdown of an optimized HLO module

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
                'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\](\{[^}]*\})?')
_INSTR = re.compile(r'\s*(?:ROOT )?%(\S+) = ')
_FREE = {'parameter', 'tuple', 'get-tuple-element', 'constant', 'bitcast', 'copy-done',
         'after-all', 'partition-id', 'replica-id'}


def _arrays(type_text: str) -> list[tuple[str, int, bool]]:
  """(dtype, logical bytes, in HBM) of every array in an HLO type; S(n > 0) is on-chip."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(type_text):
    n = int(np.prod([int(d) for d in dims.split(',') if d]))
    space = re.search(r'S\((\d+)\)', layout)
    out.append((dtype, _DTYPE_BYTES[dtype] * n, not space or space.group(1) == '0'))
  return out


def _split_type(rest: str) -> tuple[str, str]:
  """'TYPE opcode(...)...' -> (TYPE, remainder); TYPE may be a parenthesised tuple."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].strip()
  head, _, tail = rest.partition(' ')
  return head, tail


def _fused_ops(text: str) -> dict[str, collections.Counter]:
  """Fused computation name -> Counter of the opcodes inside it."""
  out, current = {}, None
  for line in text.splitlines():
    if not line.startswith(' ') and line.rstrip().endswith('{') and '%' in line:
      name = line.split()[0].lstrip('%')
      current = out.setdefault(name, collections.Counter())
      continue
    if line.startswith('}'):
      current = None
      continue
    if current is not None:
      m = _INSTR.match(line)
      if m:
        _, rest = _split_type(line[m.end():])
        current[rest.split('(', 1)[0]] += 1
  return out


def _kind(opcode: str, fused: collections.Counter, op_name: str) -> str:
  """What an instruction is, from its opcode, the opcodes fused into it and its op_name (the
  module path of its root, `_module`, and the primitive that made it)."""
  prim = op_name.rsplit('/', 1)[-1]
  module = _module(op_name)
  if opcode == 'custom-call':
    return 'custom call (Pallas)'
  if opcode in ('copy', 'copy-start'):
    return 'copy / prefetch'
  if opcode in ('convolution', 'dot') or fused['convolution'] or fused['dot']:
    return 'matmul fusion'
  if opcode == 'concatenate' or fused['concatenate'] or prim == 'concatenate':
    return 'concatenate'
  if opcode in ('slice', 'dynamic-slice') or prim in ('slice', 'dynamic_slice'):
    return 'slice'
  if prim in ('pad', 'transpose') or opcode in ('pad', 'transpose'):
    return 'pad / transpose'
  if opcode == 'convert' or prim == 'convert_element_type' and set(fused) <= {
      'convert', 'parameter', 'bitcast', 'copy'}:
    return 'dtype convert'
  if any(n in module for n in ('layer_norm', 'layernorm', 'inner_attn_ln')):
    return 'LayerNorm'
  if module.startswith('ffn'):
    return 'GELU / FFN bias'
  if module == 'self_attn':
    return 'softmax / mask'
  if module.startswith('self_attn/'):
    return 'projection bias / scale'
  return 'residual / drop path'


def _pass(op_name: str) -> str:
  """forward, rematerialised forward (inside the backward pass) or backward, from op_name."""
  if not op_name:
    return 'no op_name'
  if 'rematted_computation' in op_name:
    return 'remat forward'
  if 'transpose(' in op_name:
    return 'backward'
  return 'forward'


def _module(op_name: str) -> str:
  """The layer's submodule an instruction comes from, experts merged and at most two levels:
  'ffn/fc1', 'self_attn/q_proj', 'self_attn/bqhd,bkhd->bhqk' (an einsum), ... or '(layer)'."""
  parts = re.split(r'(?:EncoderLayer|_FusedStreamsLayer)\)?/', op_name, maxsplit=1)
  if len(parts) < 2:
    return '(layer)'
  path = parts[1].split('/')[:-1]
  path = [p for p in path if p not in ('A', 'B', 'C', 'shared')
          and not p.startswith(('jvp(', 'transpose(', 'checkpoint', 'jit(', 'vmap('))]
  return '/'.join(path[:2]) or '(layer)'


def logical_breakdown(text: str, top: int = 40) -> dict:
  """HBM bytes of the entry computation's instructions at logical sizes, grouped (see the
  module docstring). Buffers XLA placed on chip (memory space S(1), e.g. a prefetched weight)
  are not counted; the copy that brings them there counts its HBM source."""
  fused = _fused_ops(text)
  entry = text[text.index('\nENTRY'):]
  types, rows = {}, []
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(line)
    if not m:
      continue
    typ, rest = _split_type(line[m.end():])
    types[m.group(1)] = typ
    opcode = rest.split('(', 1)[0]
    if opcode in _FREE:
      continue
    args = rest[len(opcode) + 1:]
    depth, end = 1, 0
    for end, ch in enumerate(args):
      depth += (ch == '(') - (ch == ')')
      if depth == 0:
        break
    outs = _arrays(typ)
    if opcode == 'copy-start':
      outs = outs[:1]   # (destination, source, context): the copy writes the destination
    ins = [a for o in re.findall(r'%([\w.\-]+)', args[:end]) if o in types
           for a in _arrays(types[o])]
    calls = re.search(r'calls=%([\w.\-]+)', rest)
    ops = fused.get(calls.group(1), collections.Counter()) if calls else collections.Counter()
    md = re.search(r'op_name="([^"]*)"', rest)
    op_name = md.group(1) if md else ''
    written = sum(b for _, b, hbm in outs if hbm)
    rows.append(dict(
        bytes=written + sum(b for _, b, hbm in ins if hbm), written=written,
        written_f32=sum(b for dt, b, hbm in outs if hbm and dt == 'f32'),
        kind=_kind(opcode, ops, op_name), pass_=_pass(op_name), module=_module(op_name),
        opcode=opcode, op_name=op_name, shape=typ if len(typ) < 90 else typ[:87] + '...'))
  rows = [r for r in rows if r['bytes']]

  def by(key):
    sums = collections.Counter()
    for r in rows:
      sums[r[key]] += r['bytes']
    return dict(sums.most_common())

  return {'total': sum(r['bytes'] for r in rows),
          'written': sum(r['written'] for r in rows),
          'written_f32': sum(r['written_f32'] for r in rows),
          'by_pass': by('pass_'), 'by_kind': by('kind'), 'by_module': by('module'),
          'top': [{k: r[k] for k in ('bytes', 'kind', 'pass_', 'opcode', 'shape', 'op_name')}
                  for r in sorted(rows, key=lambda r: -r['bytes'])[:top]]}


# ---------------------------------------------------------------------------------------------
# Printing


def row(label: str, c: Cost, layer_bytes: float | None) -> str:
  share = f'{c.bytes / layer_bytes:6.0%}' if layer_bytes else '     -'
  temp = f'{c.temp / 1e9:7.3f}' if c.temp else '      -'
  return (f'| {label:<46} | {c.flops / 1e9:8.1f} | {c.bytes / 1e9:7.3f} | {c.intensity:6.0f} | '
          f'{c.ms:7.3f} | {c.bound:<7} | {share} | {temp} |')


HEADER = ('| piece                                          |    GFLOP |      GB | FLOP/B |'
          ' roof ms | bound   |  share | temp GB |\n'
          '|------------------------------------------------|---------:|--------:|-------:|'
          '--------:|---------|-------:|--------:|')


def print_breakdown(name: str, b: dict, n_top: int):
  gb = lambda v: f'{v / 1e9:.3f}'
  total = b['total']
  share = lambda d: ', '.join(f'{k} {gb(v)} ({v / total:.0%})' for k, v in d.items()
                              if v >= 0.005 * total)
  print(f'\nHBM bytes of the {name} layer at logical sizes (operands + outputs once per '
        f'top-level instruction, on-chip buffers left out): {gb(total)} GB; written '
        f'{gb(b["written"])} GB, of which float32 {gb(b["written_f32"])} GB')
  print('  by pass:   ' + share(b['by_pass']))
  print('  by kind:   ' + share(b['by_kind']))
  print('  by module: ' + share(b['by_module']))
  print(f'  top {min(n_top, len(b["top"]))} instructions:')
  for r in b['top'][:n_top]:
    op = re.sub(r'^jit\([^)]*\)/', '', r['op_name'])
    print(f'    {r["bytes"] / 1e6:7.1f} MB  {r["pass_"]:<13} {r["kind"]:<22} {r["opcode"]:<10} '
          f'{r["shape"]}  [{op}]')


# ---------------------------------------------------------------------------------------------


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', default='giant')
  p.add_argument('--batch', type=int, default=8, help='examples per stream per chip')
  p.add_argument('--img_size', type=int, default=224)
  p.add_argument('--text_len', type=int, default=64)
  p.add_argument('--drop_path_rate', type=float, default=0.1)
  p.add_argument('--remat', default='full', choices=sorted(encoder.REMAT_POLICIES))
  p.add_argument('--streams', default='image,text,pair,pair_vl')
  p.add_argument('--sections', default='layer,pieces,core,matmuls',
                 help=f'comma-separated, of {",".join(SECTIONS)}')
  p.add_argument('--prototypes', default=','.join(PROTOTYPES),
                 help=f'comma-separated, of {",".join(PROTOTYPES)}')
  p.add_argument('--prototype_streams', default='image,text,pair,pair_vl',
                 help='streams the prototypes are compiled for')
  p.add_argument('--top', type=int, default=12, help='instructions listed per breakdown')
  p.add_argument('--cache', default=os.path.join(
      os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'beit3_jax',
      'layer_roofline.json'), help="cost cache ('' for none)")
  p.add_argument('--jobs', type=int, default=1, help='compiles at once (threads)')
  p.add_argument('--json', default='', help='write every number here')
  p.add_argument('--dump_hlo', default='',
                 help='write the optimized HLO of every program compiled (not cached) here')
  args = p.parse_args(argv)
  sections = args.sections.split(',')
  for s in sections:
    if s not in SECTIONS:
      p.error(f'unknown section {s!r}')
  protos = [x for x in args.prototypes.split(',') if x] if 'prototypes' in sections else []
  for x in protos:
    if x not in PROTOTYPES:
      p.error(f'unknown prototype {x!r}')
  for x in args.streams.split(',') + args.prototype_streams.split(','):
    if x not in STREAMS:
      p.error(f'unknown stream {x!r}; streams: {",".join(STREAMS)}')

  t_start = time.perf_counter()
  cfg = get_config(args.variant, dtype='bfloat16', img_size=args.img_size,
                   drop_path_rate=args.drop_path_rate)
  streams = make_streams(cfg, args.batch, args.text_len, args.streams.split(','))
  comp = Compiler(args.cache or None, args.jobs, args.dump_hlo)
  proto_streams = args.prototype_streams.split(',')
  proto_config = lambda proto: get_config(args.variant, dtype='bfloat16', img_size=args.img_size,
                                          drop_path_rate=args.drop_path_rate, **proto.config)
  print(f'{args.variant}: D {cfg.embed_dim}, F {cfg.mlp_dim}, {cfg.num_heads} heads of '
        f'{cfg.embed_dim // cfg.num_heads}, shared attention {cfg.shared_attention}, VL layers '
        f'{cfg.num_vl_layers}/{cfg.depth}; bfloat16 compute, float32 params, remat '
        f'{args.remat!r}, drop path {args.drop_path_rate}; one v5p chip '
        f'({CHIP.peak_flops / 1e12:.0f} TFLOP/s, {CHIP.hbm_bandwidth / 1e12:.3f} TB/s, ridge '
        f'{CHIP.ridge:.0f} FLOP/B)')
  print('streams per chip: ' + ', '.join(
      f'{s.name} {s.batch}x{s.seq} (split {s.split})' for s in streams), flush=True)

  # Submit everything first (lowering happens here), then collect.
  futures: dict[str, dict[str, Any]] = {s.name: {} for s in streams}
  for s in streams:
    f = futures[s.name]
    if 'layer' in sections or 'pieces' in sections:
      fn, a = layer_job(cfg, s, args.remat)
      f['layer'] = comp.submit(f'{s.name} layer', fn, a, breakdown='layer' in sections)
    if 'pieces' in sections:
      f['pieces'] = {k: (comp.submit(f'{s.name} {k}', fn, a), n)
                     for k, (fn, a, n) in piece_jobs(cfg, s, args.remat).items()}
    if 'core' in sections:
      f['core'] = {k: comp.submit(f'{s.name} {k}', fn, a)
                   for k, (fn, a) in core_jobs(cfg, s, args.remat).items()}
    if 'matmuls' in sections:
      f['matmuls'] = submit_matmuls(comp, cfg, s, args.remat)
    if protos and s.name in proto_streams:
      if 'layer' not in f:
        fn, a = layer_job(cfg, s, args.remat)
        f['layer'] = comp.submit(f'{s.name} layer', fn, a)
      f['prototypes'] = {}
      for name in protos:
        proto = PROTOTYPES[name]
        if proto.fused or (proto.streams is not None and s.name not in proto.streams):
          continue
        pcfg = proto_config(proto)
        with proto.patch() if proto.patch else contextlib.nullcontext():
          fn, a = layer_job(pcfg, s, proto.remat or args.remat, proto.params_dtype,
                            split=VISION_ONLY if proto.no_split else None)
        f['prototypes'][name] = comp.submit(f'{s.name} prototype {name}', fn, a,
                                            patch=proto.patch)
  # The fused-streams prototypes: one program per layer kind (plain, VL) over all streams.
  by_name = {s.name: s for s in streams}
  layer_kinds = {'plain': ('image', 'text', 'pair'), 'vl': ('image', 'text', 'pair_vl')}
  layer_kinds = {k: v for k, v in layer_kinds.items()
                 if all(n in by_name and n in proto_streams for n in v)}
  fused = {}
  for name in protos:
    proto = PROTOTYPES[name]
    if not proto.fused:
      continue
    for kind, names in layer_kinds.items():
      with proto.patch() if proto.patch else contextlib.nullcontext():
        fn, a = fused_layer_job(proto_config(proto), [by_name[n] for n in names],
                                proto.remat or args.remat, proto.params_dtype)
      fused[name, kind] = comp.submit(f'{kind} layer prototype {name}', fn, a,
                                      patch=proto.patch)

  results: dict[str, Any] = {'variant': args.variant, 'batch': args.batch,
                             'remat': args.remat, 'streams': {}}
  layer_costs: dict[str, Cost] = {}
  for s in streams:
    f = futures[s.name]
    out = results['streams'][s.name] = {'shape': [s.batch, s.seq], 'split': s.split}
    layer = f['layer'].result() if 'layer' in f else None
    if layer is not None:
      layer_costs[s.name] = layer
    lb = layer.bytes if layer else None
    print(f'\n### {s.name}: {s.batch} x {s.seq} tokens, split {s.split}'
          + (', key padding' if s.padded else '') + (', VL expert' if s.use_vl else ''))
    print(HEADER)
    if layer is not None:
      print(row('(a) whole layer', layer, lb))
      out['layer'] = {k: v for k, v in dataclasses.asdict(layer).items() if k != 'breakdown'}
      if layer.breakdown:
        print(row('(a) whole layer, HBM lower bound (breakdown)',
                  Cost(layer.flops, layer.breakdown['total']), lb))
    if 'pieces' in f:
      total = None
      out['pieces'] = {}
      for k, (fut, n) in f['pieces'].items():
        c = fut.result().scale(n)
        total = c if total is None else total + c
        print(row(f'(b) {k}', c, lb))
        out['pieces'][k] = dataclasses.asdict(c)
      print(row('(b) sum of the pieces', total, lb))
    if 'core' in f:
      out['core'] = {}
      for k, fut in f['core'].items():
        c = fut.result()
        print(row(f'(c) {k}', c, lb))
        out['core'][k] = dataclasses.asdict(c)
    if 'matmuls' in f:
      out['matmuls'] = {}
      total, proj = None, None
      for k, (ff, fb, count, passes) in f['matmuls'].items():
        c = matmul_cost(ff.result(), fb.result(), count, passes)
        out['matmuls'][k] = dataclasses.asdict(c)
        total = c if total is None else total + c
        if not k.startswith(('q.k', 'p.v')):
          proj = c if proj is None else proj + c
      for k, c in out['matmuls'].items():
        print(row(f'(d) matmul {k}' + (' (x3)' if k.startswith('q/k/v') else ''),
                  Cost(c['flops'], c['bytes']), lb))
      print(row('(d) all matmuls, bf16 (the ideal)', total, lb))
      print(row('(d) matmuls without q.k^T, p.v (flash ideal)', proj, lb))
      out['matmuls_total'] = dataclasses.asdict(total)
      out['matmuls_no_s2'] = dataclasses.asdict(proj)
    if layer is not None and layer.breakdown:
      print_breakdown(s.name, layer.breakdown, args.top)
      out['breakdown'] = layer.breakdown

  # Whole layers: one plain and one VL layer with all streams, and all layers of the model.
  plain, vl = cfg.depth - cfg.num_vl_layers, cfg.num_vl_layers
  kinds = {'plain': plain, 'vl': vl}

  def total_of(per_kind: dict[str, Cost]) -> Cost | None:
    if any(kinds[k] and k not in per_kind for k in kinds):
      return None
    parts = [per_kind[k].scale(n) for k, n in kinds.items() if n]
    return functools.reduce(lambda x, y: x + y, parts)

  def layer_of(kind, get):
    names = ('image', 'text', 'pair') if kind == 'plain' else ('image', 'text', 'pair_vl')
    costs = [get(n) for n in names]
    if any(c is None for c in costs):
      return None
    return functools.reduce(lambda x, y: x + y, costs)

  base = {k: layer_of(k, layer_costs.get) for k in kinds if kinds[k]}
  base = {k: v for k, v in base.items() if v is not None}
  all_layers = total_of(base)
  if all_layers is not None:
    print(f'\nAll {cfg.depth} layers, all streams, one chip (sum of whole-layer rows; '
          f'{plain} plain + {vl} VL layers): {all_layers.flops / 1e12:.2f} TFLOP, '
          f'{all_layers.bytes / 1e9:.0f} GB, {all_layers.intensity:.0f} FLOP/B, roofline '
          f'{all_layers.ms:.1f} ms ({all_layers.bound}-bound)')
    results['all_layers'] = dataclasses.asdict(all_layers)
    lower = {k: Cost(v.flops, sum(layer_costs[n].breakdown['total'] for n in names))
             for k, v in base.items()
             for names in [('image', 'text', 'pair') if k == 'plain' else
                           ('image', 'text', 'pair_vl')]
             if all(layer_costs[n].breakdown for n in names)}
    lower_total = total_of(lower) if len(lower) == len(base) else None
    if lower_total is not None:
      print(f'  HBM lower bound (breakdowns): {lower_total.bytes / 1e9:.0f} GB, '
            f'{lower_total.intensity:.0f} FLOP/B, roofline {lower_total.ms:.1f} ms '
            f'({lower_total.bound}-bound)')
      results['all_layers_hbm_lower_bound'] = dataclasses.asdict(lower_total)

  if protos:
    print('\nPrototypes: the whole layer with one change, bytes against the layer as it is '
          '(GB per stream; "layer" = image + text + pair of a plain layer)')
    cols = [s.name for s in streams if 'prototypes' in futures[s.name]]
    print('| prototype       | ' + ' | '.join(f'{c:>14}' for c in cols)
          + ' |          layer | FLOP/B | all layers GB | FLOP/B | roof ms |')
    print('|-----------------|' + '|'.join('-' * 16 for _ in cols)
          + '|----------------|-------:|--------------:|-------:|--------:|')
    gb = lambda c, ref: (f'{c.bytes / 1e9:7.3f} ({c.bytes / ref.bytes - 1:+4.0%})'
                         if c is not None and ref is not None else f'{"-":>14}')
    results['prototypes'] = {}
    rows_out = [('as it is', None)] + [(n, PROTOTYPES[n]) for n in protos]
    for name, proto in rows_out:
      per_stream = {}
      for c in cols:
        fut = futures[c]['prototypes'].get(name) if proto else None
        per_stream[c] = fut.result() if fut else (layer_costs.get(c) if proto is None or
                                                   not proto.fused else None)
      if proto is not None and proto.fused:
        per_kind = {k: fused[name, k].result() for k in kinds if (name, k) in fused}
      else:
        # A prototype not compiled for a stream (e.g. no_split: pair only) leaves it as it is.
        get = lambda n: per_stream.get(n) or layer_costs.get(n)
        per_kind = {k: layer_of(k, get) for k in kinds if kinds[k]}
        per_kind = {k: v for k, v in per_kind.items() if v is not None}
      tot = total_of(per_kind)
      lay = per_kind.get('plain')
      print(f'| {name:<15} | ' + ' | '.join(gb(per_stream[c], layer_costs.get(c)) for c in cols)
            + f' | {gb(lay, base.get("plain"))} | '
            + (f'{lay.intensity:6.0f}' if lay else '     -') + ' | '
            + (f'{tot.bytes / 1e9:6.0f} ({tot.bytes / all_layers.bytes - 1:+4.0%}) | '
               f'{tot.intensity:6.0f} | {tot.ms:7.1f}' if tot and all_layers
               else '            - |      - |       -') + ' |')
      results['prototypes'][name] = {
          'streams': {c: dataclasses.asdict(v) for c, v in per_stream.items() if v},
          'layer': dataclasses.asdict(lay) if lay else None,
          'all_layers': dataclasses.asdict(tot) if tot else None}
    for name in protos:
      print(f'  {name}: {PROTOTYPES[name].what}')

  comp.pool.shutdown()
  print(f'\n{comp.compiles} compiles, {comp.compile_seconds:.0f} s compiling; '
        f'{time.perf_counter() - t_start:.0f} s in all', file=sys.stderr)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1, default=float)


if __name__ == '__main__':
  main()

"""AdamW with BEiT-3's defaults: warmup + cosine schedule, no-decay set, clipping, layer decay.

`make_optimizer(config.optimizer, total_steps, depth)` builds, in order:

    clip_by_global_norm(clip_norm)                      (skipped when clip_norm <= 0)
    -> adam scaling (b1, b2, eps; the first moment kept in `mu_dtype`)
    -> + weight_decay * param on every parameter not in the no-decay set
    -> x layer_decay ** (depth + 1 - layer_id(param))   (fine-tuning; 1.0 = off)
       x task_head_lr_weight on the task head (`head/...`; unilm's VQA recipe: 20; 1.0 = off)
    -> x -learning_rate(step)
    and parameters matched by `frozen` get no update at all (not even weight decay).

Paper defaults (BEiT-3 Table 11): b1 0.9, b2 0.98, eps 1e-6, peak lr 1e-3, linear warmup then
cosine decay, weight decay 0.05, clipping 3.0.

No-decay set (unilm `optim_factory.get_parameter_groups`): every bias and LayerNorm parameter
(1-D in torch; our q/k/v biases are (heads, head_dim) but are biases all the same), and the
names in `NO_DECAY_NAMES` (the vision position table A and the CLS token, as unilm's
`no_weight_decay()`, and the VQ-KD's position tables and CLS tokens). The text position table
B, the mask token and the text embedding are decayed, as in the reference.

Layer ids (unilm `get_num_layer_for_vit`, num_max_layer = depth + 2): embeddings
(`text_embed`, `vision_embed`, `embed_positions`) 0, `encoder/layers_i` i + 1, everything after
the last layer (final norm, heads, including a head's own `layers_k`) depth + 1. Scanned layers
(`encoder/layers/...`, `encoder/vl_layers/...`, stacked on a leading axis) get one id per
slice, so both layouts train alike.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Leaf names of biases and LayerNorm scales (and the VQ-KD's separate q/v biases).
_NO_DECAY_LEAVES = ('bias', 'scale', 'q_bias', 'v_bias')
NO_DECAY_NAMES = (
    r'(^|/)encoder/embed_positions/A/embedding$',
    r'(^|/)vision_embed/cls_token$',
    r'(^|/)logit_scale$',
    r'(^|/)(encoder|decoder)/(pos_embed|cls_token)$',
)
MU_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_EMBEDDING_PARTS = ('text_embed', 'vision_embed', 'embed_positions')
_LAYER = re.compile(r'(^|/)encoder/layers_(\d+)(/|$)')
_STACKED = re.compile(r'(^|/)encoder/(layers|vl_layers)/')


def path_name(path) -> str:
  """'a/b/c' for a jax key path of dict keys (and attribute keys of boxed leaves)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != 'value':
      parts.append(key.name)
  return '/'.join(parts)


def decays(name: str) -> bool:
  """Whether the parameter at `name` ('beit3/encoder/layers_0/ffn/A/fc1/kernel') is decayed."""
  if name.rsplit('/', 1)[-1] in _NO_DECAY_LEAVES:
    return False
  return not any(re.search(p, name) for p in NO_DECAY_NAMES)


def layer_id(name: str, depth: int) -> int:
  """unilm's layer id of a parameter: 0 embeddings, i + 1 for layer i, depth + 1 the rest."""
  match = _LAYER.search(name)
  if match:
    return int(match.group(2)) + 1
  if any(part in name.split('/') for part in _EMBEDDING_PARTS):
    return 0
  return depth + 1


def _map_names(fn, tree):
  return jax.tree_util.tree_map_with_path(lambda path, _: fn(path_name(path)), tree)


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `config.lr` over `warmup_steps`, then cosine to `min_lr`."""
  warmup = int(config.warmup_steps)
  if warmup >= total_steps:
    raise ValueError(f'optimizer.warmup_steps={warmup} must be < total_steps={total_steps}.')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(config.lr), warmup_steps=warmup,
      decay_steps=int(total_steps), end_value=float(config.min_lr))


def lr_factor(name: str, depth: int, layer_decay: float = 1.0,
              task_head_lr_weight: float = 1.0) -> float:
  """The learning-rate multiplier of the parameter at `name`: layer_decay ** (depth + 1 -
  layer_id), times task_head_lr_weight for the task head (names starting with 'head/', as
  unilm's `name.startswith("head")`)."""
  factor = layer_decay ** (depth + 1 - layer_id(name, depth))
  return factor * (task_head_lr_weight if name.startswith('head/') else 1.0)


def lr_factors(name: str, shape: Sequence[int], depth: int, layer_decay: float = 1.0,
               task_head_lr_weight: float = 1.0) -> float | np.ndarray:
  """`lr_factor` of a leaf; for a leaf of scanned layers (stacked on its leading axis: n
  layers of `encoder/layers`, from 0, or of `encoder/vl_layers`, the top n) an array of one
  factor per layer, shaped (n, 1, ..., 1) to broadcast against the leaf."""
  match = _STACKED.search(name)
  if not match:
    return lr_factor(name, depth, layer_decay, task_head_lr_weight)
  n = int(shape[0])
  start = 0 if match.group(2) == 'layers' else depth - n
  ids = np.arange(start, start + n) + 1
  factor = np.asarray(layer_decay, np.float64) ** (depth + 1 - ids)
  return factor.reshape((n,) + (1,) * (len(shape) - 1))


def scale_by_layer_decay(layer_decay: float, depth: int, task_head_lr_weight: float = 1.0
                         ) -> optax.GradientTransformation:
  """Multiplies each update by `lr_factors` of its parameter."""
  def scale(path, u):
    f = lr_factors(path_name(path), u.shape, depth, layer_decay, task_head_lr_weight)
    return u * jnp.asarray(f, u.dtype)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config, total_steps: int, depth: int, *,
                   frozen: Sequence[str] = ()) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
  """(the optax transformation, its learning-rate schedule) for `config` (see module doc).

  Args:
    config: fields lr, min_lr, warmup_steps, b1, b2, eps, weight_decay, clip_norm, layer_decay,
      task_head_lr_weight, mu_dtype (`config.optimizer` of every job; `beit3_jax.defaults`).
    total_steps: length of the schedule.
    depth: encoder layers (for layer decay).
    frozen: regexes of parameter names that get no update (e.g. the VQ-KD codebook, which
      moves by EMA instead).
  """
  schedule = learning_rate_schedule(config, total_steps)
  parts = []
  if float(config.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(config.clip_norm)))
  mu_dtype = config.get('mu_dtype', 'float32')
  if mu_dtype not in MU_DTYPES:
    raise ValueError(f'optimizer.mu_dtype={mu_dtype!r}; expected one of {tuple(MU_DTYPES)}.')
  parts.append(optax.scale_by_adam(b1=float(config.b1), b2=float(config.b2),
                                   eps=float(config.eps), mu_dtype=MU_DTYPES[mu_dtype]))
  if float(config.weight_decay) > 0:
    parts.append(optax.add_decayed_weights(float(config.weight_decay),
                                           mask=lambda p: _map_names(decays, p)))
  layer_decay = float(config.layer_decay)
  head_weight = float(config.task_head_lr_weight)
  if layer_decay != 1.0 or head_weight != 1.0:
    parts.append(scale_by_layer_decay(layer_decay, depth, head_weight))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if frozen:
    patterns = [re.compile(p) for p in frozen]

    def labels(params):
      return _map_names(lambda n: 'frozen' if any(p.search(n) for p in patterns) else 'train',
                        params)
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule


def global_norm(tree) -> jax.Array:
  """sqrt(sum of squares) over every leaf, float32."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def describe_groups(params, depth: int, layer_decay: float = 1.0) -> dict[str, Any]:
  """Counts of decayed / not decayed parameters and the layer-decay scales (for logs, tests)."""
  names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  return {'decay': sorted(n for n in names if decays(n)),
          'no_decay': sorted(n for n in names if not decays(n)),
          'lr_scale': {n: layer_decay ** (depth + 1 - layer_id(n, depth)) for n in names}}

"""The train state, its sharded creation, and the jitted train and evaluation steps.

An objective (`masked_modeling.MaskedModeling`, `tokenizer_training.VQKDTraining`) supplies:

    init_params(rng) -> boxed params    init_extra(params) -> extra state (no gradients)
    normalizers(batch) -> loss denominators of the whole batch
    loss(params, extra, frozen, batch, rng, normalizers, train=, step=) -> (loss, (sums,
        new_extra)); step: the int32 updates done before this one in training, None in
        evaluation (captioning's drop-worst starts after a number of steps)
    finish(params, extra) -> (params, extra)   after each optimizer update
    reduce(sums) -> per-step scalars            summarize(summed sums) -> metrics
    first_batch_init(params, extra, frozen, batch) (optional; before the first step)

`train_step(state, batch, rng) -> (state, metrics)` is a pure function: the batch is split
into `micro_batches` slices whose gradients are summed (each slice's loss is divided by the
whole batch's normalizers, so the sum is the whole batch's gradient), then one optimizer
update. Per-task sums (cross-entropy, correct, count, the most frequent target's count) come
back as metrics with the loss, gradient and parameter norms, and the learning rate. A step
whose loss or gradient is not finite changes nothing but the step count (`skipped` = 1 in its
metrics).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from beit3_jax import sharding as sharding_lib
from beit3_jax.trainer.optimizer import global_norm


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, optimizer updates done.
    params: float32 parameters (plain arrays, sharded per the rules table).
    opt_state: the optax state (same shardings as the parameters it mirrors).
    extra: objective state that is not trained by gradients (VQ-KD's EMA statistics).
    rng: uint32 (2,) key data of the run's base key; step s uses fold_in(rng, s).
    frozen: inputs that never change (e.g. the visual tokenizer's params); not checkpointed.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any
  rng: jax.Array
  frozen: Any


CHECKPOINTED = ('step', 'params', 'opt_state', 'extra', 'rng')


def checkpoint_items(state: TrainState) -> dict:
  """The part of the state a checkpoint holds (everything but `frozen`)."""
  return {name: getattr(state, name) for name in CHECKPOINTED}


def param_dtype(objective):
  """The dtype the params are kept in: the model config's `param_dtype` ('float32' default;
  'bfloat16' halves their memory, the optimizer then updates bfloat16 weights)."""
  cfg = getattr(objective, 'model_cfg', None)
  name = cfg.get('param_dtype', 'float32') if cfg is not None else 'float32'
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def _cast_params(params, dtype):
  if dtype == jnp.float32:
    return params
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)


def _boxed_state(objective, tx, rng, frozen):
  params = _cast_params(objective.init_params(rng), param_dtype(objective))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    extra=objective.init_extra(params),
                    rng=jax.random.key_data(jax.random.fold_in(rng, 1)), frozen=frozen)


def abstract_state(objective, tx, rng) -> TrainState:
  """ShapeDtypeStructs of the state (plain leaves, `frozen` None), without allocating."""
  return jax.eval_shape(lambda r: nn.meta.unbox(_boxed_state(objective, tx, r, None)), rng)


def boxed_abstract_state(objective, tx, rng) -> TrainState:
  """`abstract_state` with the logical axis names still on the leaves."""
  return jax.eval_shape(lambda r: _boxed_state(objective, tx, r, None), rng)


def state_shardings(objective, tx, mesh: Mesh, rng, frozen_shardings) -> TrainState:
  """NamedShardings of the whole state from the logical names of the params (rules table)."""
  shardings = sharding_lib.mesh_shardings(boxed_abstract_state(objective, tx, rng), mesh)
  return shardings.replace(frozen=frozen_shardings)


def create_state(objective, tx, mesh: Mesh, rng: jax.Array, frozen=None,
                 frozen_shardings=None) -> tuple[TrainState, TrainState]:
  """(state born sharded over `mesh`, its shardings). `rng` is a typed key."""
  shardings = state_shardings(objective, tx, mesh, rng, frozen_shardings)

  def init(r):
    return nn.meta.unbox(_boxed_state(objective, tx, r, None))

  with sharding_lib.use_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings.replace(frozen=None))(rng)
  return state.replace(frozen=frozen), shardings


def _split_micro_batches(batch, k: int):
  """Leading axis B -> (k, B // k): slice j holds examples j, j + k, j + 2k, ...

  Taking every k-th example keeps each slice spread evenly over the devices that hold the
  batch (a device's block of consecutive examples contributes to every slice).
  """
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f'Batch of {x.shape[0]} does not split into {k} micro-batches.')
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(objective, tx: optax.GradientTransformation, schedule: Callable,
                    micro_batches: int = 1) -> Callable:
  """The pure step `(state, batch, rng) -> (state, metrics)` (not yet jitted)."""
  grad_fn = jax.value_and_grad(objective.loss, has_aux=True)

  def train_step(state: TrainState, batch, rng):
    normalizers = objective.normalizers(batch)
    if micro_batches == 1:
      (loss, (sums, extra)), grads = grad_fn(state.params, state.extra, state.frozen, batch,
                                             rng, normalizers, train=True, step=state.step)
    else:
      slices = _split_micro_batches(batch, micro_batches)

      def body(carry, xs):
        grads_acc, loss_acc, sums_acc, extra = carry
        micro, j = xs
        (l, (s, extra)), g = grad_fn(state.params, extra, state.frozen, micro,
                                     jax.random.fold_in(rng, j), normalizers, train=True,
                                     step=state.step)
        add = lambda a, b: a + b  # noqa: E731
        return (jax.tree.map(add, grads_acc, g), loss_acc + l, jax.tree.map(add, sums_acc, s),
                extra), None

      first = jax.tree.map(lambda x: x[0], slices)
      _, (sums_shape, _) = jax.eval_shape(
          lambda: objective.loss(state.params, state.extra, state.frozen, first, rng,
                                 normalizers, train=True, step=state.step))
      zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), t)  # noqa: E731
      init = (zeros(state.params), jnp.zeros((), jnp.float32), zeros(sums_shape), state.extra)
      (grads, loss, sums, extra), _ = jax.lax.scan(
          body, init, (slices, jnp.arange(micro_batches)))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, extra = objective.finish(params, extra)
    grad_norm = global_norm(grads)
    # A non-finite loss or gradient skips the update: params, optimizer and extra state stay
    # as they were (the step still counts, so the data and the schedule move on).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa
    params, opt_state, extra = (keep(params, state.params), keep(opt_state, state.opt_state),
                                keep(extra, state.extra))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'param_norm': global_norm(params),
               'learning_rate': schedule(state.step), 'tasks': objective.reduce(sums),
               'skipped': 1 - finite.astype(jnp.int32)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              extra=extra)
    return new_state, metrics

  return train_step


def make_eval_step(objective) -> Callable:
  """`(params, extra, frozen, batch) -> per-task sums` (histograms kept, for the split's
  most-frequent-target baseline), deterministic."""
  def eval_step(params, extra, frozen, batch):
    normalizers = objective.normalizers(batch)
    _, (sums, _) = objective.loss(params, extra, frozen, batch, jax.random.key(0), normalizers,
                                  train=False)
    return sums
  return eval_step


def jit_train_step(train_step, mesh: Mesh, shardings: TrainState, batch_example):
  """jax.jit with the state's shardings in and out, the batch laid out by the rules' 'batch'
  entry (`sharding.batch_sharding`: over (data, fsdp)), the state donated."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  batch_shardings = jax.tree.map(lambda _: batch_sharding, batch_example)
  return jax.jit(train_step, in_shardings=(shardings, batch_shardings, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def jit_eval_step(eval_step, mesh: Mesh, shardings: TrainState):
  """jax.jit of an eval step; every leaf of the batch laid out by `sharding.batch_sharding`
  (one sharding for the whole tree, so validation batches may carry fields, such as `valid`,
  that training batches lack)."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(shardings.params, shardings.extra, shardings.frozen,
                                          batch_sharding),
                 out_shardings=replicated)

"""Autoregressive decoding (captioning): greedy search, beam search and sequence scoring.

Everything here is model-agnostic and runs under `jax.jit` with fixed shapes (`max_len` and
`beam_size` are static Python ints; the token ids and `length_penalty` may be traced). The
model is a pure step function

    step_fn(state, token_ids, position) -> (log_probs, new_state)

  token_ids: (N,) int32, the token at `position` of each of the N sequences.
  position:  int32 scalar; 0 for the bos token, i for the i-th generated token.
  log_probs: (N, V) log-probabilities of the token at `position + 1` (cast to float32 here).
  state:     any pytree, e.g. a key/value cache. Every leaf with ndim >= 1 must have the N
             sequences as its leading axis: beam search repeats it from B to B*K rows at the
             start (`expand_to_beams`, row b*K + k is beam k of example b) and gathers rows
             whenever beams are selected. Scalar leaves (e.g. a shared cache index) are passed
             along unchanged.

Decoding conventions (shared by `greedy_decode`, `beam_search` and `sequence_log_prob`):

  - The bos token is fed at position 0 and is not part of the output; `tokens[:, i]` is the
    token generated at step i (fed back at position i + 1). At most `max_len` tokens are
    generated, eos included.
  - The searches never generate `pad_id` (its log-probability is set to -inf before the
    choice, without renormalising the others; not done when pad_id == eos_id). Everything
    after an eos is `pad_id`.
  - Score of a hypothesis y_1..y_L: sum_{i<=L} log p(y_i | bos, y_<i) / L ** length_penalty.
    L counts the generated tokens including the eos and excluding bos. A hypothesis that
    reaches `max_len` tokens without an eos is finished at that point and scored the same way
    with L = max_len. length_penalty = 0 ranks by total log-probability, 1 by the mean per
    token; larger values favour longer hypotheses (with negative log-probabilities).

Beam search (the fairseq-style 2K-candidates scheme, with fixed shapes):

  At step t every alive hypothesis is extended by every token and the 2K best candidates by
  raw total log-probability are taken. A candidate that ends in eos and ranks within the
  first K becomes finished (at the last step, t = max_len - 1, every candidate within the
  first K does); it is scored as above and merged into the example's K best finished
  hypotheses. The K best candidates that do not end in eos stay alive (there are at most K
  eos candidates among the 2K, so these are the exact K best continuations). Finished
  hypotheses are never extended. An example is done once it holds K finished hypotheses:
  later candidates no longer enter its finished set (its alive beams keep being computed,
  with fixed shapes, but are ignored). Hence beam_size=1 is exactly greedy search, and a
  beam at least as wide as the number of possible hypotheses returns all of them, i.e. the
  result of an exhaustive search.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]

_NEG_INF = float('-inf')


def expand_to_beams(state, beam_size: int):
  """Repeats each leaf's leading (batch) axis `beam_size` times: row b*K + k = example b."""
  return jax.tree.map(
      lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, beam_size, axis=0), state)


def gather_rows(state, index):
  """`x[index]` along the leading axis of every leaf with ndim >= 1 (beam reordering)."""
  return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, index, axis=0), state)


def _batch_size(state, batch_size):
  if batch_size is not None:
    return int(batch_size)
  for leaf in jax.tree.leaves(state):
    if jnp.ndim(leaf) >= 1:
      return int(jnp.shape(leaf)[0])
  raise ValueError('the state has no leaf with a batch axis: pass batch_size')


def _mask_pad(log_probs, pad_id, eos_id):
  """float32 log-probs with pad_id at -inf (unless pad_id == eos_id)."""
  log_probs = log_probs.astype(jnp.float32)
  vocab = jnp.arange(log_probs.shape[-1])
  banned = (vocab == pad_id) & (pad_id != eos_id)
  return jnp.where(banned, _NEG_INF, log_probs)


def _normalize(total_log_prob, length, length_penalty):
  """total / length ** length_penalty (float32); -inf stays -inf."""
  length = jnp.asarray(length, jnp.float32)
  return total_log_prob / length ** jnp.asarray(length_penalty, jnp.float32)


def _check_len(max_len):
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f'max_len must be a static int >= 1, got {max_len!r}')


def greedy_decode(step_fn: StepFn, state, bos_id, eos_id, pad_id, max_len: int, *,
                  batch_size: int | None = None) -> jax.Array:
  """Greedy search: the most probable token at each step (pad excluded), pad after eos.

  Args:
    step_fn: the model step (module docstring); called with B rows.
    state: its initial state for the B examples.
    bos_id, eos_id, pad_id: token ids (ints or int32 scalars).
    max_len: static, the most tokens generated (eos included).
    batch_size: B, only needed when no leaf of `state` has a batch axis.

  Returns:
    tokens: (B, max_len) int32, without the bos; pad_id after the first eos.
  """
  _check_len(max_len)
  b = _batch_size(state, batch_size)
  tokens = jnp.full((b, max_len), pad_id, jnp.int32)
  last = jnp.full((b,), bos_id, jnp.int32)
  done = jnp.zeros((b,), bool)

  def body(t, carry):
    tokens, last, done, state = carry
    log_probs, state = step_fn(state, last, jnp.asarray(t, jnp.int32))
    log_probs = _mask_pad(log_probs, pad_id, eos_id)
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    token = jnp.where(done, jnp.asarray(pad_id, jnp.int32), token)
    tokens = tokens.at[:, t].set(token)
    return tokens, token, done | (token == eos_id), state

  tokens, _, _, _ = jax.lax.fori_loop(0, max_len, body, (tokens, last, done, state))
  return tokens


def beam_search(step_fn: StepFn, state, bos_id, eos_id, pad_id, max_len: int,
                beam_size: int, length_penalty=1.0, *,
                batch_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Beam search with K = beam_size beams per example (the module docstring's conventions).

  Args:
    step_fn: the model step; called with B*K rows (row b*K + k is beam k of example b).
    state: its initial state for the B examples (repeated to B*K rows here).
    bos_id, eos_id, pad_id: token ids.
    max_len: static, the most tokens generated (eos included).
    beam_size: static K >= 1.
    length_penalty: the exponent in score = total log-prob / length ** length_penalty.
    batch_size: B, only needed when no leaf of `state` has a batch axis.

  Returns:
    tokens: (B, K, max_len) int32 finished hypotheses without the bos, best first, pad_id
      after the eos (and for all tokens of an empty slot).
    scores: (B, K) float32, their scores, descending. A slot stays -inf only when fewer than
      K hypotheses with a finite log-probability exist.
  """
  _check_len(max_len)
  k = int(beam_size)
  if k < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size!r}')
  b = _batch_size(state, batch_size)
  pad = jnp.asarray(pad_id, jnp.int32)

  state = expand_to_beams(state, k)
  alive_seq = jnp.full((b, k, max_len), pad, jnp.int32)
  # Only beam 0 starts alive, so the first step does not produce K copies of each token.
  alive_logp = jnp.full((b, k), _NEG_INF, jnp.float32).at[:, 0].set(0.0)
  fin_seq = jnp.full((b, k, max_len), pad, jnp.int32)
  fin_score = jnp.full((b, k), _NEG_INF, jnp.float32)
  last = jnp.full((b * k,), bos_id, jnp.int32)
  row_base = jnp.arange(b)[:, None] * k

  def take(x, idx):  # x: (b, n, ...), idx: (b, m) -> (b, m, ...)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def body(t, carry):
    alive_seq, alive_logp, fin_seq, fin_score, last, state = carry
    log_probs, state = step_fn(state, last, jnp.asarray(t, jnp.int32))
    log_probs = _mask_pad(log_probs, pad_id, eos_id)
    vocab = log_probs.shape[-1]
    cand = (alive_logp[:, :, None] + log_probs.reshape(b, k, vocab)).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # (b, 2k), descending
    parent = top_idx // vocab
    token = (top_idx % vocab).astype(jnp.int32)
    seq = take(alive_seq, parent).at[:, :, t].set(token)  # (b, 2k, max_len)
    is_eos = token == eos_id

    # Finished: eos (or any token at the last step) among the first K, with a finite score.
    ends = (is_eos[:, :k] | (t == max_len - 1)) & (top_logp[:, :k] > _NEG_INF)
    new_score = jnp.where(ends, _normalize(top_logp[:, :k], t + 1, length_penalty), _NEG_INF)
    pool_score = jnp.concatenate([fin_score, new_score], axis=1)
    pool_seq = jnp.concatenate([fin_seq, seq[:, :k]], axis=1)
    merged_score, merged_idx = jax.lax.top_k(pool_score, k)
    done = fin_score[:, k - 1] > _NEG_INF  # already K finished: frozen
    fin_score = jnp.where(done[:, None], fin_score, merged_score)
    fin_seq = jnp.where(done[:, None, None], fin_seq, take(pool_seq, merged_idx))

    # Alive: the K best candidates that do not end in eos.
    alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, top_logp), k)
    alive_seq = take(seq, keep)
    rows = (row_base + take(parent, keep)).reshape(b * k)
    state = gather_rows(state, rows)
    last = take(token, keep).reshape(b * k)
    return alive_seq, alive_logp, fin_seq, fin_score, last, state

  carry = (alive_seq, alive_logp, fin_seq, fin_score, last, state)
  _, _, fin_seq, fin_score, _, _ = jax.lax.fori_loop(0, max_len, body, carry)
  fin_seq = jnp.where((fin_score > _NEG_INF)[:, :, None], fin_seq, pad)
  return fin_seq, fin_score


def sequence_log_prob(step_fn: StepFn, state, tokens, bos_id, eos_id, length_penalty=0.0):
  """Scores given sequences with the searches' convention (module docstring).

  Args:
    step_fn: the model step; called with B rows.
    state: its initial state for the B sequences.
    tokens: (B, T) int32 generated tokens without the bos. A sequence ends at its first eos
      (included; what follows is ignored) or else after all T tokens.
    bos_id, eos_id: token ids.
    length_penalty: the exponent; 0 (the default) gives the plain total log-probability.

  Returns:
    (B,) float32: total log p(tokens up to the end | bos) / length ** length_penalty, with
    the model's log-probs as they are (the searches' pad ban does not renormalise, so their
    scores agree with this one).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  b, steps = tokens.shape
  if steps < 1:
    raise ValueError('tokens must have at least one position')

  def body(carry, xs):
    state, last, total, length, done = carry
    t, token = xs
    log_probs, state = step_fn(state, last, t)
    token_lp = jnp.take_along_axis(log_probs.astype(jnp.float32), token[:, None], axis=1)[:, 0]
    total = total + jnp.where(done, 0.0, token_lp)
    length = length + jnp.where(done, 0, 1)
    return (state, token, total, length, done | (token == eos_id)), None

  carry = (state, jnp.full((b,), bos_id, jnp.int32), jnp.zeros((b,), jnp.float32),
           jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
  xs = (jnp.arange(steps, dtype=jnp.int32), tokens.T)
  (_, _, total, length, _), _ = jax.lax.scan(body, carry, xs)
  return _normalize(total, length, length_penalty)

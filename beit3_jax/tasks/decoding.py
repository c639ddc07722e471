"""Autoregressive decoding (captioning): greedy search, beam search and sequence scoring.

Everything here is model-agnostic and runs under `jax.jit` with fixed shapes (`max_len`,
`beam_size` and the search options are static Python values; the token ids and
`length_penalty` may be traced). The model is a pure step function

    step_fn(state, token_ids, position) -> (log_probs, new_state)

  token_ids: (N,) int32, the token at `position` of each of the N sequences.
  position:  int32 scalar; 0 for the bos token, i for the i-th generated token.
  log_probs: (N, V) log-probabilities of the token at `position + 1` (cast to float32 here).
  state:     any pytree, e.g. a key/value cache. Every leaf with ndim >= 1 must have the N
             sequences as its leading axis: beam search repeats it from B to B*K rows at the
             start (`expand_to_beams`, row b*K + k is beam k of example b) and gathers rows
             whenever beams are selected. Scalar leaves (e.g. a shared cache index) are passed
             along unchanged.

Conventions shared by all searches:

  - The bos token is fed at position 0 and is not part of the output; `tokens[:, i]` is the
    token generated at step i (fed back at position i + 1). At most `max_len` tokens are
    generated (steps 0 .. max_len - 1), eos included. Everything after an eos is `pad_id`.
  - `min_len`: eos is banned at steps t < min_len (at least min_len tokens before the eos).
    `ban_pad`: pad_id is banned everywhere (not done when pad_id == eos_id). A banned token's
    log-probability is set to -inf without renormalising the others.

Beam search, style 'unilm' (the default): unilm BEiT-3's captioning search
(beit3/engine_for_finetuning.py CaptioningHandler.eval_batch with beit3/utils.py
BeamHypotheses), token for token:

  - Beams start as beam 0 at log-prob 0 and beams 1..K-1 at -1e9 (not -inf), float32.
  - At step t every beam is extended by every token (pad and all special tokens included: unilm
    bans nothing and has no minimum length) and the 3K best candidates by total log-prob are
    taken (`lax.top_k`: ties go to the lower beam * V + token index).
  - First the example may stop: once it holds `num_best` finished hypotheses it is done if
    `early_stopping`, or else when the worst of them scores >= (the best candidate's total
    log-prob) / (max_len + 1) ** length_penalty. A done example keeps its hypotheses.
  - Otherwise the candidates are read in rank order: an eos candidate is finished, any other
    becomes a beam of the next step, until K beams are found (so an eos ranked after the K-th
    non-eos candidate is dropped). At the last step (t = max_len - 1) every one of the 3K
    candidates is finished, whatever its token.
  - A finished hypothesis is the parent's tokens followed by eos: the candidate's own token is
    written as eos (unilm drops the last word of a hypothesis finished by the length limit,
    though its log-prob counts). Its score is total log-prob / (t + 2) ** length_penalty, i.e.
    L + 1 where L = t + 1 tokens were generated, eos included (unilm counts the bos).
  - An example keeps its `num_best` best finished hypotheses; a new one enters only if it
    scores strictly higher than the worst when the list is full. (With num_best > 1 and two
    exactly equal scores unilm may evict a different one of the two.)
  - unilm's `--num_max_bpe_tokens M` is max_len = M - 2 here: its loop feeds M - 2 steps that
    can finish a hypothesis (its last iteration changes nothing), so a caption has at most
    M - 3 words and the eos. An empty slot (never with num_best = 1 and max_len >= 1) has
    score -1e5 and all tokens pad, as unilm fills it.

Beam search, style 'k_finished' (fairseq-like; not unilm's): at step t the 2K best candidates
by total log-prob are taken. An eos candidate ranked within the first K is finished (at the last
step every candidate within the first K is, keeping its own token); the K best non-eos
candidates stay alive. An example is done once it holds K finished hypotheses. Score:
total log-prob / L ** length_penalty, L = generated tokens with the eos. beam_size=1 is then
exactly `greedy_decode`, and a beam as wide as the number of possible hypotheses is an
exhaustive search.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]

_NEG_INF = float('-inf')
STYLES = ('unilm', 'k_finished')

# unilm's constants (beit3/engine_for_finetuning.py CaptioningHandler.eval_batch).
UNILM_START_SCORE = -1e9     # beams 1..K-1 at the start
UNILM_TOPN_PER_BEAM = 3      # 3K candidates per step
UNILM_EMPTY_SCORE = -1e5     # the score of a slot without hypothesis
_LOWEST = float(np.finfo(np.float32).min)


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


def _ban(log_probs, t, pad_id, eos_id, ban_pad: bool, min_len: int):
  """float32 log-probs with the banned tokens at -inf: pad_id (if ban_pad and pad_id !=
  eos_id), and eos_id while t < min_len."""
  log_probs = log_probs.astype(jnp.float32)
  vocab = jnp.arange(log_probs.shape[-1])
  banned = jnp.zeros(vocab.shape, bool)
  if ban_pad:
    banned = banned | ((vocab == pad_id) & (pad_id != eos_id))
  if min_len:
    banned = banned | ((vocab == eos_id) & (t < min_len))
  return jnp.where(banned, _NEG_INF, log_probs)


def _normalize(total_log_prob, length, length_penalty):
  """total / length ** length_penalty (float32); -inf stays -inf."""
  length = jnp.asarray(length, jnp.float32)
  return total_log_prob / length ** jnp.asarray(length_penalty, jnp.float32)


def _check_len(max_len, min_len=0):
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f'max_len must be a static int >= 1, got {max_len!r}')
  if not isinstance(min_len, int) or not 0 <= min_len <= max_len:
    raise ValueError(f'min_len must be a static int in [0, max_len={max_len}], got {min_len!r}')


def _take(x, idx):
  """x: (b, n, ...), idx: (b, m) -> (b, m, ...) along axis 1."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def greedy_decode(step_fn: StepFn, state, bos_id, eos_id, pad_id, max_len: int, *,
                  batch_size: int | None = None, min_len: int = 0,
                  ban_pad: bool = True) -> jax.Array:
  """Greedy search: the most probable allowed token at each step, pad after eos. (unilm's
  captioning has no greedy search; its beam search with one beam differs, see beam_search.)

  Args:
    step_fn: the model step (module docstring); called with B rows.
    state: its initial state for the B examples.
    bos_id, eos_id, pad_id: token ids (ints or int32 scalars).
    max_len: static, the most tokens generated (eos included).
    batch_size: B, only needed when no leaf of `state` has a batch axis.
    min_len: static, eos is banned at steps t < min_len.
    ban_pad: static, never generate pad_id (unless it equals eos_id).

  Returns:
    tokens: (B, max_len) int32, without the bos; pad_id after the first eos.
  """
  _check_len(max_len, min_len)
  b = _batch_size(state, batch_size)
  tokens = jnp.full((b, max_len), pad_id, jnp.int32)
  last = jnp.full((b,), bos_id, jnp.int32)
  done = jnp.zeros((b,), bool)

  def body(t, carry):
    tokens, last, done, state = carry
    log_probs, state = step_fn(state, last, jnp.asarray(t, jnp.int32))
    log_probs = _ban(log_probs, t, pad_id, eos_id, ban_pad, min_len)
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    token = jnp.where(done, jnp.asarray(pad_id, jnp.int32), token)
    tokens = tokens.at[:, t].set(token)
    return tokens, token, done | (token == eos_id), state

  tokens, _, _, _ = jax.lax.fori_loop(0, max_len, body, (tokens, last, done, state))
  return tokens


def beam_search(step_fn: StepFn, state, bos_id, eos_id, pad_id, max_len: int,
                beam_size: int, length_penalty=0.6, *, batch_size: int | None = None,
                style: str = 'unilm', num_best: int | None = None, min_len: int = 0,
                ban_pad: bool = False, early_stopping: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """Beam search with K = beam_size beams per example (the module docstring's rules).

  Args:
    step_fn: the model step; called with B*K rows (row b*K + k is beam k of example b).
    state: its initial state for the B examples (repeated to B*K rows here).
    bos_id, eos_id, pad_id: token ids.
    max_len: static, the most tokens generated (eos included); unilm's
      --num_max_bpe_tokens minus 2.
    beam_size: static K >= 1.
    length_penalty: the exponent of the length in the score (unilm --length_penalty, 0.6).
    batch_size: B, only needed when no leaf of `state` has a batch axis.
    style: static, 'unilm' (unilm's search) or 'k_finished' (module docstring).
    num_best: static, the hypotheses kept and returned per example: None = 1 for 'unilm'
      (unilm's num_keep_best) and K for 'k_finished' (at most K there).
    min_len: static, eos is banned at steps t < min_len (unilm: 0, none).
    ban_pad: static, never generate pad_id (unilm: False).
    early_stopping: static, 'unilm' only: an example is done as soon as it holds num_best
      finished hypotheses (unilm: False).

  Returns:
    tokens: (B, num_best, max_len) int32 finished hypotheses without the bos, best first,
      pad_id after the eos (and for all tokens of an empty slot).
    scores: (B, num_best) float32, their scores, descending. An empty slot has -1e5 ('unilm')
      or -inf ('k_finished').
  """
  _check_len(max_len, min_len)
  if style not in STYLES:
    raise ValueError(f'style must be one of {STYLES}, got {style!r}')
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f'beam_size must be a static int >= 1, got {beam_size!r}')
  k = beam_size
  if num_best is None:
    num_best = 1 if style == 'unilm' else k
  limit = k if style == 'k_finished' else None
  if not isinstance(num_best, int) or num_best < 1 or (limit and num_best > limit):
    raise ValueError(f'num_best must be a static int in [1, {limit or "inf"}], got '
                     f'{num_best!r}')
  if early_stopping and style != 'unilm':
    raise ValueError("early_stopping is an option of style='unilm' only")
  b = _batch_size(state, batch_size)
  args = (step_fn, expand_to_beams(state, k), bos_id, eos_id, pad_id, max_len, k,
          length_penalty, b, min_len, bool(ban_pad))
  if style == 'unilm':
    return _unilm_beam_search(*args, num_best, bool(early_stopping))
  tokens, scores = _k_finished_beam_search(*args)
  return tokens[:, :num_best], scores[:, :num_best]


def _unilm_beam_search(step_fn, state, bos_id, eos_id, pad_id, max_len, k, length_penalty, b,
                       min_len, ban_pad, n, early_stopping):
  """style='unilm' on the expanded state (B*K rows); n = num_best."""
  num_cand = UNILM_TOPN_PER_BEAM * k
  pad, eos = jnp.asarray(pad_id, jnp.int32), jnp.asarray(eos_id, jnp.int32)
  length_penalty = jnp.asarray(length_penalty, jnp.float32)
  row_base = jnp.arange(b)[:, None] * k
  rank = jnp.arange(num_cand)

  alive_seq = jnp.full((b, k, max_len), pad, jnp.int32)
  alive_logp = jnp.full((b, k), UNILM_START_SCORE, jnp.float32).at[:, 0].set(0.0)
  fin_seq = jnp.full((b, n, max_len), pad, jnp.int32)
  fin_score = jnp.full((b, n), _NEG_INF, jnp.float32)
  fin_count = jnp.zeros((b,), jnp.int32)
  done = jnp.zeros((b,), bool)
  last = jnp.full((b * k,), bos_id, jnp.int32)
  # BeamHypotheses.is_done divides by its max_length, unilm's max_len - 1 = ours + 1.
  bound_div = jnp.float32(max_len + 1) ** length_penalty

  def body(t, carry):
    alive_seq, alive_logp, fin_seq, fin_score, fin_count, done, last, state = carry
    log_probs, state = step_fn(state, last, jnp.asarray(t, jnp.int32))
    log_probs = _ban(log_probs, t, pad_id, eos_id, ban_pad, min_len)
    vocab = log_probs.shape[-1]
    if vocab < UNILM_TOPN_PER_BEAM:
      raise ValueError(f'style unilm needs a vocabulary of >= {UNILM_TOPN_PER_BEAM} tokens, '
                       f'got {vocab}')
    cand = (alive_logp[:, :, None] + log_probs.reshape(b, k, vocab)).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, num_cand)  # (b, 3k), descending
    parent = top_idx // vocab
    token = (top_idx % vocab).astype(jnp.int32)

    # unilm checks is_done before reading this step's candidates.
    full = fin_count >= n
    no_better = fin_score[:, n - 1] >= top_logp[:, 0] / bound_div
    done = done | (full & (early_stopping | no_better))

    is_eos = token == eos
    word = ~is_eos
    words_before = jnp.cumsum(word, axis=1) - word
    last_step = t == max_len - 1
    enters = (last_step | (is_eos & (words_before < k))) & ~done[:, None]
    new_score = top_logp / jnp.asarray(t + 2, jnp.float32) ** length_penalty
    new_seq = _take(alive_seq, parent).at[:, :, t].set(eos)

    # The list stays sorted best first, so top_k over [list, candidates in rank order] keeps a
    # listed hypothesis against an equal newcomer, and the earlier of equal newcomers.
    valid = jnp.arange(n)[None] < fin_count[:, None]
    key = jnp.concatenate([jnp.where(valid, jnp.maximum(fin_score, _LOWEST), _NEG_INF),
                           jnp.where(enters, jnp.maximum(new_score, _LOWEST), _NEG_INF)], 1)
    _, pick = jax.lax.top_k(key, n)
    fin_score = _take(jnp.concatenate([fin_score, new_score], 1), pick)
    fin_seq = _take(jnp.concatenate([fin_seq, new_seq], 1), pick)
    fin_count = jnp.minimum(n, fin_count + jnp.sum(enters, axis=1, dtype=jnp.int32))

    # The next beams: the first K non-eos candidates in rank order.
    _, keep = jax.lax.top_k(-jnp.where(word, rank, num_cand + rank), k)
    keep_parent = _take(parent, keep)
    alive_logp = _take(top_logp, keep)
    last = _take(token, keep)
    alive_seq = _take(alive_seq, keep_parent).at[:, :, t].set(last)
    state = gather_rows(state, (row_base + keep_parent).reshape(b * k))
    return (alive_seq, alive_logp, fin_seq, fin_score, fin_count, done, last.reshape(b * k),
            state)

  carry = (alive_seq, alive_logp, fin_seq, fin_score, fin_count, done, last, state)
  carry = jax.lax.fori_loop(0, max_len, body, carry)
  fin_seq, fin_score, fin_count = carry[2], carry[3], carry[4]
  valid = jnp.arange(n)[None] < fin_count[:, None]
  return (jnp.where(valid[:, :, None], fin_seq, pad),
          jnp.where(valid, fin_score, jnp.float32(UNILM_EMPTY_SCORE)))


def _k_finished_beam_search(step_fn, state, bos_id, eos_id, pad_id, max_len, k, length_penalty,
                            b, min_len, ban_pad):
  """style='k_finished' on the expanded state (B*K rows): (B, K, max_len), (B, K)."""
  pad = jnp.asarray(pad_id, jnp.int32)
  alive_seq = jnp.full((b, k, max_len), pad, jnp.int32)
  # Only beam 0 starts alive, so the first step does not produce K copies of each token.
  alive_logp = jnp.full((b, k), _NEG_INF, jnp.float32).at[:, 0].set(0.0)
  fin_seq = jnp.full((b, k, max_len), pad, jnp.int32)
  fin_score = jnp.full((b, k), _NEG_INF, jnp.float32)
  last = jnp.full((b * k,), bos_id, jnp.int32)
  row_base = jnp.arange(b)[:, None] * k

  def body(t, carry):
    alive_seq, alive_logp, fin_seq, fin_score, last, state = carry
    log_probs, state = step_fn(state, last, jnp.asarray(t, jnp.int32))
    log_probs = _ban(log_probs, t, pad_id, eos_id, ban_pad, min_len)
    vocab = log_probs.shape[-1]
    cand = (alive_logp[:, :, None] + log_probs.reshape(b, k, vocab)).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # (b, 2k), descending
    parent = top_idx // vocab
    token = (top_idx % vocab).astype(jnp.int32)
    seq = _take(alive_seq, parent).at[:, :, t].set(token)  # (b, 2k, max_len)
    is_eos = token == eos_id

    # Finished: eos (or any token at the last step) among the first K, with a finite score.
    ends = (is_eos[:, :k] | (t == max_len - 1)) & (top_logp[:, :k] > _NEG_INF)
    new_score = jnp.where(ends, _normalize(top_logp[:, :k], t + 1, length_penalty), _NEG_INF)
    pool_score = jnp.concatenate([fin_score, new_score], axis=1)
    pool_seq = jnp.concatenate([fin_seq, seq[:, :k]], axis=1)
    merged_score, merged_idx = jax.lax.top_k(pool_score, k)
    done = fin_score[:, k - 1] > _NEG_INF  # already K finished: frozen
    fin_score = jnp.where(done[:, None], fin_score, merged_score)
    fin_seq = jnp.where(done[:, None, None], fin_seq, _take(pool_seq, merged_idx))

    # Alive: the K best candidates that do not end in eos.
    alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, top_logp), k)
    alive_seq = _take(seq, keep)
    rows = (row_base + _take(parent, keep)).reshape(b * k)
    state = gather_rows(state, rows)
    last = _take(token, keep).reshape(b * k)
    return alive_seq, alive_logp, fin_seq, fin_score, last, state

  carry = (alive_seq, alive_logp, fin_seq, fin_score, last, state)
  _, _, fin_seq, fin_score, _, _ = jax.lax.fori_loop(0, max_len, body, carry)
  fin_seq = jnp.where((fin_score > _NEG_INF)[:, :, None], fin_seq, pad)
  return fin_seq, fin_score


def sequence_log_prob(step_fn: StepFn, state, tokens, bos_id, eos_id, length_penalty=0.0, *,
                      length_offset: int = 0):
  """Scores given sequences: total log-prob / (L + length_offset) ** length_penalty.

  Args:
    step_fn: the model step; called with B rows.
    state: its initial state for the B sequences.
    tokens: (B, T) int32 generated tokens without the bos. A sequence ends at its first eos
      (included; what follows is ignored) or else after all T tokens.
    bos_id, eos_id: token ids.
    length_penalty: the exponent; 0 (the default) gives the plain total log-probability.
    length_offset: static, added to L (the tokens up to the end, eos included): 0 is the
      'k_finished' beam search's score, 1 the 'unilm' one's for an eos-terminated sequence.

  Returns:
    (B,) float32, with the model's log-probs as they are (the searches' bans do not
    renormalise, so their scores agree with this one).
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
  return _normalize(total, length + length_offset, length_penalty)

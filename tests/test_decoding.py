"""Greedy and beam search (`beit3_jax.tasks.decoding`).

Style 'unilm' (the default) is checked token for token against unilm's own captioning beam
search run on a fake model (tests/fixtures/unilm_beam_search.json).

Style 'k_finished' and greedy search run on a tiny random language model whose next-token
distribution depends on the position, the current token, the token before it, the running sum
of the tokens so far and a per-example bias, all carried in the state (plus a shared scalar
leaf), so a beam whose state is not reordered with it scores differently. Every result is
checked against a NumPy implementation of the same model: an exhaustive search, and a
plain-Python beam search written from the documented convention.
"""

import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit3_jax.tasks import decoding

PAD, BOS, EOS = 0, 1, 2
MAX_LEN = 4
NUM_ACC = 3  # the running sum enters the logits modulo this


def make_tables(seed, vocab, batch):
  rng = np.random.default_rng(seed)
  return dict(
      cur=rng.normal(scale=2.0, size=(MAX_LEN, vocab, vocab)).astype(np.float32),
      prev=rng.normal(size=(vocab, vocab)).astype(np.float32),
      acc=rng.normal(size=(NUM_ACC, vocab)).astype(np.float32),
      bias=rng.normal(size=(batch, vocab)).astype(np.float32),
  )


def init_state(tables):
  batch = tables['bias'].shape[0]
  return {'prev': jnp.full((batch,), BOS, jnp.int32), 'acc': jnp.zeros((batch,), jnp.int32),
          'bias': jnp.asarray(tables['bias']), 'calls': jnp.zeros((), jnp.int32)}


def make_step(tables):
  cur, prev, acc = (jnp.asarray(tables[n]) for n in ('cur', 'prev', 'acc'))

  def step_fn(state, token_ids, position):
    logits = (cur[position, token_ids] + prev[state['prev']] + acc[state['acc'] % NUM_ACC]
              + state['bias'])
    new_state = {'prev': token_ids, 'acc': state['acc'] + token_ids, 'bias': state['bias'],
                 'calls': state['calls'] + 1}
    return jax.nn.log_softmax(logits, axis=-1), new_state

  return step_fn


def ref_log_probs(tables, example, seq):
  """NumPy: log p(seq[i] | bos, seq[:i]) for each i, for one example."""
  prev_tok, acc, token, out = BOS, 0, BOS, []
  for pos, nxt in enumerate(seq):
    logits = (tables['cur'][pos, token] + tables['prev'][prev_tok]
              + tables['acc'][acc % NUM_ACC] + tables['bias'][example]).astype(np.float64)
    logits = logits - logits.max()
    log_probs = logits - np.log(np.exp(logits).sum())
    out.append(log_probs[nxt])
    prev_tok, acc, token = token, acc + token, nxt
  return np.array(out)


def ref_score(tables, example, seq, length_penalty):
  return ref_log_probs(tables, example, seq).sum() / len(seq) ** length_penalty


def all_hypotheses(vocab):
  """Every hypothesis: eos-terminated of any length <= MAX_LEN, and the unterminated ones of
  length MAX_LEN (pad is never generated)."""
  words = [v for v in range(vocab) if v not in (PAD, EOS)]
  hyps = []
  for n in range(MAX_LEN):
    hyps += [list(p) + [EOS] for p in itertools.product(words, repeat=n)]
  hyps += [list(p) for p in itertools.product(words, repeat=MAX_LEN)]
  return hyps


def ref_beam_search(tables, example, vocab, beam, length_penalty):
  """Plain Python from the module docstring: 2K candidates by raw log-prob, eos within the
  first K finishes (every candidate within the first K at the last step), the K best non-eos
  stay alive, and the example stops collecting once it holds K finished."""
  alive = [(0.0, [])]
  finished = []  # (score, seq)
  for t in range(MAX_LEN):
    cands = []
    for logp, seq in alive:
      for v in range(vocab):
        if v != PAD:
          cands.append((logp + ref_log_probs(tables, example, seq + [v])[-1], seq + [v]))
    cands.sort(key=lambda c: -c[0])
    cands = cands[:2 * beam]
    if len(finished) < beam:
      new = [(lp / (t + 1) ** length_penalty, s) for lp, s in cands[:beam]
             if s[-1] == EOS or t == MAX_LEN - 1]
      finished = sorted(finished + new, key=lambda f: -f[0])[:beam]
    alive = [c for c in cands if c[1][-1] != EOS][:beam]
  return finished


def padded(seq):
  return list(seq) + [PAD] * (MAX_LEN - len(seq))


def strip(row):
  row = list(np.asarray(row))
  return row[:row.index(EOS) + 1] if EOS in row else row


def jitted_beam(beam):
  return jax.jit(lambda tables, lp: decoding.beam_search(
      make_step(tables), init_state(tables), BOS, EOS, PAD, MAX_LEN, beam, lp,
      style='k_finished', ban_pad=True))


def jitted_greedy():
  return jax.jit(lambda tables: decoding.greedy_decode(
      make_step(tables), init_state(tables), BOS, EOS, PAD, MAX_LEN))


def jitted_score():
  return jax.jit(lambda tables, tokens, lp: decoding.sequence_log_prob(
      make_step(tables), init_state(tables), tokens, BOS, EOS, lp))


def device_tables(tables):
  return {n: jnp.asarray(v) for n, v in tables.items()}


@pytest.mark.parametrize('vocab', [4, 5])
def test_wide_beam_equals_exhaustive_search(vocab):
  hyps = all_hypotheses(vocab)
  beam = len(hyps)  # 31 for V=4, 121 for V=5
  search = jitted_beam(beam)
  for seed in range(3):
    tables = make_tables(seed, vocab, batch=2)
    for lp in (0.0, 0.6, 1.0, 2.0):
      tokens, scores = jax.device_get(search(device_tables(tables), jnp.float32(lp)))
      assert tokens.shape == (2, beam, MAX_LEN) and scores.shape == (2, beam)
      for ex in range(2):
        ref = sorted(((ref_score(tables, ex, h, lp), h) for h in hyps), key=lambda r: -r[0])
        # The best hypothesis and score, and in fact the whole ranking.
        assert strip(tokens[ex, 0]) == ref[0][1], (seed, lp, ex)
        np.testing.assert_allclose(scores[ex, 0], ref[0][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scores[ex], [r[0] for r in ref], rtol=1e-5, atol=1e-5)
        assert sorted(map(tuple, tokens[ex])) == sorted(tuple(padded(h)) for h in hyps)
      assert not np.allclose(scores[0], scores[1])  # the examples differ


@pytest.mark.parametrize('beam', [2, 3])
def test_narrow_beam_matches_reference(beam):
  """Narrow beams drop and reorder hypotheses each step: checks the state gathering and the
  finishing rules against the Python reference; each score is re-scored independently."""
  vocab, batch = 5, 3
  search, score = jitted_beam(beam), jitted_score()
  for seed in range(4):
    tables = make_tables(100 + seed, vocab, batch)
    for lp in (0.0, 1.0, 2.0):
      tokens, scores = jax.device_get(search(device_tables(tables), jnp.float32(lp)))
      for ex in range(batch):
        ref = ref_beam_search(tables, ex, vocab, beam, lp)
        assert [strip(r) for r in tokens[ex]] == [s for _, s in ref], (seed, lp, ex)
        np.testing.assert_allclose(scores[ex], [s for s, _ in ref], rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(scores[ex]) <= 0)
      # sequence_log_prob with the beam's state repeated gives the same scores.
      repeated = dict(tables, bias=np.repeat(tables['bias'], beam, axis=0))
      rescored = score(device_tables(repeated), tokens.reshape(batch * beam, MAX_LEN), jnp.float32(lp))
      np.testing.assert_allclose(np.asarray(rescored).reshape(batch, beam), scores,
                                 rtol=1e-5, atol=1e-5)


def test_sequence_log_prob_matches_numpy():
  vocab, batch = 5, 2
  tables = make_tables(7, vocab, batch)
  score = jitted_score()
  seqs = [[3, 4, EOS, 3], [BOS, 3, 3, 4]]  # the tokens after an eos are ignored
  for lp in (0.0, 0.6):
    got = score(device_tables(tables), jnp.asarray(seqs, jnp.int32), jnp.float32(lp))
    want = [ref_score(tables, 0, [3, 4, EOS], lp), ref_score(tables, 1, seqs[1], lp)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_greedy_equals_beam_of_one():
  vocab, batch = 5, 4
  greedy, beam1, score = jitted_greedy(), jitted_beam(1), jitted_score()
  saw_eos = saw_full = False
  for seed in range(8):
    tables = make_tables(200 + seed, vocab, batch)
    tokens = np.asarray(greedy(device_tables(tables)))
    assert tokens.shape == (batch, MAX_LEN)
    for lp in (0.0, 0.6, 2.0):
      beam_tokens, beam_scores = beam1(device_tables(tables), jnp.float32(lp))
      np.testing.assert_array_equal(np.asarray(beam_tokens)[:, 0], tokens)
      np.testing.assert_allclose(
          beam_scores[:, 0], score(device_tables(tables), tokens, jnp.float32(lp)),
          rtol=1e-5, atol=1e-5)
    for ex in range(batch):  # greedy from NumPy
      seq = []
      while len(seq) < MAX_LEN and (not seq or seq[-1] != EOS):
        lps = [ref_log_probs(tables, ex, seq + [v])[-1] for v in range(vocab)]
        lps[PAD] = -np.inf
        seq.append(int(np.argmax(lps)))
      assert list(tokens[ex]) == padded(seq)
      saw_eos |= seq[-1] == EOS
      saw_full |= seq[-1] != EOS
  assert saw_eos and saw_full  # both ways of ending were exercised


def test_padding_after_eos():
  vocab, batch, beam = 5, 4, 3
  tables = make_tables(300, vocab, batch)
  # Make eos likely early so that most hypotheses end before MAX_LEN.
  tables['cur'][:, :, EOS] += 1.5
  greedy = np.asarray(jitted_greedy()(device_tables(tables)))
  beams, scores = jax.device_get(jitted_beam(beam)(device_tables(tables), jnp.float32(1.0)))
  rows = list(greedy) + list(beams.reshape(-1, MAX_LEN))
  short = 0
  for row in rows:
    row = list(row)
    end = row.index(EOS) + 1 if EOS in row else MAX_LEN
    assert PAD not in row[:end] and all(t == PAD for t in row[end:]), row
    short += end < MAX_LEN
  assert short > len(rows) // 2
  assert np.all(np.isfinite(scores))


def test_pad_equal_to_eos_and_untraced_call():
  """pad_id == eos_id does not ban eos; the functions also run eagerly (no jit)."""
  vocab = 4
  tables = make_tables(400, vocab, 2)
  tables['cur'][:, :, EOS] += 30.0
  step, state = make_step(tables), init_state(tables)
  tokens = np.asarray(decoding.greedy_decode(step, state, BOS, EOS, EOS, MAX_LEN))
  assert np.all(tokens[:, 0] == EOS) and np.all(tokens == EOS)
  tokens, scores = decoding.beam_search(step, state, BOS, EOS, EOS, MAX_LEN, 2, 1.0,
                                        style='k_finished', ban_pad=True)
  assert np.all(np.asarray(tokens)[:, 0, 0] == EOS) and np.all(np.isfinite(scores))


# ------------------------------------------------------------------- style 'unilm' vs unilm

FIXTURE = json.loads((pathlib.Path(__file__).parent / 'fixtures' /
                      'unilm_beam_search.json').read_text())


def unilm_tables(case):
  """The fixture's fake model: A[row, step, last] + C[row, prev] + bias[row, step]."""
  a = np.asarray(FIXTURE['A'], np.float32)
  bias = np.zeros(a.shape[:2] + (FIXTURE['vocab_size'],), np.float32)
  for row, step, token, value in case['bias']:
    bias[slice(None) if row is None else row, slice(None) if step is None else step,
         token] = value
  return {'a': a, 'c': np.asarray(FIXTURE['C'], np.float32), 'bias': bias}


def unilm_step(tables, banned_before=None):
  """The fake model as a step function; state = (row, the token fed at the step before).
  banned_before=(token, steps): that token's log-prob is -inf at positions < steps."""
  a, c, bias = (jnp.asarray(tables[n]) for n in ('a', 'c', 'bias'))

  def step_fn(state, token_ids, position):
    row = state['row']
    log_probs = jax.nn.log_softmax(a[row, position, token_ids] + c[row, state['prev']]
                                   + bias[row, position], axis=-1)
    if banned_before is not None:
      token, steps = banned_before
      hit = (jnp.arange(log_probs.shape[-1]) == token) & (position < steps)
      log_probs = jnp.where(hit, -jnp.inf, log_probs)
    return log_probs, {'row': row, 'prev': token_ids}

  return step_fn


def unilm_state():
  rows = np.asarray(FIXTURE['A']).shape[0]
  return {'row': jnp.arange(rows), 'prev': jnp.full((rows,), FIXTURE['bos_id'], jnp.int32)}


def unilm_search(case, step_fn=None, **options):
  ids = (FIXTURE['bos_id'], FIXTURE['eos_id'], FIXTURE['pad_id'])
  step_fn = step_fn or unilm_step(unilm_tables(case))
  options = {'num_best': case['num_keep_best'], 'early_stopping': case['early_stopping'],
             **options}
  run = jax.jit(lambda lp: decoding.beam_search(
      step_fn, unilm_state(), *ids, case['num_max_bpe_tokens'] - 2, case['beam_size'], lp,
      **options))
  return jax.device_get(run(jnp.float32(case['length_penalty'])))


def expected_tokens(case):
  """unilm's decoded rows [cls, words, mask, eos, pad...] (num_max_bpe_tokens) as ours:
  [words, eos, pad...] (num_max_bpe_tokens - 2); an empty slot is all pad."""
  m = case['num_max_bpe_tokens']
  out = np.full((len(case['decoded']), case['num_keep_best'], m - 2), FIXTURE['pad_id'])
  for i, rows in enumerate(case['decoded']):
    for j, row in enumerate(rows):
      if case['scores'][i][j] == decoding.UNILM_EMPTY_SCORE:
        assert all(t == FIXTURE['pad_id'] for t in row)
        continue
      n = case['tgt_len'][i][j]
      assert row[0] == FIXTURE['bos_id'] and row[n - 2] == FIXTURE['mask_id']
      assert row[n - 1] == FIXTURE['eos_id']
      words = row[1:n - 2]
      out[i, j, :len(words) + 1] = words + [FIXTURE['eos_id']]
  return out


def test_unilm_fixture_covers_the_edge_cases():
  cases = {c['name']: c for c in FIXTURE['cases']}
  assert {c['beam_size'] for c in cases.values()} >= {1, 3, 5}
  assert {c['length_penalty'] for c in cases.values()} >= {0.0, 0.6, 1.0}
  eos, pad = FIXTURE['eos_id'], FIXTURE['pad_id']
  # Nothing finished on an eos: every hypothesis was ended by the length limit.
  assert all(n == cases['no_eos_ever']['num_max_bpe_tokens'] for (n,) in
             cases['no_eos_ever']['tgt_len'])
  assert any(len(r[0]) > 3 and r[0][3] == eos for r in cases['eos_first_preferred']['decoded'])
  assert pad in cases['pad_preferred']['decoded'][0][0][1:-2]   # unilm generates pad
  assert decoding.UNILM_EMPTY_SCORE in cases['keep5_beam1_short']['scores'][0]


@pytest.mark.parametrize('case', FIXTURE['cases'], ids=lambda c: c['name'])
def test_unilm_style_matches_unilm_beam_search(case):
  tokens, scores = unilm_search(case)
  np.testing.assert_array_equal(tokens, expected_tokens(case))
  np.testing.assert_allclose(scores, case['scores'], rtol=0, atol=1e-5)


def test_unilm_min_len_and_ban_pad_equal_a_model_without_those_tokens():
  """min_len / ban_pad give what unilm's search gives on a model whose eos (pad) log-prob is
  -inf at those steps; they change the result of these cases."""
  cases = {c['name']: c for c in FIXTURE['cases']}
  case = cases['eos_first_preferred']
  got = unilm_search(case, min_len=2)
  want = unilm_search(case, unilm_step(unilm_tables(case), (FIXTURE['eos_id'], 2)))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
  assert not np.array_equal(got[0], expected_tokens(case))   # unilm's, without min_len
  assert np.all(got[0][:, :, :2] != FIXTURE['eos_id'])
  case = cases['pad_preferred']
  got = unilm_search(case, ban_pad=True)
  want = unilm_search(case, unilm_step(unilm_tables(case), (FIXTURE['pad_id'], 99)))
  np.testing.assert_array_equal(got[0], want[0])
  assert not np.array_equal(got[0], expected_tokens(case))
  for row in got[0].reshape(-1, got[0].shape[-1]):   # pad only after the eos
    end = list(row).index(FIXTURE['eos_id'])
    assert FIXTURE['pad_id'] not in row[:end]


def test_search_options_are_checked():
  case = FIXTURE['cases'][0]
  step, state, ids = unilm_step(unilm_tables(case)), unilm_state(), (0, 2, 1)
  search = lambda **kw: decoding.beam_search(step, state, *ids, **{  # noqa: E731
      'max_len': 4, 'beam_size': 2, **kw})
  for kw, match in [({'style': 'fairseq'}, 'style'), ({'min_len': 5}, 'min_len'),
                    ({'style': 'k_finished', 'num_best': 3}, 'num_best'),
                    ({'num_best': 0}, 'num_best'), ({'beam_size': 0}, 'beam_size'),
                    ({'style': 'k_finished', 'early_stopping': True}, 'early_stopping'),
                    ({'max_len': 0}, 'max_len')]:
    with pytest.raises(ValueError, match=match):
      search(**kw)

"""Incremental (key/value cached) decoding: backbone cache vs the full forward, vs torchscale's
`incremental_state`, and cached caption generation vs a naive full-forward decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit3_jax import convert, models
from beit3_jax.models.heads import CaptioningModel
from beit3_jax.tasks import captioning

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures('fast_compile')

TOL = 1e-5
MASK_ID, BOS, EOS, PAD = 100, 0, 2, 1


def _images(cfg, batch, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, cfg.img_size, cfg.img_size, cfg.in_chans)).astype(np.float32)


def _incremental(cfg, params, images, ids):
  """Image pass, then one text token at a time with the cache: outputs (B, L, D) of the text."""
  model = models.BEiT3(cfg)
  image_pass = jax.jit(lambda p, im: model.apply({'params': p}, images=im, return_cache=True))
  step = jax.jit(lambda p, t, pos, m, c: model.apply(
      {'params': p}, text_ids=t, text_positions=pos, attn_mask=m, cache=c))
  cache = image_pass(params, images)['new_cache']
  outs = []
  b = ids.shape[0]
  for t in range(ids.shape[1]):
    n_keys = cache[0]['key'].shape[1] + 1
    out = step(params, ids[:, t:t + 1], np.full((b, 1), t, np.int32),
               np.zeros((1, n_keys), np.int32), cache)
    cache = out['new_cache']
    outs.append(np.asarray(out['encoder_out'][:, 0]))
  return np.stack(outs, axis=1), cache


def test_cached_steps_equal_full_forward_with_captioning_mask():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(1))
  images = _images(cfg, 2)
  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 6)).astype(np.int32)
  n_img = 1 + models.num_patches(cfg)
  full = jax.jit(lambda p, kw: models.BEiT3(cfg).apply({'params': p}, **kw))(
      params, dict(images=images, text_ids=ids,
                   attn_mask=captioning.captioning_attn_mask(n_img, ids.shape[1])))
  full_text = np.asarray(full['encoder_out'][:, n_img:])
  inc, cache = _incremental(cfg, params, images, ids)
  assert len(cache) == cfg.depth
  assert cache[0]['key'].shape == (2, n_img + 6, cfg.num_heads, cfg.embed_dim // cfg.num_heads)
  np.testing.assert_allclose(inc, full_text, atol=TOL, rtol=0)


def test_pair_step_with_mask_rows_equals_full_forward():
  """The decoding step itself: [token_t, MASK] against image + tokens < t, mask = last 2 rows."""
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(2))
  images = _images(cfg, 2, seed=3)
  n_img = 1 + models.num_patches(cfg)
  prefix = np.array([[BOS, 5, 17, 33], [BOS, 9, 9, 40]], np.int32)
  t = prefix.shape[1] - 1
  ids = np.concatenate([prefix, np.full((2, 1), MASK_ID, np.int32)], axis=1)
  full_mask = captioning.captioning_attn_mask(n_img, ids.shape[1])
  full = jax.jit(lambda p, kw: models.BEiT3(cfg).apply({'params': p}, **kw))(
      params, dict(images=images, text_ids=ids, attn_mask=full_mask))
  _, cache = _incremental(cfg, params, images, prefix[:, :t])
  model = models.BEiT3(cfg)
  out = model.apply({'params': params}, text_ids=ids[:, t:], attn_mask=full_mask[-2:],
                    text_positions=np.array([[t, t + 1]] * 2, np.int32), cache=cache)
  np.testing.assert_allclose(np.asarray(out['encoder_out']),
                             np.asarray(full['encoder_out'][:, -2:]), atol=TOL, rtol=0)
  assert out['new_cache'][0]['key'].shape[1] == n_img + t + 2


def test_defaults_unchanged_and_input_checks():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  model = models.BEiT3(cfg)
  ids = np.arange(5, dtype=np.int32)[None] + 3
  a = model.apply({'params': params}, text_ids=ids)
  b = model.apply({'params': params}, text_ids=ids, text_positions=np.arange(5)[None])
  assert a['new_cache'] is None and a['hidden_states'] is None
  np.testing.assert_array_equal(np.asarray(a['encoder_out']), np.asarray(b['encoder_out']))
  with pytest.raises(ValueError, match='text_positions'):
    model.apply({'params': params}, text_ids=ids, text_positions=np.zeros((1, 4), np.int32))
  cache = model.apply({'params': params}, text_ids=ids, return_cache=True)['new_cache']
  with pytest.raises(ValueError, match='attn_mask'):
    model.apply({'params': params}, text_ids=ids, cache=cache, attn_mask=np.zeros((5, 5)))


def test_parity_with_torchscale_incremental_state():
  torch = pytest.importorskip('torch')
  import torchscale_ref as ref
  cfg = tiny_config()
  torch_model = ref.build_reference(cfg, seed=7)
  params = convert.torch_to_flax(ref.state_dict_numpy(torch_model), cfg)
  images = _images(cfg, 2, seed=4)
  n_img = 1 + models.num_patches(cfg)
  tokens = np.array([[BOS, 7, 21, 50, 3], [BOS, 60, 8, 8, 90]], np.int64)
  steps = tokens.shape[1]
  full_mask = captioning.captioning_attn_mask(n_img, steps + 1).astype(np.int64)

  # torchscale, as unilm's captioning generator: [BOS, MASK] with the image, then
  # [token, MASK] with positions (t + 2, t + 3) and the last two mask rows; drop the MASK's K/V.
  state = {i: {} for i in range(cfg.depth)}
  torch_out = []
  with torch.no_grad():
    for t in range(steps):
      pair = torch.from_numpy(np.stack([tokens[:, t], np.full(2, MASK_ID)], axis=1))
      if t == 0:
        out = torch_model(textual_tokens=pair,
                          visual_tokens=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                          attn_mask=torch.from_numpy(full_mask[:n_img + 2, :n_img + 2]),
                          incremental_state=state)
      else:
        pos = torch.arange(t + 2, t + 4).long().unsqueeze(0)
        out = torch_model(textual_tokens=pair, attn_mask=torch.from_numpy(
            full_mask[n_img + t:n_img + t + 2, :n_img + t + 2]), incremental_state=state,
            positions=pos)
      for layer_state in state.values():
        layer_state['prev_key'] = layer_state['prev_key'][:, :, :-1, :]
        layer_state['prev_value'] = layer_state['prev_value'][:, :, :-1, :]
      torch_out.append(out['encoder_out'][:, -1].numpy())
  torch_out = np.stack(torch_out, axis=1)

  # Ours, through the captioning step machinery's backbone calls.
  model = models.BEiT3(cfg)
  cache = model.apply({'params': params}, images=images, return_cache=True)['new_cache']
  ours = []
  for t in range(steps):
    pair = np.stack([tokens[:, t], np.full(2, MASK_ID)], axis=1).astype(np.int32)
    out = model.apply({'params': params}, text_ids=pair, cache=cache,
                      text_positions=np.array([[t, t + 1]] * 2, np.int32),
                      attn_mask=full_mask[n_img + t:n_img + t + 2, :n_img + t + 2])
    cache = jax.tree.map(lambda x: x[:, :-1], out['new_cache'])
    ours.append(np.asarray(out['encoder_out'][:, -1]))
  ours = np.stack(ours, axis=1)
  np.testing.assert_allclose(ours, torch_out, atol=TOL, rtol=0)
  # The torch cache (B, H, S, d) holds the same keys as ours (B, S, H, d).
  np.testing.assert_allclose(np.asarray(cache[0]['key']).transpose(0, 2, 1, 3),
                             state[0]['prev_key'].numpy(), atol=TOL, rtol=0)


def _naive_greedy(cfg, params, images, max_len):
  """Re-runs the full CaptioningModel forward with the captioning mask at every step."""
  n_img = 1 + models.num_patches(cfg)
  model = CaptioningModel(cfg)
  fwd = jax.jit(lambda p, im, ids, idx, m: model.apply({'params': p}, im, ids, idx, attn_mask=m))
  b = images.shape[0]
  seq = np.full((b, 1), BOS, np.int32)
  out = np.full((b, max_len), PAD, np.int32)
  done = np.zeros(b, bool)
  for t in range(max_len):
    ids = np.concatenate([seq, np.full((b, 1), MASK_ID, np.int32)], axis=1)
    logits = np.array(fwd(params, images, ids, np.full((b, 1), t + 1, np.int32),
                            captioning.captioning_attn_mask(n_img, t + 2)))[:, 0]
    logits[:, PAD] = -np.inf
    token = np.where(done, PAD, logits.argmax(-1)).astype(np.int32)
    out[:, t] = token
    done |= token == EOS
    seq = np.concatenate([seq, token[:, None]], axis=1)
  return out


@pytest.fixture(scope='module')
def caption_params():
  cfg = tiny_config()
  model = CaptioningModel(cfg)
  b = 3
  images = _images(cfg, b, seed=5)
  ids = jnp.zeros((b, 4), jnp.int32)
  params = jax.jit(lambda r: model.init(r, images, ids, jnp.zeros((b, 1), jnp.int32)))(
      jax.random.key(3))['params']
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x, params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  # A larger head so that the argmax is decisive and eos gets generated sometimes.
  params['mlm_head']['kernel'] = params['mlm_head']['kernel'] * 30.0
  return cfg, params, images


def test_generate_captions_greedy_equals_naive_full_forward(caption_params):
  cfg, params, images = caption_params
  max_len = 8
  got = captioning.generate_captions(params, cfg, images, BOS, EOS, PAD, MASK_ID, max_len,
                                     search='k_finished', ban_pad=True)
  want = _naive_greedy(cfg, params, images, max_len)
  assert len(np.unique(want)) > 2  # not a degenerate (all-eos / one-token) decode
  np.testing.assert_array_equal(np.asarray(got), want)
  # With a token of the decode as eos, the same tokens up to its first occurrence, then pad.
  eos = int(want[0, 3])
  expect = want.copy()
  for row in expect:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0] + 1:] = PAD
  assert (expect == PAD).any()
  got = captioning.generate_captions(params, cfg, images, BOS, eos, PAD, MASK_ID, max_len,
                                     search='k_finished', ban_pad=True)
  np.testing.assert_array_equal(np.asarray(got), expect)


def test_beam_search_runs_and_beam1_is_greedy(caption_params):
  cfg, params, images = caption_params
  max_len = 6
  greedy = captioning.generate_captions(params, cfg, images, BOS, EOS, PAD, MASK_ID, max_len,
                                        search='k_finished', ban_pad=True)
  beam1, s1 = captioning.generate_captions(params, cfg, images, BOS, EOS, PAD, MASK_ID, max_len,
                                           beam_size=1, return_scores=True,
                                           search='k_finished', ban_pad=True)
  beam3, s3 = captioning.generate_captions(params, cfg, images, BOS, EOS, PAD, MASK_ID, max_len,
                                           beam_size=3, return_scores=True,
                                           search='k_finished', ban_pad=True)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(beam1))
  assert beam3.shape == (images.shape[0], max_len)
  assert np.all(np.asarray(s3) >= np.asarray(s1) - 1e-5)  # beam 3 finds at least greedy's score


def test_cache_under_remat_matches_causal_full_forward():
  cfg = tiny_config(remat=True)
  params = models.init_params(tiny_config(), jax.random.key(4))
  model = models.BEiT3(cfg)
  ids = np.arange(5, dtype=np.int32)[None] + 3
  causal = lambda n: np.triu(np.ones((n, n), np.int32), 1)
  full = model.apply({'params': params}, text_ids=ids, attn_mask=causal(5))
  prefix = model.apply({'params': params}, text_ids=ids[:, :4], attn_mask=causal(4),
                       return_cache=True)
  step = model.apply({'params': params}, text_ids=ids[:, 4:], text_positions=np.array([[4]]),
                     cache=prefix['new_cache'])
  np.testing.assert_allclose(np.asarray(step['encoder_out'][:, 0]),
                             np.asarray(full['encoder_out'][:, 4]), atol=TOL, rtol=0)

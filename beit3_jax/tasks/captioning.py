"""Image captioning (COCO Karpathy in unilm's recipe): `CaptioningModel` trained by masked
fine-tuning, captions generated with a key/value cache, CIDEr-D / BLEU-4, `predict caption`.

Caption generation with a key/value cache (unilm BEiT-3 / s2s-ft incremental decoding).

A `beit3_jax.models.heads.CaptioningModel` (backbone `beit3` + `mlm_head`) is trained with the
captioning attention mask (`captioning_attn_mask`): image tokens see the image, text tokens see
the image and the earlier text (and themselves). A caption is decoded left to right by feeding
[last token, MASK]: the logits at the MASK give the next token.

Here the image pass (image only, which equals the image part of any joint pass, since image
tokens never see text) builds the cache; each step then feeds the text-only pair
[token_t, MASK] at explicit text positions (t, t + 1) (position ids t + 2, t + 3), attends to
the cache plus the pair under the last two rows of the full captioning mask, and keeps only
token_t's keys/values in the cache (the MASK's are dropped). Step 0 feeds [BOS, MASK].

For `beit3_jax.tasks.decoding` (fixed shapes under `lax.fori_loop`) the cache is a buffer of
1 + N_p + max_len slots per layer: image keys/values first, then slot 1 + N_p + t receives
token_t's; slots not yet written are blocked by the attention mask (-1e8, i.e. weight 0).

This is exact only for configs without the vision-language expert (num_vl_layers == 0, the
released base/large): the text-only steps route through the language expert B, as torchscale.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax import losses
from beit3_jax.data import image_ops, pipeline, schema
from beit3_jax.data.finetuning import FinetuneInputs, caption_example, caption_list, view
from beit3_jax.data.pretraining import get_field, load_image
from beit3_jax.data.text import TextTokenizer
from beit3_jax.defaults import finetune_config
from beit3_jax.losses import masked_slots
from beit3_jax.models import heads
from beit3_jax.models.beit3 import BEiT3
from beit3_jax.models.config import num_patches
from beit3_jax.models.embeddings import POSITION_OFFSET
from beit3_jax.models.heads import head_linear
from beit3_jax.tasks import base, decoding, evaluation, metrics, registry, showcase


def captioning_attn_mask(num_image_tokens: int, text_len: int) -> np.ndarray:
  """(S, S) int32 0/1, 1 = blocked, S = num_image_tokens + text_len: image rows see only the
  image; text rows see the image and text up to and including themselves."""
  s = num_image_tokens + text_len
  mask = np.zeros((s, s), np.int32)
  mask[:num_image_tokens, num_image_tokens:] = 1
  mask[num_image_tokens:, num_image_tokens:] = np.triu(np.ones((text_len, text_len), np.int32), 1)
  return mask


class CaptionDecoder(nn.Module):
  """The CaptioningModel's parameters (`beit3`, `mlm_head`) applied step by step.

  `image_pass(images)` -> cache (tuple of depth dicts {'key', 'value'} (B, 1 + N_p, H, d)).
  `__call__(text_ids (B, L), text_positions (B, L), attn_mask (L, S_cache + L), cache)` ->
  (logits (B, L, vocab) float32, new_cache).
  """
  config: Any

  def setup(self):
    cfg = self.config
    self.beit3 = BEiT3(cfg)
    self.mlm_head = head_linear(cfg, cfg.embed_dim, cfg.vocab_size, ('embed', 'vocab'))

  def image_pass(self, images):
    return self.beit3(images=images, return_cache=True)['new_cache']

  def __call__(self, text_ids, text_positions, attn_mask, cache):
    out = self.beit3(text_ids=text_ids, text_positions=text_positions, attn_mask=attn_mask,
                     cache=cache)
    return self.mlm_head(out['encoder_out']).astype(jnp.float32), out['new_cache']


def _check(config, max_len: int):
  if config.num_vl_layers:
    raise ValueError('cached captioning needs num_vl_layers == 0 (a text-only step routes to '
                     'expert B, the joint pass to the vision-language expert C).')
  longest = config.max_text_positions - POSITION_OFFSET
  if max_len + 1 > longest:
    raise ValueError(f'max_len={max_len} needs {max_len + 1} text positions (bos + tokens), the '
                     f'table allows {longest}.')


def _decoder(model_or_config) -> CaptionDecoder:
  config = getattr(model_or_config, 'config', model_or_config)
  return CaptionDecoder(config)


def init_caption_state(model, params, images, max_len: int):
  """The image pass: the decoding state for `caption_step_fn` (B rows).

  Args:
    model: a CaptioningModel (or its config).
    params: the CaptioningModel's params ({'beit3': ..., 'mlm_head': ...}).
    images: (B, S, S, C) float, normalised.
    max_len: static, the most generated tokens.

  Returns:
    {'cache': tuple of depth dicts {'key', 'value'} (B, 1 + N_p + max_len, H, d)}, image
    keys/values in the first 1 + N_p slots, zeros after.
  """
  dec = _decoder(model)
  _check(dec.config, max_len)
  cache = dec.apply({'params': params}, images, method=CaptionDecoder.image_pass)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, max_len), (0, 0), (0, 0)))
  return {'cache': jax.tree.map(pad, cache)}


def caption_step_fn(model, params, mask_id):
  """The `decoding` step function for a CaptioningModel with a key/value cache.

  step_fn(state, token_ids (N,), position) -> (log_probs (N, V) of the token at position + 1,
  new_state): feeds [token_ids, MASK] at text positions (position, position + 1) against the
  cached image + earlier tokens, and writes token_ids' keys/values into the cache slot
  1 + N_p + position. Start from `init_caption_state` (position 0 feeds the bos).
  """
  dec = _decoder(model)
  n_img = 1 + num_patches(dec.config)

  def step_fn(state, token_ids, position):
    cache = state['cache']
    n = token_ids.shape[0]
    slots = cache[0]['key'].shape[1]  # n_img + max_len
    position = jnp.asarray(position, jnp.int32)
    mask_col = jnp.full((n,), mask_id, jnp.int32)
    text_ids = jnp.stack([token_ids.astype(jnp.int32), mask_col], axis=1)
    text_positions = jnp.broadcast_to(position + jnp.arange(2, dtype=jnp.int32), (n, 2))
    # Last two rows of the full mask over [cache slots | token | MASK]; unwritten slots blocked.
    cached_ok = jnp.arange(slots) < n_img + position
    blocked_cache = jnp.broadcast_to(~cached_ok, (2, slots))
    blocked_new = jnp.array([[False, True], [False, False]])
    attn_mask = jnp.concatenate([blocked_cache, blocked_new], axis=1)
    logits, new_cache = dec.apply({'params': params}, text_ids, text_positions, attn_mask, cache)

    def write(buf, new):  # new: (N, slots + 2, H, d); keep the token's, drop the MASK's
      token_kv = jax.lax.dynamic_slice_in_dim(new, slots, 1, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(buf, token_kv.astype(buf.dtype),
                                                 n_img + position, axis=1)

    cache = jax.tree.map(write, cache, new_cache)
    return jax.nn.log_softmax(logits[:, 1], axis=-1), {'cache': cache}

  return step_fn


def generate_captions(params, config, images, bos_id, eos_id, pad_id, mask_id, max_len: int,
                      beam_size: int = 1, length_penalty=0.6, *, return_scores: bool = False,
                      search: str = 'unilm', min_len: int = 0, ban_pad: bool = False,
                      early_stopping: bool = False):
  """Captions for `images` (B, S, S, C) with a CaptioningModel's params.

  search='unilm': unilm's beam search with `beam_size` beams (also for beam_size=1);
  search='k_finished': the K-finished beam search, greedy search for beam_size=1
  (`decoding.beam_search` describes both, `min_len`, `ban_pad` and `early_stopping`).
  max_len: the most generated tokens, eos included (unilm's --num_max_bpe_tokens - 2).
  Returns tokens (B, max_len) int32 (the best hypothesis, without the bos, pad after the eos),
  and with `return_scores=True` also scores (B,) float32: the search's score (for greedy,
  log-prob / length ** length_penalty from `decoding.sequence_log_prob`).
  """
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f'beam_size must be an int >= 1, got {beam_size!r}')
  if search not in decoding.STYLES:
    raise ValueError(f'search must be one of {decoding.STYLES}, got {search!r}')
  _check(config, max_len)
  options = {'style': search, 'min_len': int(min_len), 'ban_pad': bool(ban_pad),
             'early_stopping': bool(early_stopping)}
  run = _generator(config, max_len, beam_size, return_scores, **options)
  ids = jnp.asarray([bos_id, eos_id, pad_id, mask_id], jnp.int32)
  tokens, scores = run(params, jnp.asarray(images), ids,
                       jnp.asarray(length_penalty, jnp.float32))
  return (tokens, scores) if return_scores else tokens


_GENERATORS: dict = {}


def _generator(config, max_len: int, beam_size: int, return_scores: bool, *,
               style: str = 'unilm', min_len: int = 0, ban_pad: bool = False,
               early_stopping: bool = False):
  """The jitted decoding function of one (config, max_len, beam size, search options), built
  once per process (so repeated calls, e.g. batch after batch in evaluation, compile once per
  input shape)."""
  options = {'style': style, 'min_len': min_len, 'ban_pad': ban_pad,
             'early_stopping': early_stopping}
  key = (config.to_json(), max_len, beam_size, return_scores, tuple(sorted(options.items())))
  if key in _GENERATORS:
    return _GENERATORS[key]
  dec = CaptionDecoder(config)

  @jax.jit
  def run(params, images, ids, length_penalty):
    bos, eos, pad, mask = ids[0], ids[1], ids[2], ids[3]
    state = init_caption_state(dec, params, images, max_len)
    step = caption_step_fn(dec, params, mask)
    if beam_size == 1 and style == 'k_finished':  # the same as its beam search of one
      tokens = decoding.greedy_decode(step, state, bos, eos, pad, max_len, min_len=min_len,
                                      ban_pad=ban_pad)
      if not return_scores:
        return tokens, jnp.zeros(tokens.shape[:1], jnp.float32)
      scores = decoding.sequence_log_prob(step, state, tokens, bos, eos, length_penalty)
      return tokens, scores
    tokens, scores = decoding.beam_search(step, state, bos, eos, pad, max_len, beam_size,
                                          length_penalty, num_best=1, **options)
    return tokens[:, 0], scores[:, 0]

  _GENERATORS[key] = run
  return run


# ------------------------------------------------------------------------------------------
# The captioning task: data, objective, evaluation, predict.
#
# unilm's "masked fine-tuning" (beit3/datasets.py CaptioningDataset, engine_for_finetuning.py):
# a caption is masked with `mask_caption` and the model predicts the masked tokens under the
# captioning attention mask; label-smoothed cross-entropy on the masked positions.
#
# Evaluation: captions are generated with the cache (`generate_captions`, beam size, length
# penalty and max length from `config.captioning`) and scored against every reference caption of
# the example with CIDEr-D and BLEU-4 (`tasks.metrics`). Baseline: `captioning/baseline_cider`,
# the CIDEr-D of emitting one fixed caption for every image (the most common caption of the
# training split).


def mask_caption(ids: np.ndarray, padding: np.ndarray, rng: np.random.Generator,
                 mask_prob: float, mask_id: int, random_low: int, random_high: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(masked input ids, mask (L,) bool) of one encoded caption (`ids` (L,) int32 with <s> at 0,
  `padding` True at pads): unilm's captioning masking picks k = max(1, min(round(n p), n - 1))
  of the positions 1..n-1 of the n real tokens (never <s>) and replaces each by [MASK] 80%,
  itself 10%, a random id in [random_low, random_high) 10%."""
  n = int(np.sum(~padding))
  k = max(1, min(int(round(n * mask_prob)), n - 1))
  chosen = 1 + rng.choice(n - 1, size=k, replace=False)
  mask = np.zeros(ids.shape, bool)
  mask[chosen] = True
  out = ids.copy()
  u = rng.random(k)
  out[chosen[u < 0.8]] = mask_id
  rand = chosen[u >= 0.9]
  out[rand] = rng.integers(random_low, random_high, size=rand.size)
  return out.astype(np.int32), mask


def transform(cfg: FinetuneInputs, tokenizer: TextTokenizer, mask_prob: float,
              image_field: str = 'image', caption_field: str = 'captions'
              ) -> pipeline.Transform:
  """(example with an image and caption(s), rng) -> the batch layout: one caption (an example
  of `CaptionPairs` holds only one, otherwise `rng` draws it), masked (`text_ids`), with
  `text_targets` (the caption) and `text_mask`."""
  def apply(example, rng):
    out = caption_example(cfg, tokenizer, example, rng, image_field, caption_field)
    if isinstance(out, pipeline.Skip):
      return out
    image, ids, pad = out
    # unilm: random.randint(3, len(tokenizer) - 1), both ends included.
    masked, mask = mask_caption(ids, pad, rng, mask_prob, tokenizer.mask_id, 3,
                                tokenizer.vocab_size)
    return {'image': view(cfg, image, rng), 'text_ids': masked, 'text_padding_mask': pad,
            'text_targets': ids, 'text_mask': mask}
  return apply


class CaptioningFinetune(base.Finetune):
  """batch {'captioning': {'image', 'text_ids' (masked input), 'text_padding_mask',
  'text_targets', 'text_mask'}}; the loss is on the masked positions (gathered into `slots` =
  text_len - 1 fixed slots, the most that can be masked). Metrics: captioning/{loss, nll,
  accuracy (masked tokens), baseline_accuracy, examples (masked tokens)}."""

  def __init__(self, model_cfg, label_smoothing: float = 0.1, *, text_len: int = 8,
               drop_worst_ratio: float = 0.2, drop_worst_after: int = 12000, **kw):
    super().__init__(TASK, model_cfg, text_len=text_len, **kw)
    self.label_smoothing = float(label_smoothing)
    if not 0.0 <= drop_worst_ratio < 1.0:
      raise ValueError(f'captioning.drop_worst_ratio={drop_worst_ratio}; expected [0, 1).')
    self.drop_worst_ratio = float(drop_worst_ratio)
    self.drop_worst_after = int(drop_worst_after)
    self.num_image_tokens = 1 + num_patches(model_cfg)

  def normalizers(self, batch) -> dict[str, jax.Array]:
    """Masked tokens of the whole batch."""
    return {self.task: jnp.sum(batch[self.task]['text_mask'].astype(jnp.float32))}

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
    """unilm's BertCaptioningLoss: the mean over the masked tokens of `losses.
    captioning_token_losses`; in training after `drop_worst_after` steps (`step` >, as unilm's
    global_step), the mean over the int(n (1 - drop_worst_ratio)) best of this call's n masked
    tokens, weighted by this call's share of the batch's tokens (so micro-batches add up;
    unilm drops per GPU and per accumulation step). The `loss` metric stays over every token."""
    del frozen
    b = batch[self.task]
    text_len = b['text_ids'].shape[1]
    index, valid = masked_slots(b['text_mask'], text_len - 1)
    attn_mask = jnp.asarray(captioning_attn_mask(self.num_image_tokens, text_len))
    logits = self.apply(params, rng, train, images=self.images(b['image']),
                        text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'],
                        attn_mask=attn_mask, text_index=index)
    targets = jnp.take_along_axis(b['text_targets'], index, axis=1)
    ce, nll = losses.captioning_token_losses(logits, targets, self.label_smoothing)
    w = valid.astype(jnp.float32)
    vocab = self.model_cfg.vocab_size
    sums = {'ce': jnp.sum(ce * w), 'nll': jnp.sum(nll * w),
            'correct': jnp.sum((jnp.argmax(logits, -1) == targets).astype(jnp.float32) * w),
            'count': jnp.sum(w),
            'histogram': jnp.zeros((vocab,), jnp.int32).at[targets.reshape(-1)].add(
                valid.reshape(-1).astype(jnp.int32))}
    total = jnp.maximum(normalizers[self.task], 1.0)
    loss = sums['ce'] / total
    if train and step is not None and self.drop_worst_ratio > 0:
      def dropped():   # (a cond, so the steps before drop_worst_after skip the sort)
        kept_sum, kept = losses.keep_best(ce, valid, self.drop_worst_ratio)
        return kept_sum / jnp.maximum(kept, 1.0) * (sums['count'] / total)
      loss = jax.lax.cond(step > self.drop_worst_after, dropped, lambda: loss)
    return loss, ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return base.summarize_sums(sums, {'ce': 'loss', 'nll': 'nll', 'correct': 'accuracy'})


def most_common_caption(source, caption_field: str = 'captions') -> str:
  """The most frequent caption (exact text) of a split; ties: the first seen."""
  counts = collections.Counter()
  for i in range(len(source)):
    counts.update(caption_list(source[i], caption_field))
  if not counts:
    raise ValueError(f'The training split has no {caption_field!r}.')
  return counts.most_common(1)[0][0]


def evaluator(config, source, count: int, batch_size: int, inputs: FinetuneInputs,
              tokenizer, baseline_caption: str, *, image_mean: Sequence[float],
              image_std: Sequence[float], image_field: str = 'image',
              caption_field: str = 'captions') -> Callable[[Any, Any], dict]:
  """(params, mesh) -> {'captioning/cider', 'captioning/bleu4', 'captioning/baseline_cider',
  'captioning/baseline_bleu4', 'captioning/images'} over the first `count` examples of
  `source`, generating with config.captioning.{beam_size, length_penalty, max_len, search,
  min_len, ban_pad, early_stopping}."""
  images, references = evaluation.read_captioned(source, count, inputs, image_field,
                                                 caption_field)
  c = config.captioning
  unilm = finetune_config(TASK.name).captioning   # fields a config may lack: unilm's values
  options = {n: c.get(n, unilm[n]) for n in ('search', 'min_len', 'ban_pad', 'early_stopping')}
  ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id)
  last_examples: list[tuple[str, list[str]]] = []   # (generated, references) of the first
  shown = base.SHOWCASE_EXAMPLES
  name = TASK.name

  baseline: dict[str, float] = {}

  def evaluate(params, mesh) -> dict[str, float]:
    def generate(batch):
      return generate_captions(params, config.model,
                               image_ops.normalize(batch['image'], image_mean, image_std),
                               *ids, max_len=int(c.max_len), beam_size=int(c.beam_size),
                               length_penalty=float(c.length_penalty), **options)
    tokens = evaluation.batched(generate, {'image': images}, batch_size, mesh)
    hypotheses = [tokenizer.decode(row) for row in tokens]
    last_examples[:] = list(zip(hypotheses[:shown], references[:shown]))
    # As coco-caption scores them: every text PTB-tokenised first (`metrics.ptb_tokenize`).
    scores = metrics.coco_caption_scores(hypotheses, references)
    if not baseline:   # the same at every evaluation: scored (and tokenised) once
      baseline.update(metrics.coco_caption_scores([baseline_caption] * len(references),
                                                  references))
    return {f'{name}/cider': scores['cider_d'], f'{name}/bleu4': scores['bleu4'],
            f'{name}/baseline_cider': baseline['cider_d'],
            f'{name}/baseline_bleu4': baseline['bleu4'],
            f'{name}/images': float(len(hypotheses))}
  evaluate.examples = last_examples   # the last evaluation's first captions, for a look

  def showcase_examples() -> list:
    return showcase.compare(images[:len(last_examples)], [r for _, r in last_examples],
                            [h for h, _ in last_examples])
  evaluate.showcase = showcase_examples
  return evaluate


# ---------------------------------------------------------------------------- predict caption


def caption_settings(model, beam_size=None, length_penalty=None, max_len=None
                     ) -> tuple[int, float, int]:
  """(beam size, length penalty, max tokens): flags, else the run's `captioning` fields, else
  the fine-tuning defaults (`beit3_jax.defaults.finetune_config`)."""
  run = dict((model.run_config or {}).get('captioning') or {})
  run = {**finetune_config(TASK.name).captioning.to_dict(), **run}
  beam = int(beam_size if beam_size is not None else run['beam_size'])
  penalty = float(length_penalty if length_penalty is not None else run['length_penalty'])
  longest = int(max_len if max_len is not None else run['max_len'])
  if beam < 1 or longest < 1:
    raise base.PredictError(f'--beam-size {beam} / --max-len {longest}: both must be >= 1.')
  return beam, penalty, longest


def decode_tokens(tokenizer, tokens: np.ndarray) -> str:
  """The text of generated ids (1-D): up to the first eos, without special ids and without ids
  past the tokenizer's vocabulary (rows of the embedding no text maps to)."""
  tokens = np.asarray(tokens)
  eos = np.flatnonzero(tokens == tokenizer.eos_id)
  if eos.size:
    tokens = tokens[:eos[0]]
  return tokenizer.decode(tokens[(tokens >= 0) & (tokens < tokenizer.vocab_size)])


def generate(model, images: np.ndarray, tokenizer, beam_size: int, length_penalty: float,
             max_len: int, batch_size: int = 8) -> np.ndarray:
  """Caption tokens (N, max_len) int32 of a loaded model's images (N, S, S, 3) with
  `generate_captions`, in chunks of `batch_size`."""
  longest = model.config.max_text_positions - POSITION_OFFSET - 1
  if max_len > longest:
    raise base.PredictError(f'--max-len {max_len}: this model\'s text positions allow at most '
                            f'{longest} tokens.')
  if model.config.num_vl_layers:
    raise base.PredictError('Captioning with a key/value cache needs num_vl_layers == 0.')
  out = []
  for start in range(0, images.shape[0], max(1, batch_size)):
    out.append(np.asarray(generate_captions(
        model.params, model.config, images[start:start + batch_size], tokenizer.bos_id,
        tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id, max_len, beam_size,
        length_penalty)))
  return np.concatenate(out)


def _add_arguments(p) -> None:
  p.add_argument('images', nargs='+', help='image files or folders')
  p.add_argument('--beam-size', type=int, help="default: the run's captioning.beam_size, else 3")
  p.add_argument('--length-penalty', type=float,
                 help="default: the run's captioning.length_penalty, else 0.6")
  p.add_argument('--max-len', type=int, help="default: the run's captioning.max_len, else 30")


def _caption(args, session) -> dict:
  tokenizer = session.tokenizer(args)
  paths = session.image_paths(args.images)
  beam, penalty, max_len = caption_settings(session.model, args.beam_size, args.length_penalty,
                                            args.max_len)
  images = session.images(args, paths)
  print(f'Decoding: {"greedy" if beam == 1 else f"beam search of {beam}"}, length penalty '
        f'{penalty}, at most {max_len} tokens.')
  tokens = generate(session.model, images, tokenizer, beam, penalty, max_len, args.batch_size)
  captions = [decode_tokens(tokenizer, row) for row in tokens]
  for p, c in zip(paths, captions):
    print(f'{p}: {c}')
  if args.report:
    session.report(args, [showcase.Example(session.name(p), picture, [f'caption: {c}'])
                          for p, picture, c in zip(paths, session.thumbnails(paths), captions)],
                   [f'Decoding: {"greedy" if beam == 1 else f"beam search of {beam}"}, length '
                    f'penalty {penalty}, at most {max_len} tokens.'])
  return {'image_files': paths, 'captions': captions, 'tokens': tokens}


# ---------------------------------------------------------- the evaluation server's file


def submission_prefix(source_name: str) -> str:
  """unilm's task name in the file name: 'nocaps' or 'coco_captioning' when the data source's
  name says so, else 'captioning'."""
  name = source_name.lower()
  return 'nocaps' if 'nocaps' in name else 'coco_captioning' if 'coco' in name else 'captioning'


def submission(config, objective: CaptioningFinetune, source, tokenizer: TextTokenizer,
               fields, split: str) -> base.Submission:
  """COCO / NoCaps captions as unilm's CaptioningHandler writes them
  (`submit_<coco_captioning|nocaps>_<split>.json`): [{"image_id": id, "caption": str}, ...],
  one entry per example of `source` in order, generated by `generate_captions` with
  config.captioning.{beam_size, length_penalty, max_len, search, min_len, ban_pad,
  early_stopping} (as the evaluator) and decoded by `decode_tokens`. The examples' captions are
  not read (a test split may have none).

  `fields['image_id']` (default 'image_id') holds each example's id: an int (COCO's cocoid) or
  text.

  Raises (when predicting): ValueError naming the example (its index) without an id or a
  readable image.
  """
  c = config.captioning
  unilm = finetune_config(TASK.name).captioning   # fields a config may lack: unilm's values
  options = {n: c.get(n, unilm[n]) for n in ('search', 'min_len', 'ban_pad', 'early_stopping')}
  ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id)
  inputs = FinetuneInputs.from_config(config, train=False)
  image_field = fields['image']
  id_field = fields.get('image_id') or 'image_id'

  def prepare(i, example):
    try:
      image_id = get_field(example, id_field)
    except KeyError as e:
      raise ValueError(f'Example {i} of {split!r}: {e.args[0]} A submission needs the image '
                       'ids: data.fields.image_id names their field.') from None
    image = load_image(example, image_field)
    if isinstance(image, pipeline.Skip):
      raise ValueError(f'Example {i} of {split!r}: {image.reason} in {image_field!r}; every '
                       'image of a submission needs a caption.')
    return [({'image': view(inputs, image, np.random.default_rng(0))},
             base.json_id(image_id, id_field, i))]

  def predict(params, mesh) -> list[dict]:
    def generate(batch):
      return generate_captions(params, config.model, objective.images(batch['image']), *ids,
                               max_len=int(c.max_len), beam_size=int(c.beam_size),
                               length_penalty=float(c.length_penalty), **options)
    tokens, image_ids = base.predict_split(source, prepare, generate, int(config.batch_size),
                                           mesh, threads=int(config.data.read_threads),
                                           what='images')
    return [{'image_id': image_id, 'caption': decode_tokens(tokenizer, row)}
            for image_id, row in zip(image_ids, tokens)]

  return base.Submission(
      base.submission_file_name(submission_prefix(str(config.data.source)), split), 'image_id',
      predict)


class CaptioningTask(base.Task):
  name = 'captioning'
  best_metric = 'cider'
  default_fields = {'image': 'image', 'captions': 'captions'}
  batch_fields = {'image': schema.IMAGE, **schema.TEXT, **schema.MASKED_TEXT}
  pairs_field = 'captions'   # training reads (image, caption) pairs (`data.caption_pairs`)
  unilm_head_key = 'mlm_head.weight'

  def model(self, model_cfg):
    return heads.CaptioningModel(model_cfg)

  def example_inputs(self, model_cfg, batch_size: int = 1, text_len: int = 8) -> dict:
    images, ids, pad = base.zero_inputs(model_cfg, batch_size, text_len)
    return {'images': images, 'text_ids': ids, 'text_padding_mask': pad,
            'text_index': jnp.zeros((batch_size, 1), jnp.int32)}

  def objective(self, config) -> CaptioningFinetune:
    c = config.captioning
    return CaptioningFinetune(config.model, config.label_smoothing,
                              text_len=config.data.text_len,
                              drop_worst_ratio=float(c.drop_worst_ratio),
                              drop_worst_after=int(c.drop_worst_after),
                              **base.objective_inputs(config))

  def transform(self, config, inputs, fields, tokenizer):
    return transform(inputs, tokenizer, float(config.captioning.mask_prob), fields['image'],
                     fields['captions'])

  def evaluator(self, config, objective, eval_source, train_source, tokenizer, fields):
    count = int(config.eval_batches) * int(config.batch_size)
    return evaluator(config, eval_source, int(config.captioning.eval_examples) or count,
                     int(config.batch_size), evaluation.eval_inputs(config), tokenizer,
                     most_common_caption(train_source, fields['captions']),
                     image_mean=objective.image_mean, image_std=objective.image_std,
                     image_field=fields['image'], caption_field=fields['captions'])

  def submission(self, config, objective, source, tokenizer, fields, split):
    return submission(config, objective, source, tokenizer, fields, split)

  def predict_commands(self):
    return (base.PredictCommand('caption', 'image captioning', _add_arguments, _caption),)


TASK = registry.register(CaptioningTask())

"""The fine-tuning losses of unilm `beit3/engine_for_finetuning.py`, in float32.

All take logits/features from `beit3_jax.models.heads` and return a scalar mean:

- classification, NLVR2: softmax cross-entropy, optionally label-smoothed (timm's
  `LabelSmoothingCrossEntropy`: (1 - s) * NLL + s * mean over classes of -log p), or against
  soft targets (mixup / cutmix);
- VQAv2: binary cross-entropy with logits against the soft scores, averaged over every
  (example, answer) entry and multiplied by the number of answers (unilm's
  `F.binary_cross_entropy_with_logits(...) * labels.shape[1]`), i.e. a per-example sum;
- retrieval: the symmetric contrastive loss (CE image->text + CE text->image) / 2 over
  exp(logit_scale) * cosine similarities. Under `jax.jit` the features are global arrays over
  the whole data axis, so every image is contrasted with every text of the global batch (what
  unilm's all-gather with gradient does across GPUs);
- captioning: unilm's `BertCaptioningLoss` (utils.py) over the chosen (masked) text positions:
  KL(q || p) with q = 1 - s on the label and s / (C - 1) on every other class, and after
  `drop_worst_after` steps the worst `drop_worst_ratio` of the positions dropped;
- masked data modeling (pretraining) and captioning's sums: `masked_slots` picks the masked
  positions, `cross_entropy_sums` and `reduce_sums` give per-step sums that a run averages.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp


def _log_probs_and_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log-softmax (..., C) float32, NLL (...) of the int labels)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return logp, -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                           ) -> tuple[jax.Array, jax.Array]:
  """Per position (...), float32: (label-smoothed CE, plain NLL) of logits (..., C) against int
  labels (...). The smoothed CE is timm's: (1 - s) * NLL + s * mean over classes of -log p."""
  logp, nll = _log_probs_and_nll(logits, labels)
  return (1.0 - label_smoothing) * nll + label_smoothing * (-jnp.mean(logp, axis=-1)), nll


def captioning_token_losses(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                            ) -> tuple[jax.Array, jax.Array]:
  """Per position (...), float32: (unilm's captioning loss, plain NLL) of logits (..., C)
  against int labels (...). The loss is `nn.KLDivLoss` of `BertCaptioningLoss` (unilm
  beit3/utils.py) summed over classes: sum_c q_c (log q_c - log p_c), q = 1 - s on the label
  and s / (C - 1) on each other class, so it is 0 when p = q."""
  logp, nll = _log_probs_and_nll(logits, labels)
  classes = logits.shape[-1]
  on, off = 1.0 - label_smoothing, label_smoothing / (classes - 1)
  xlogx = lambda x: x * math.log(x) if x > 0 else 0.0  # noqa: E731
  entropy_term = xlogx(on) + (classes - 1) * xlogx(off)        # sum_c q_c log q_c
  others = -jnp.sum(logp, axis=-1) - nll                        # -sum_{c != label} log p_c
  return entropy_term + on * nll + off * others, nll


def keep_best(losses: jax.Array, valid: jax.Array, drop_ratio: float
              ) -> tuple[jax.Array, jax.Array]:
  """(sum, count) of the int(n * (1 - drop_ratio)) smallest `losses` among the n `valid`
  positions (any shape; unilm's `torch.topk(loss, k, largest=False)` over its masked tokens).

  k follows Python's float arithmetic exactly (a table over every possible n), so it matches
  unilm's `int(loss.shape[0] * (1 - ratio))` where float32 would round some n one lower."""
  flat = losses.reshape(-1).astype(jnp.float32)
  ok = valid.reshape(-1)
  table = jnp.asarray([int(n * (1 - drop_ratio)) for n in range(flat.shape[0] + 1)], jnp.int32)
  k = table[jnp.sum(ok.astype(jnp.int32))]
  ordered = jnp.sort(jnp.where(ok, flat, jnp.inf))
  kept = jnp.arange(flat.shape[0]) < k
  return jnp.sum(jnp.where(kept, ordered, 0.0)), k.astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean over examples (or over positions where `weights` > 0) of the smoothed CE.

  logits (..., C); labels (...) int. weights (...) optional 0/1 (mean over the 1s).
  """
  loss, _ = smoothed_cross_entropy(logits, labels, label_smoothing)
  if weights is None:
    return jnp.mean(loss)
  w = weights.astype(jnp.float32)
  return jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1.0)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over examples of -sum_c targets_c log p_c (mixup / cutmix targets)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(targets.astype(jnp.float32) * logp, axis=-1))


def vqa_example_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(B,) float32: each example's BCE with logits against its soft scores, summed over the
  A answers."""
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  bce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return jnp.sum(bce, axis=-1)


def vqa_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """BCE with logits against soft scores (B, A), mean over all entries x A (unilm)."""
  return jnp.mean(vqa_example_losses(logits, targets))


def contrastive_logits(image_features: jax.Array, text_features: jax.Array,
                       logit_scale: jax.Array) -> jax.Array:
  """exp(logit_scale) * image_features @ text_features.T: (B_images, B_texts) float32."""
  return jnp.exp(logit_scale.astype(jnp.float32)) * jnp.einsum(
      'id,td->it', image_features.astype(jnp.float32), text_features.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST)


def contrastive_loss(image_features: jax.Array, text_features: jax.Array,
                     logit_scale: jax.Array) -> jax.Array:
  """(CE(image -> its text) + CE(text -> its image)) / 2; pair i is image i and text i."""
  logits = contrastive_logits(image_features, text_features, logit_scale)
  labels = jnp.arange(logits.shape[0])
  return (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2


def masked_slots(mask: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
  """mask (B, L) bool -> (index (B, slots) int32, valid (B, slots) bool).

  The masked positions of each row in increasing order, then unmasked filler positions
  (valid False). Masked positions beyond `slots` are dropped.
  """
  order = jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)[:, :slots].astype(jnp.int32)
  return order, jnp.take_along_axis(mask, order, axis=1)


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, valid: jax.Array,
                       num_classes: int) -> dict[str, jax.Array]:
  """Sums over valid slots: cross-entropy, correct top-1, count, and a target histogram.

  logits (B, K, V) float32; targets, valid (B, K). Returns float32 scalars `ce`, `correct`,
  `count` and int32 `histogram` (V,).
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  w = valid.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * w
  histogram = jnp.zeros((num_classes,), jnp.int32).at[targets.reshape(-1)].add(
      valid.reshape(-1).astype(jnp.int32))
  return {'ce': jnp.sum(ce * w), 'correct': jnp.sum(correct), 'count': jnp.sum(w),
          'histogram': histogram}


def reduce_sums(sums: Mapping[str, Mapping[str, Any]]) -> dict:
  """Per-task sums of one step -> scalars: the histogram becomes the count of the most frequent
  target (`baseline_correct`), so that a step's metrics stay small."""
  out = {}
  for task, s in sums.items():
    out[task] = {k: v for k, v in s.items() if k != 'histogram'}
    out[task]['baseline_correct'] = jnp.max(s['histogram']).astype(jnp.float32)
  return out

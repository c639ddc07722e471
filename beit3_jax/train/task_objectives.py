"""Fine-tuning objectives, one per task, for the generic trainer (`beit3_jax.train.step`).

| objective | model (`models.heads`) | batch (`data.schema`) | loss | training metrics |
|---|---|---|---|---|
| ClassificationFinetune | ImageClassifier | classification | label-smoothed CE; with mixup / cutmix the soft-target CE (timm's Mixup) | loss, nll, accuracy, top5_accuracy |
| VQAFinetune | VQAModel | vqa | BCE with logits x answers against the soft scores (unilm) | loss, accuracy (score of the arg-max answer) |
| NLVR2Finetune | NLVR2Classifier | nlvr2 | CE over {false, true} | loss, accuracy |
| RetrievalFinetune | RetrievalModel | retrieval | symmetric contrastive loss over the global batch | loss, i2t / t2i in-batch accuracy |
| CaptioningFinetune | CaptioningModel | captioning | label-smoothed CE on the masked text positions, captioning attention mask | loss, accuracy (masked tokens) |

Every objective also reports `<task>/baseline_accuracy` (always predicting the most frequent
target) and `<task>/examples`. Losses are sums over examples (masked tokens for captioning)
divided by the whole batch's count (`normalizers`), so gradient accumulation (`micro_batches`)
gives the whole batch's gradient — except retrieval, whose contrastive loss couples the batch:
there each micro-batch is its own contrastive batch (use micro_batches=1 to contrast the whole
global batch; under jit the global batch spans every device, which is unilm's all-gather).

Retrieval and captioning validation metrics (R@k over the split, CIDEr of generated captions)
are not sums of batches; `beit3_jax.train.task_evaluation` computes them.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.data import image_ops
from beit3_jax.models import heads, num_patches
from beit3_jax.tasks import losses
from beit3_jax.tasks.captioning import captioning_attn_mask
from beit3_jax.train.masked_modeling import masked_slots, reduce_sums


def _histogram(targets, num: int):
  return jnp.zeros((num,), jnp.int32).at[targets].add(1)


def _summarize(sums, names: Mapping[str, str]) -> dict[str, float]:
  """Task sums -> '<task>/<metric>' floats; `names` maps a sum to its metric name."""
  metrics = {}
  for task, s in sums.items():
    count = max(float(s['count']), 1.0)
    for key, name in names.items():
      metrics[f'{task}/{name}'] = float(s[key]) / count
    if 'histogram' in s:          # evaluation sums
      metrics[f'{task}/baseline_accuracy'] = float(np.max(np.asarray(s['histogram']))) / count
    elif 'baseline_correct' in s:  # training steps (`reduce` kept only the histogram's max)
      metrics[f'{task}/baseline_accuracy'] = float(s['baseline_correct']) / count
    metrics[f'{task}/examples'] = float(s['count'])
  return metrics


class Finetune:
  """What every fine-tuning objective shares: one task, one stream named after it, params =
  the task model's tree ({'beit3', <head params>}), no extra state, no frozen inputs."""

  task: str = ''

  def __init__(self, model_cfg, model, *, image_mean=image_ops.BEIT3_MEAN,
               image_std=image_ops.BEIT3_STD, text_len: int = 8):
    self.model_cfg = model_cfg
    self.model = model
    self.image_mean = tuple(image_mean)
    self.image_std = tuple(image_std)
    self.text_len = int(text_len)

  @property
  def tasks(self) -> tuple[str, ...]:
    return (self.task,)

  def init_params(self, rng):
    """Boxed params (logical axis names on every leaf)."""
    inputs = heads.task_example_inputs(self.task, self.model_cfg, text_len=self.text_len)
    return self.model.init(rng, **inputs)['params']

  def init_extra(self, params):
    del params
    return {}

  def normalizers(self, batch) -> dict[str, jax.Array]:
    """Examples of the whole batch (the loss denominator)."""
    n = jax.tree.leaves(batch[self.task])[0].shape[0]
    return {self.task: jnp.asarray(float(n), jnp.float32)}

  def images(self, x):
    """uint8 (B, S, S, C) -> normalised float32."""
    return image_ops.normalize(x, self.image_mean, self.image_std)

  def apply(self, params, rng, train: bool, **inputs):
    rngs = {'drop_path': rng} if train else None
    return self.model.apply({'params': params}, deterministic=not train, rngs=rngs, **inputs)

  def finish(self, params, extra):
    return params, extra

  def reduce(self, sums):
    if all('histogram' in s for s in sums.values()):
      return reduce_sums(sums)
    return sums


def _mix_boxes(rng, size: int, lam):
  """CutMix box (y0, y1, x0, x1) of area ~ (1 - lam) of a size x size image (timm's rand_bbox)."""
  ky, kx = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  h = (size * cut).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, size)
  cx = jax.random.randint(kx, (), 0, size)
  y0, y1 = jnp.clip(cy - h // 2, 0, size), jnp.clip(cy + h // 2, 0, size)
  x0, x1 = jnp.clip(cx - h // 2, 0, size), jnp.clip(cx + h // 2, 0, size)
  return y0, y1, x0, x1


class ClassificationFinetune(Finetune):
  """Image classification: batch {'classification': {'image' uint8, 'label' int32}}.

  Mixup / CutMix (timm `Mixup`, batch mode, as unilm's ImageNet recipe): with probability
  `mixup_prob` the batch is mixed with its reverse; CutMix (alpha `cutmix`) is chosen with
  probability `switch_prob` when both are on, and its lambda is corrected to the pasted area.
  Targets become lam * smooth(one_hot(y)) + (1 - lam) * smooth(one_hot(y reversed)).
  """

  task = 'classification'

  def __init__(self, model_cfg, num_classes: int, label_smoothing: float = 0.0, *,
               mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0,
               switch_prob: float = 0.5, **kw):
    super().__init__(model_cfg, heads.ImageClassifier(model_cfg, num_classes), **kw)
    self.num_classes = int(num_classes)
    self.label_smoothing = float(label_smoothing)
    self.mixup, self.cutmix = float(mixup), float(cutmix)
    self.mixup_prob, self.switch_prob = float(mixup_prob), float(switch_prob)

  def smoothed_targets(self, labels):
    """(B, classes) float32: one-hot with label smoothing (timm's off / on values)."""
    s = self.label_smoothing
    return jax.nn.one_hot(labels, self.num_classes) * (1.0 - s) + s / self.num_classes

  def _mix(self, images, labels, rng):
    """(mixed float32 images, soft targets (B, classes))."""
    one_hot = self.smoothed_targets(labels)
    if self.mixup <= 0 and self.cutmix <= 0:
      return images, one_hot
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
    use_cut = (jax.random.uniform(k_switch) < self.switch_prob if self.mixup > 0 and
               self.cutmix > 0 else jnp.asarray(self.cutmix > 0))
    lam_mix = jax.random.beta(k_mix, max(self.mixup, 1e-6), max(self.mixup, 1e-6))
    lam_cut = jax.random.beta(k_cut, max(self.cutmix, 1e-6), max(self.cutmix, 1e-6))
    size = images.shape[1]
    y0, y1, x0, x1 = _mix_boxes(k_box, size, lam_cut)
    rows = jnp.arange(size)
    box = (((rows >= y0) & (rows < y1))[:, None] & ((rows >= x0) & (rows < x1))[None, :])
    lam_cut = 1.0 - jnp.sum(box) / (size * size)
    flipped = images[::-1]
    cut_images = jnp.where(box[None, :, :, None], flipped, images)
    mix_images = lam_mix * images + (1.0 - lam_mix) * flipped
    lam = jnp.where(use_cut, lam_cut, lam_mix)
    mixed = jnp.where(use_cut, cut_images, mix_images)
    apply = jax.random.uniform(k_apply) < self.mixup_prob
    lam = jnp.where(apply, lam, 1.0)
    mixed = jnp.where(apply, mixed, images)
    return mixed, lam * one_hot + (1.0 - lam) * one_hot[::-1]

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool):
    del frozen
    b = batch[self.task]
    labels = b['label'].astype(jnp.int32)
    images = self.images(b['image'])
    k_mix, k_model = jax.random.split(rng)
    if train:
      images, targets = self._mix(images, labels, k_mix)
    else:
      targets = self.smoothed_targets(labels)
    logits = self.apply(params, k_model, train, images=images)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.sum(targets * logp, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    k = min(5, self.num_classes)
    top_k = jax.lax.top_k(logits, k)[1]
    sums = {'ce': jnp.sum(ce), 'nll': jnp.sum(nll),
            'correct': jnp.sum((top_k[:, 0] == labels).astype(jnp.float32)),
            'correct5': jnp.sum(jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)),
            'count': jnp.asarray(labels.shape[0], jnp.float32),
            'histogram': _histogram(labels, self.num_classes)}
    return sums['ce'] / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return _summarize(sums, {'ce': 'loss', 'nll': 'nll', 'correct': 'accuracy',
                             'correct5': 'top5_accuracy'})


class VQAFinetune(Finetune):
  """VQA: batch {'vqa': {'image', 'text_ids', 'text_padding_mask', 'answer_scores' (B, A)}}."""

  task = 'vqa'

  def __init__(self, model_cfg, num_answers: int, **kw):
    super().__init__(model_cfg, heads.VQAModel(model_cfg, num_answers), **kw)
    self.num_answers = int(num_answers)

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool):
    del frozen
    b = batch[self.task]
    logits = self.apply(params, rng, train, images=self.images(b['image']),
                        text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'])
    scores = b['answer_scores'].astype(jnp.float32)
    n = scores.shape[0]
    # Per-example sum over answers = unilm's mean over all entries x A, summed over examples.
    bce = losses.vqa_loss(logits, scores) * n
    predicted = jnp.argmax(logits, axis=-1)
    score = jnp.take_along_axis(scores, predicted[:, None], axis=-1)[:, 0]
    sums = {'bce': bce, 'score': jnp.sum(score),
            'count': jnp.asarray(n, jnp.float32),
            # Summed target scores: its max / count is the accuracy of always giving the
            # most frequent answer, for one-hot and soft (VQAv2) targets alike.
            'histogram': jnp.sum(scores, axis=0)}
    return bce / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return _summarize(sums, {'bce': 'loss', 'score': 'accuracy'})


class NLVR2Finetune(Finetune):
  """NLVR2: batch {'nlvr2': {'image_a', 'image_b', 'text_ids', 'text_padding_mask', 'label'}}."""

  task = 'nlvr2'

  def __init__(self, model_cfg, **kw):
    super().__init__(model_cfg, heads.NLVR2Classifier(model_cfg), **kw)

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool):
    del frozen
    b = batch[self.task]
    logits = self.apply(params, rng, train, images_a=self.images(b['image_a']),
                        images_b=self.images(b['image_b']), text_ids=b['text_ids'],
                        text_padding_mask=b['text_padding_mask'])
    labels = b['label'].astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    sums = {'ce': jnp.sum(ce),
            'correct': jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
            'count': jnp.asarray(labels.shape[0], jnp.float32),
            'histogram': _histogram(labels, 2)}
    return sums['ce'] / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return _summarize(sums, {'ce': 'loss', 'correct': 'accuracy'})


class RetrievalFinetune(Finetune):
  """Image-text retrieval: batch {'retrieval': {'image', 'text_ids', 'text_padding_mask'}}, pair
  i = image i and text i. Training metrics: in-batch i2t/t2i accuracy (baseline 1 / B)."""

  task = 'retrieval'

  def __init__(self, model_cfg, **kw):
    super().__init__(model_cfg, heads.RetrievalModel(model_cfg), **kw)

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool):
    del frozen
    b = batch[self.task]
    out = self.apply(params, rng, train, images=self.images(b['image']),
                     text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'])
    logits = losses.contrastive_logits(out['image_features'], out['text_features'],
                                       out['logit_scale'])
    n = logits.shape[0]
    labels = jnp.arange(n)
    loss = (losses.cross_entropy(logits, labels) + losses.cross_entropy(logits.T, labels)) / 2
    sums = {'loss': loss * n,
            'i2t': jnp.sum((jnp.argmax(logits, 1) == labels).astype(jnp.float32)),
            't2i': jnp.sum((jnp.argmax(logits, 0) == labels).astype(jnp.float32)),
            'count': jnp.asarray(n, jnp.float32),
            'chance': jnp.asarray(1.0, jnp.float32)}
    return loss * n / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    out = _summarize(sums, {'loss': 'loss', 'i2t': 'i2t_accuracy', 't2i': 't2i_accuracy'})
    for task, s in sums.items():
      out[f'{task}/baseline_accuracy'] = float(s['chance']) / max(float(s['count']), 1.0)
    return out


class CaptioningFinetune(Finetune):
  """Captioning (masked fine-tuning): batch {'captioning': {'image', 'text_ids' (masked input),
  'text_padding_mask', 'text_targets', 'text_mask'}}; the loss is on the masked positions
  (gathered into `slots` = text_len - 1 fixed slots, the most that can be masked)."""

  task = 'captioning'

  def __init__(self, model_cfg, label_smoothing: float = 0.1, **kw):
    super().__init__(model_cfg, heads.CaptioningModel(model_cfg), **kw)
    self.label_smoothing = float(label_smoothing)
    self.num_image_tokens = 1 + num_patches(model_cfg)

  def normalizers(self, batch) -> dict[str, jax.Array]:
    """Masked tokens of the whole batch."""
    return {self.task: jnp.sum(batch[self.task]['text_mask'].astype(jnp.float32))}

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool):
    del frozen
    b = batch[self.task]
    text_len = b['text_ids'].shape[1]
    index, valid = masked_slots(b['text_mask'], text_len - 1)
    attn_mask = jnp.asarray(captioning_attn_mask(self.num_image_tokens, text_len))
    logits = self.apply(params, rng, train, images=self.images(b['image']),
                        text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'],
                        attn_mask=attn_mask, text_index=index)
    targets = jnp.take_along_axis(b['text_targets'], index, axis=1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    s = self.label_smoothing
    ce = (1.0 - s) * nll + s * (-jnp.mean(logp, axis=-1))
    w = valid.astype(jnp.float32)
    vocab = self.model_cfg.vocab_size
    sums = {'ce': jnp.sum(ce * w), 'nll': jnp.sum(nll * w),
            'correct': jnp.sum((jnp.argmax(logits, -1) == targets).astype(jnp.float32) * w),
            'count': jnp.sum(w),
            'histogram': jnp.zeros((vocab,), jnp.int32).at[targets.reshape(-1)].add(
                valid.reshape(-1).astype(jnp.int32))}
    return sums['ce'] / jnp.maximum(normalizers[self.task], 1.0), ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return _summarize(sums, {'ce': 'loss', 'nll': 'nll', 'correct': 'accuracy'})


def make_objective(config, num_answers: int = 0) -> Finetune:
  """The objective of `config.task` (`num_answers`: the VQA answer vocabulary's size)."""
  task = config.task
  d = config.data
  kw = dict(image_mean=tuple(d.get('image_mean', image_ops.BEIT3_MEAN)),
            image_std=tuple(d.get('image_std', image_ops.BEIT3_STD)),
            text_len=int(d.get('text_len', 8)))
  if task == 'classification':
    return ClassificationFinetune(config.model, config.num_classes,
                                  config.get('label_smoothing', 0.0),
                                  mixup=config.get('mixup', 0.0), cutmix=config.get('cutmix', 0.0),
                                  mixup_prob=config.get('mixup_prob', 1.0),
                                  switch_prob=config.get('mixup_switch_prob', 0.5), **kw)
  if task == 'vqa':
    return VQAFinetune(config.model, num_answers, **kw)
  if task == 'nlvr2':
    return NLVR2Finetune(config.model, **kw)
  if task == 'retrieval':
    return RetrievalFinetune(config.model, **kw)
  if task == 'captioning':
    return CaptioningFinetune(config.model, config.get('label_smoothing', 0.1), **kw)
  raise ValueError(f'config.task={task!r}; known: {heads.TASKS}.')

"""Image classification (ImageNet-1k in unilm's recipe): `ImageClassifier`, label-smoothed
cross-entropy with timm's Mixup / CutMix, top-1 / top-5 accuracy, `predict classify`.

- Model: `models.heads.ImageClassifier` (mean-pooled patch tokens -> fc_norm -> head), without
  the final backbone norm (unilm's classification models drop it). Head size: `num_classes`.
- Batch: {'image' uint8 (B, S, S, 3), 'label' int32 (B,)}; example fields `image`, `label`.
- Objective: label-smoothed softmax cross-entropy (`config.label_smoothing`); in training, Mixup
  / CutMix (timm `Mixup`, batch mode, as unilm's ImageNet recipe): with probability
  `mixup_prob` the batch is mixed with its reverse; CutMix (alpha `cutmix`) is chosen with
  probability `mixup_switch_prob` when both are on, and its lambda is corrected to the pasted
  area. Targets become lam * smooth(one_hot(y)) + (1 - lam) * smooth(one_hot(y reversed)).
  Metrics: classification/{loss, nll, accuracy, top5_accuracy, baseline_accuracy, examples}.
- Converted unilm models are normalised with ImageNet's mean / std (unilm's in1k recipe).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.data import augment, image_ops, pipeline, schema
from beit3_jax.data.finetuning import view
from beit3_jax.data.pretraining import get_field, load_image
from beit3_jax.models import heads
from beit3_jax.tasks import base, registry, showcase


def transform(cfg, num_classes: int, image_field: str = 'image',
              label_field: str = 'label') -> pipeline.Transform:
  """(example with an image and an int label, rng) -> {'image' uint8, 'label' int32}; a label
  outside [0, num_classes) is skipped."""
  def apply(example, rng):
    image = load_image(example, image_field)
    if isinstance(image, pipeline.Skip):
      return image
    label = int(np.asarray(get_field(example, label_field)))
    if not 0 <= label < num_classes:
      return pipeline.Skip('label out of range')
    return {'image': view(cfg, image, rng), 'label': np.int32(label)}
  return apply


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


class ClassificationFinetune(base.Finetune):
  """batch {'classification': {'image' uint8, 'label' int32}} (see the module docstring)."""

  def __init__(self, model_cfg, num_classes: int, label_smoothing: float = 0.0, *,
               mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0,
               switch_prob: float = 0.5, erasing: augment.RandomErasing | None = None, **kw):
    super().__init__(TASK, model_cfg, head_sizes={'num_classes': num_classes}, **kw)
    self.erasing = erasing   # timm's RandomErasing of the normalised training images
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

  def logits(self, params, b) -> jax.Array:
    """(B, num_classes) float logits of the task's fields `b`, in evaluation mode."""
    return self.apply(params, None, False, images=self.images(b['image']))

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
    del frozen
    b = batch[self.task]
    labels = b['label'].astype(jnp.int32)
    images = self.images(b['image'])
    k_mix, k_model = jax.random.split(rng)
    if train and self.erasing is not None:   # as timm: erased per image, before the batch mix
      images = augment.erase_on_device(images, jax.random.fold_in(rng, 1), self.erasing)
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
    w = base.example_weights(b, labels.shape[0])
    sums = {'ce': jnp.sum(w * ce), 'nll': jnp.sum(w * nll),
            'correct': jnp.sum(w * (top_k[:, 0] == labels)),
            'correct5': jnp.sum(w * jnp.any(top_k == labels[:, None], axis=-1)),
            'count': jnp.sum(w),
            'histogram': base.histogram(labels, self.num_classes, w)}
    return sums['ce'] / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return base.summarize_sums(sums, {'ce': 'loss', 'nll': 'nll', 'correct': 'accuracy',
                                      'correct5': 'top5_accuracy'})


# ------------------------------------------------------------------------------------------
# predict classify


def _add_arguments(p) -> None:
  p.add_argument('images', nargs='+', help='image files or folders')
  p.add_argument('--class-names', metavar='FILE', help="one name per line; default: the run's "
                 'class_names, else indices')
  p.add_argument('--top-k', type=int, default=5)


def _class_names(args, session) -> list[str] | None:
  n = session.model.head_sizes['num_classes']
  if args.class_names:
    names, where = session.read_lines(args.class_names, 'class names'), args.class_names
  else:
    names = list((session.model.run_config or {}).get('class_names') or [])
    where = 'the run config'
    if not names:
      return None
  if len(names) != n:
    raise base.PredictError(f'{len(names)} class names from {where}, but the head has {n} '
                            'classes.')
  return [str(x) for x in names]


def _classify(args, session) -> dict:
  names = _class_names(args, session)
  paths = session.image_paths(args.images)
  out = session.logits([session.images(args, paths)], args.batch_size)   # (N, C)
  shifted = out.astype(np.float64) - out.max(axis=-1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
  idx, scores = session.top_k(probs, args.top_k)
  labels = [[names[j] if names else str(j) for j in row] for row in idx]
  for p, row, sc in zip(paths, labels, scores):
    print(f'{p}: ' + ', '.join(f'{c} {s:.3f}' for c, s in zip(row, sc)))
  if args.report:
    session.report(args, [
        showcase.Example(session.name(p), picture, [f'prediction: {row[0]}'], list(zip(row, sc)))
        for p, picture, row, sc in zip(paths, session.thumbnails(paths), labels, scores)],
        [f'The top {len(labels[0])} classes of each image, with softmax probabilities.'])
  return {'image_files': paths, 'logits': out, 'top_k': idx, 'top_k_probs': scores,
          'top_k_classes': labels}


class ClassificationTask(base.Task):
  name = 'classification'
  best_metric = 'accuracy'
  random_erasing = True
  head_size_names = ('num_classes',)
  normalize_output = False
  needs_text = False
  default_fields = {'image': 'image', 'label': 'label'}
  batch_fields = {'image': schema.IMAGE, 'label': schema.LABEL}
  unilm_head_key = 'fc_norm.weight'
  unilm_head_sizes = {'num_classes': 'head.weight'}
  default_image_norm = (image_ops.IMAGENET_MEAN, image_ops.IMAGENET_STD,
                        "ImageNet, unilm's classification recipe")
  default_eval_crop_pct = 1.0               # unilm's ImageNet evaluation view

  def model(self, model_cfg, num_classes: int = 1000):
    return heads.ImageClassifier(model_cfg, int(num_classes))

  def example_inputs(self, model_cfg, batch_size: int = 1, text_len: int = 8) -> dict:
    images, _, _ = base.zero_inputs(model_cfg, batch_size, text_len)
    return {'images': images}

  def head_sizes(self, config) -> dict[str, int]:
    return {'num_classes': int(config['num_classes'])}

  def objective(self, config) -> ClassificationFinetune:
    return ClassificationFinetune(config.model, config.num_classes, config.label_smoothing,
                                  mixup=config.mixup, cutmix=config.cutmix,
                                  mixup_prob=config.mixup_prob,
                                  switch_prob=config.mixup_switch_prob,
                                  erasing=base.random_erasing(self, config),
                                  **base.objective_inputs(config))

  def transform(self, config, inputs, fields, tokenizer):
    del tokenizer
    return transform(inputs, config.num_classes, fields['image'], fields['label'])

  def describe(self, config) -> str:
    return f'{config.num_classes} classes'

  def describe_predictions(self, config, examples, logits, tokenizer):
    names = list(config.class_names) or [str(i) for i in range(int(config.num_classes))]
    return [showcase.Example(f'#{i}', examples['image'][i],
                             [f"truth: {names[int(examples['label'][i])]}",
                              'top-5: ' + base.top_k_text(logits[i], names, 5)])
            for i in range(len(logits))]

  def predict_commands(self):
    return (base.PredictCommand('classify', 'image classification', _add_arguments, _classify),)


TASK = registry.register(ClassificationTask())

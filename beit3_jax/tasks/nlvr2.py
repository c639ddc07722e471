"""NLVR2 (is a statement true of a pair of images): `NLVR2Classifier`, cross-entropy over
{false, true}, accuracy.

- Model: `models.heads.NLVR2Classifier` (per image [vision CLS, first text token], the pair's
  two concatenated, then unilm's two-layer MLP head); final backbone norm kept.
- Batch: {'image_a', 'image_b' uint8, 'text_ids', 'text_padding_mask', 'label' int32 (B,)}.
  Both images get the view (independent crops); the statement is encoded once.
- Metrics: nlvr2/{loss, accuracy, baseline_accuracy, examples}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.data import pipeline, schema
from beit3_jax.data.finetuning import as_str, view
from beit3_jax.data.pretraining import get_field, load_image
from beit3_jax.data.text import TextTokenizer
from beit3_jax.models import heads
from beit3_jax.tasks import base, registry


def transform(cfg, tokenizer: TextTokenizer, image_a_field: str = 'image_a',
              image_b_field: str = 'image_b', statement_field: str = 'statement',
              label_field: str = 'label') -> pipeline.Transform:
  """(example with two images, a statement and a 0/1 label, rng) -> the batch layout."""
  def apply(example, rng):
    statement = as_str(get_field(example, statement_field)).strip()
    if not statement:
      return pipeline.Skip('empty statement')
    images = []
    for field in (image_a_field, image_b_field):
      image = load_image(example, field)
      if isinstance(image, pipeline.Skip):
        return image
      images.append(view(cfg, image, rng))
    label = int(np.asarray(get_field(example, label_field)))
    if label not in (0, 1):
      return pipeline.Skip('label not 0/1')
    ids, pad = tokenizer.encode_sequence(statement, cfg.text_len)
    return {'image_a': images[0], 'image_b': images[1], 'text_ids': ids.astype(np.int32),
            'text_padding_mask': pad, 'label': np.int32(label)}
  return apply


class NLVR2Finetune(base.Finetune):
  """batch {'nlvr2': {'image_a', 'image_b', 'text_ids', 'text_padding_mask', 'label'}}."""

  def __init__(self, model_cfg, *, text_len: int = 8, **kw):
    super().__init__(TASK, model_cfg, text_len=text_len, **kw)

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
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
            'histogram': base.histogram(labels, 2)}
    return sums['ce'] / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return base.summarize_sums(sums, {'ce': 'loss', 'correct': 'accuracy'})


class NLVR2Task(base.Task):
  name = 'nlvr2'
  builtin_source = 'builtin:nlvr2'
  default_fields = {'image_a': 'image_a', 'image_b': 'image_b', 'statement': 'statement',
                    'label': 'label'}
  batch_fields = {'image_a': schema.IMAGE, 'image_b': schema.IMAGE, **schema.TEXT,
                  'label': schema.LABEL}
  unilm_head_key = 'head.dense1.weight'

  def model(self, model_cfg):
    return heads.NLVR2Classifier(model_cfg)

  def example_inputs(self, model_cfg, batch_size: int = 1, text_len: int = 8) -> dict:
    images, ids, pad = base.zero_inputs(model_cfg, batch_size, text_len)
    return {'images_a': images, 'images_b': images, 'text_ids': ids, 'text_padding_mask': pad}

  def objective(self, config) -> NLVR2Finetune:
    return NLVR2Finetune(config.model, text_len=config.data.text_len,
                         **base.objective_inputs(config))

  def transform(self, config, inputs, fields, tokenizer):
    return transform(inputs, tokenizer, fields['image_a'], fields['image_b'],
                     fields['statement'], fields['label'])

  def flops(self, config) -> tuple[float, int]:
    forward, tokens = super().flops(config)
    return 2 * forward, 2 * tokens     # two image + statement passes per example


TASK = registry.register(NLVR2Task())

"""Image-text retrieval (COCO / Flickr30k in unilm's recipe): `RetrievalModel`, the symmetric
contrastive loss, R@k over the whole validation split, `predict retrieve` and `predict embed`.

- Model: `models.heads.RetrievalModel` (index 0 of an image-only and a text-only pass through
  `vision_head` / `language_head`, l2-normalised; `logit_scale`); final backbone norm kept.
- Batch: {'image', 'text_ids', 'text_padding_mask'}: pair i = image i and text i, one caption
  per pass (the example's rng picks it). Example fields: `image`, `captions`.
- Objective: (CE image->text + CE text->image) / 2 over exp(logit_scale) x cosine
  similarities. Under jit the global batch spans every device (unilm's all-gather); with
  `micro_batches` > 1 each micro-batch is its own contrastive batch. Training metrics:
  retrieval/{loss, i2t_accuracy, t2i_accuracy} in-batch, baseline 1 / B.
- Evaluation (unilm `beit3/engine_for_finetuning.py`, RetrievalHandler): every image of the
  evaluated examples and every one of their captions are embedded; the (images x captions)
  cosine similarities give R@1/5/10 both ways (`tasks.metrics.retrieval_recall`). Baseline:
  `retrieval/random_r1`, the R@1 of a random ranking (captions per image / captions for i2t,
  1 / images for t2i; their mean).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax import losses
from beit3_jax.data import pipeline, schema
from beit3_jax.data.finetuning import FinetuneInputs, caption_example, view
from beit3_jax.data.text import TextTokenizer
from beit3_jax.models import heads, num_patches
from beit3_jax.tasks import base, evaluation, metrics, registry, showcase
from beit3_jax.models.flops import beit3_forward_flops


def transform(cfg, tokenizer: TextTokenizer, image_field: str = 'image',
              caption_field: str = 'captions') -> pipeline.Transform:
  """(example with an image and caption(s), rng) -> the batch layout (one caption: an example
  of `CaptionPairs` holds only one, otherwise `rng` draws it)."""
  def apply(example, rng):
    out = caption_example(cfg, tokenizer, example, rng, image_field, caption_field)
    if isinstance(out, pipeline.Skip):
      return out
    image, ids, pad = out
    return {'image': view(cfg, image, rng), 'text_ids': ids, 'text_padding_mask': pad}
  return apply


class RetrievalFinetune(base.Finetune):
  """batch {'retrieval': {'image', 'text_ids', 'text_padding_mask'}} (see the module doc)."""

  def __init__(self, model_cfg, *, text_len: int = 8, **kw):
    super().__init__(TASK, model_cfg, text_len=text_len, **kw)

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
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
    out = base.summarize_sums(sums, {'loss': 'loss', 'i2t': 'i2t_accuracy',
                                     't2i': 't2i_accuracy'})
    for task, s in sums.items():
      out[f'{task}/baseline_accuracy'] = float(s['chance']) / max(float(s['count']), 1.0)
    return out


def evaluator(objective: base.Finetune, source, count: int, batch_size: int,
              inputs: FinetuneInputs, tokenizer, image_field: str = 'image',
              caption_field: str = 'captions') -> Callable[[Any, Any], dict]:
  """(params, mesh) -> {'retrieval/{i2t,t2i}_r{1,5,10}', 'retrieval/r_mean',
  'retrieval/random_r1', 'retrieval/images', 'retrieval/texts'} over the first `count`
  examples of `source` (every caption of each)."""
  images, captions = evaluation.read_captioned(source, count, inputs, image_field,
                                               caption_field)
  texts = [t for group in captions for t in group]
  text_to_image = np.repeat(np.arange(len(captions)), [len(g) for g in captions])
  encoded = [tokenizer.encode_sequence(t, inputs.text_len) for t in texts]
  ids = np.stack([e[0] for e in encoded]).astype(np.int32)
  pad = np.stack([e[1] for e in encoded])

  # Compiled once per evaluator; the params are an argument (a closure would bake them into
  # every evaluation's program as constants and recompile each time).
  image_fn = jax.jit(lambda params, b: objective.apply(
      params, None, False, images=objective.images(b['image']))['image_features'])
  text_fn = jax.jit(lambda params, b: objective.apply(
      params, None, False, text_ids=b['text_ids'],
      text_padding_mask=b['text_padding_mask'])['text_features'])

  def evaluate(params, mesh) -> dict[str, float]:
    image_features = evaluation.batched(lambda b: image_fn(params, b), {'image': images},
                                        batch_size, mesh)
    text_features = evaluation.batched(lambda b: text_fn(params, b),
                                       {'text_ids': ids, 'text_padding_mask': pad},
                                       batch_size, mesh)
    similarity = image_features.astype(np.float64) @ text_features.astype(np.float64).T
    last_similarity[:] = [similarity[:, :base.SHOWCASE_EXAMPLES].copy()]   # what is drawn
    out = {f'{TASK.name}/{k}': v for k, v in
           metrics.retrieval_recall(similarity, text_to_image).items()}
    per_image = np.mean([len(g) for g in captions])
    out[f'{TASK.name}/random_r1'] = float(np.mean([per_image / len(texts), 1 / len(captions)]))
    out[f'{TASK.name}/images'] = float(len(captions))
    out[f'{TASK.name}/texts'] = float(len(texts))
    return out

  last_similarity: list[np.ndarray] = []

  def showcase_examples() -> list:
    """The first texts of the last evaluation as queries, each with its top 5 images (the
    true image marked)."""
    if not last_similarity:
      return []
    sim = last_similarity[0]
    out = []
    for t in range(min(base.SHOWCASE_EXAMPLES, len(texts))):
      best = np.argsort(-sim[:, t], kind='stable')[:5]
      truth = int(text_to_image[t])
      rank = int(np.sum(sim[:, t] > sim[truth, t])) + 1
      out.append(showcase.Example(
          f'text #{t}', (), [f'query: {texts[t]}', f'true image: #{truth} (rank {rank})'],
          [(images[i], float(sim[i, t])) for i in best]))
    return out
  evaluate.showcase = showcase_examples
  return evaluate


# ------------------------------------------------------------------------------------------
# predict retrieve


def _add_arguments(p) -> None:
  p.add_argument('--images', required=True, metavar='DIR', help='a folder of images')
  p.add_argument('--texts', required=True, metavar='FILE', help='texts, one per line')
  p.add_argument('--top-k', type=int, default=5)


def _retrieve(args, session) -> dict:
  paths = session.list_images(args.images)
  texts = session.read_lines(args.texts, 'texts')
  _, ids, pad = session.texts(args, texts)
  image_features = session.embed_images(session.images(args, paths), args.batch_size)
  text_features = session.embed_texts(ids, pad, args.batch_size)
  sim = image_features @ text_features.T                      # (I, T) cosine similarity
  t2i, t2i_scores = session.top_k(sim.T, args.top_k)
  i2t, i2t_scores = session.top_k(sim, args.top_k)
  print(f'text -> images (top {t2i.shape[1]}, cosine similarity):')
  for t, idx, sc in zip(texts, t2i, t2i_scores):
    print(f'  {session.short(t)!r}')
    for rank, (j, s) in enumerate(zip(idx, sc), 1):
      print(f'    {rank}. {os.path.basename(paths[j])}  {s:+.4f}')
  print(f'image -> texts (top {i2t.shape[1]}, cosine similarity):')
  for p, idx, sc in zip(paths, i2t, i2t_scores):
    print(f'  {os.path.basename(p)}')
    for rank, (j, s) in enumerate(zip(idx, sc), 1):
      print(f'    {rank}. {session.short(texts[j])!r}  {s:+.4f}')
  if args.report:
    pictures = session.thumbnails(paths)
    session.report(args, {
        'Text -> images': [showcase.Example(t, ranked=[(pictures[j], s) for j, s in zip(idx, sc)])
                           for t, idx, sc in zip(texts, t2i, t2i_scores)],
        'Image -> texts': [showcase.Example(session.name(p), pictures[i],
                                   ranked=[(texts[j], s) for j, s in zip(idx, sc)])
                           for i, (p, idx, sc) in enumerate(zip(paths, i2t, i2t_scores))]},
        [f'The top {t2i.shape[1]} of each query by cosine similarity.'])
  return {'image_files': paths, 'texts': texts, 'similarity': sim,
          'text_to_image': t2i, 'text_to_image_scores': t2i_scores,
          'image_to_text': i2t, 'image_to_text_scores': i2t_scores,
          'image_features': image_features, 'text_features': text_features}


class RetrievalTask(base.Task):
  name = 'retrieval'
  best_metric = 'r_mean'
  default_fields = {'image': 'image', 'captions': 'captions'}
  batch_fields = {'image': schema.IMAGE, **schema.TEXT}
  pairs_field = 'captions'   # training reads (image, caption) pairs (`data.caption_pairs`)
  unilm_head_key = 'vision_head.weight'

  def model(self, model_cfg):
    return heads.RetrievalModel(model_cfg)

  def example_inputs(self, model_cfg, batch_size: int = 1, text_len: int = 8) -> dict:
    images, ids, pad = base.zero_inputs(model_cfg, batch_size, text_len)
    return {'images': images, 'text_ids': ids, 'text_padding_mask': pad}

  def objective(self, config) -> RetrievalFinetune:
    return RetrievalFinetune(config.model, text_len=config.data.text_len,
                             **base.objective_inputs(config))

  def transform(self, config, inputs, fields, tokenizer):
    return transform(inputs, tokenizer, fields['image'], fields['captions'])

  def evaluator(self, config, objective, eval_source, train_source, tokenizer, fields):
    del train_source
    return evaluator(objective, eval_source, int(config.eval_batches) * int(config.batch_size),
                     int(config.batch_size), evaluation.eval_inputs(config), tokenizer,
                     fields['image'], fields['captions'])

  def flops(self, config) -> tuple[float, int]:
    m, text_len = config.model, int(config.data.text_len)
    return (beit3_forward_flops(m, images=True)
            + beit3_forward_flops(m, images=False, text_len=text_len),
            1 + num_patches(m) + text_len)     # an image-only and a text-only pass

  def predict_commands(self):
    return (base.PredictCommand('retrieve', 'image <-> text retrieval', _add_arguments,
                                _retrieve),)

  def embed(self, model_cfg):
    net = self.model(model_cfg)
    return (lambda p, x: net.apply({'params': p}, images=x)['image_features'],
            lambda p, ids, pad: net.apply({'params': p}, text_ids=ids,
                                          text_padding_mask=pad)['text_features'])


TASK = registry.register(RetrievalTask())

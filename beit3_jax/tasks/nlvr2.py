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
from beit3_jax.tasks import base, registry, showcase


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

  def logits(self, params, b) -> jax.Array:
    """(B, 2) float logits (false, true) of the task's fields `b`, in evaluation mode."""
    return self.apply(params, None, False, images_a=self.images(b['image_a']),
                      images_b=self.images(b['image_b']), text_ids=b['text_ids'],
                      text_padding_mask=b['text_padding_mask'])

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
    del frozen
    b = batch[self.task]
    logits = self.apply(params, rng, train, images_a=self.images(b['image_a']),
                        images_b=self.images(b['image_b']), text_ids=b['text_ids'],
                        text_padding_mask=b['text_padding_mask'])
    labels = b['label'].astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    w = base.example_weights(b, labels.shape[0])
    sums = {'ce': jnp.sum(w * ce),
            'correct': jnp.sum(w * (jnp.argmax(logits, -1) == labels)),
            'count': jnp.sum(w),
            'histogram': base.histogram(labels, 2, w)}
    return sums['ce'] / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return base.summarize_sums(sums, {'ce': 'loss', 'correct': 'accuracy'})


# ------------------------------------------------------------------------------------------
# predict verify


def _add_arguments(p) -> None:
  p.add_argument('--pair', nargs=2, metavar=('IMAGE_A', 'IMAGE_B'), help='two image files')
  p.add_argument('--statement', help='a statement about the pair')
  p.add_argument('--statements', metavar='FILE', help='one "image_a<TAB>image_b<TAB>statement" '
                 "per line; image names are relative to --images, else to the file's folder")
  p.add_argument('--images', metavar='DIR', help='the folder of the --statements file\'s images')


def _verify(args, session) -> dict:
  if args.statements:
    if args.pair or args.statement:
      raise base.PredictError('Give the statements with --statements FILE or with --pair and '
                              '--statement, not both.')
    if args.images and not session.is_dir(args.images):
      raise base.PredictError(f'--images {args.images} is not a folder.')
    rows = session.read_table(args.statements, 'statements',
                              ('image_a', 'image_b', 'statement'), 2, args.images)
  elif args.pair and args.statement:
    for p in args.pair:
      if not session.is_file(p):
        raise base.PredictError(f'--pair: no image file at {p} (two image files, not folders).')
    rows = [(*args.pair, args.statement)]
  else:
    raise base.PredictError('verify needs --pair IMAGE_A IMAGE_B and --statement TEXT, or '
                            '--statements FILE (one "image_a<TAB>image_b<TAB>statement" per '
                            'line).')
  paths_a, paths_b, statements = (list(c) for c in zip(*rows))
  _, ids, pad = session.texts(args, statements)
  images = session.images(args, paths_a + paths_b)
  n = len(rows)
  out = session.logits([images[:n], images[n:], ids, pad], args.batch_size)     # (N, 2)
  shifted = out.astype(np.float64) - out.max(axis=-1, keepdims=True)
  p_true = (np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True))[:, 1]
  verdicts = ['true' if p > 0.5 else 'false' for p in p_true]
  for a, b, s, v, p in zip(paths_a, paths_b, statements, verdicts, p_true):
    print(f'{a} + {b} | {s!r} -> {v} (P(true) {p:.3f})')
  if args.report:
    unique = list(dict.fromkeys(paths_a + paths_b))
    pictures = dict(zip(unique, session.thumbnails(unique)))
    session.report(args, [
        showcase.Example(f'{session.name(a)} + {session.name(b)}', [pictures[a], pictures[b]],
                [f'statement: {s}', f'verdict: {v} (P(true) {p:.3f})'])
        for a, b, s, v, p in zip(paths_a, paths_b, statements, verdicts, p_true)],
        ['Is the statement true of the pair (left, right)? Softmax over {false, true}.'])
  return {'image_a_files': paths_a, 'image_b_files': paths_b, 'statements': statements,
          'logits': out, 'prob_true': p_true, 'verdicts': verdicts}


class NLVR2Task(base.Task):
  name = 'nlvr2'
  best_metric = 'accuracy'
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

  def describe_predictions(self, config, examples, logits, tokenizer):
    verdict = ('false', 'true')
    return [showcase.Example(
        f'#{i}', (examples['image_a'][i], examples['image_b'][i]),
        [f"statement: {tokenizer.decode(examples['text_ids'][i])}",
         f"truth: {verdict[int(examples['label'][i])]}",
         'prediction: ' + base.top_k_text(logits[i], verdict, 1)])
        for i in range(len(logits))]

  def predict_commands(self):
    return (base.PredictCommand('verify', 'is a statement true of a pair of images (NLVR2)',
                                _add_arguments, _verify),)


TASK = registry.register(NLVR2Task())

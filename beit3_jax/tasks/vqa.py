"""Visual question answering (VQAv2 in unilm's recipe): `VQAModel`, BCE against soft answer
scores, VQA accuracy, `predict answer`.

- Model: `models.heads.VQAModel` (pooled vision CLS -> head over the answer vocabulary),
  without the final backbone norm (as unilm's). Head size: `num_answers`, the size of the
  answer vocabulary (`config.answers`; () = the built-in data's `synthetic_world.ANSWERS`).
- Batch: {'image', 'text_ids', 'text_padding_mask', 'answer_scores' (B, A) float32}. Example
  fields: `image`, `question`, `answer`, and for unilm's VQAv2 soft targets `answer_ids` +
  `answer_scores` (as `beit3_jax.data.builders.vqa_nlvr2` stores them).
- Text: `<s>` question `</s>` padded to `text_len`. An example of the built-in data holds
  several questions; each pass picks one with the example's rng (train and eval alike, so the
  validation batches are the same every time for a fixed seed).
- Objective: binary cross-entropy with logits against the soft scores, x the number of answers
  (unilm). Metrics: vqa/{loss, accuracy (the score of the arg-max answer: VQA accuracy; with
  one answer per question, arg-max == answer), baseline_accuracy, examples}.
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax import losses
from beit3_jax.data import pipeline, schema, synthetic_world
from beit3_jax.data.finetuning import FinetuneInputs, as_list, as_str, view
from beit3_jax.data.pretraining import get_field, load_image
from beit3_jax.data.text import TextTokenizer
from beit3_jax.models import heads
from beit3_jax.tasks import base, registry, showcase


def answer_vocabulary(config) -> tuple[str, ...]:
  """The answer vocabulary of a fine-tuning config (ConfigDict or config.json dict):
  `answers`, or the built-in data's when it is empty."""
  answers = tuple(config['answers'] or ())
  return answers if answers else tuple(synthetic_world.ANSWERS)


def transform(cfg, tokenizer: TextTokenizer, answers: Sequence[str],
              image_field: str = 'image', question_field: str = 'qa/question',
              answer_field: str = 'qa/answer', answer_ids_field: str = '',
              answer_scores_field: str = '') -> pipeline.Transform:
  """(example with an image and question(s) + answer(s), rng) -> the batch layout
  {'image', 'text_ids', 'text_padding_mask', 'answer_scores' (A,) float32}.

  Targets, by the fields given:
    answer_scores_field (and answer_ids_field) set: soft scores. The example holds one
      question; `answer_ids` are indices into `answers` and `answer_scores` their scores
      (unilm's VQAv2 targets). In training a question without any scored answer is skipped
      (unilm drops those); in evaluation it is kept with all-zero scores, so it counts as
      wrong, as in the official VQA accuracy.
    otherwise: one-hot on `answer_field`, matched to `answers` by its text (so any answer
      vocabulary works); an answer outside the vocabulary is skipped.

  Raises (when called):
    ValueError: an answer id outside `answers` (the data was built with another vocabulary),
      or soft scores with several questions per example.
  """
  index = {a: i for i, a in enumerate(answers)}
  soft = bool(answer_scores_field)
  if soft and not answer_ids_field:
    raise ValueError('VQA soft scores need both fields: answer_ids and answer_scores '
                     '(config.data.fields).')

  def targets(example, questions):
    if not soft:
      given = [as_str(a).strip() for a in as_list(get_field(example, answer_field))]
      if len(questions) != len(given):
        return pipeline.Skip('no question')
      return given
    if len(questions) != 1:
      raise ValueError(f'VQA soft scores ({answer_ids_field!r}, {answer_scores_field!r}) need '
                       f'one question per example; this one has {len(questions)} in '
                       f'{question_field!r}.')
    ids = np.asarray(get_field(example, answer_ids_field), np.int64).reshape(-1)
    scores = np.asarray(get_field(example, answer_scores_field), np.float32).reshape(-1)
    if len(ids) != len(scores):
      return pipeline.Skip('answer_ids and answer_scores differ in length')
    outside = ids[(ids < 0) | (ids >= len(answers))]
    if len(outside):
      raise ValueError(f'Answer id {int(outside[0])} in {answer_ids_field!r} is outside the '
                       f'answer vocabulary of '
                       f'{len(answers)} answers: config.answers is not the vocabulary the data '
                       'was built with (its answer_vocabulary.json).')
    if cfg.train and not len(ids):
      return pipeline.Skip('no answer in the vocabulary')
    vector = np.zeros((len(answers),), np.float32)
    vector[ids] = scores
    return [vector]

  def apply(example, rng):
    questions = [as_str(q).strip() for q in as_list(get_field(example, question_field))]
    if not questions:
      return pipeline.Skip('no question')
    given = targets(example, questions)
    if isinstance(given, pipeline.Skip):
      return given
    k = int(rng.integers(len(questions)))
    question, answer = questions[k], given[k]
    if not question:
      return pipeline.Skip('empty question')
    if soft:
      scores = answer
    else:
      if answer not in index:
        return pipeline.Skip('answer not in vocabulary')
      scores = np.zeros((len(answers),), np.float32)
      scores[index[answer]] = 1.0
    image = load_image(example, image_field)
    if isinstance(image, pipeline.Skip):
      return image
    ids, pad = tokenizer.encode_sequence(question, cfg.text_len)
    return {'image': view(cfg, image, rng), 'text_ids': ids.astype(np.int32),
            'text_padding_mask': pad, 'answer_scores': scores}
  return apply


class VQAFinetune(base.Finetune):
  """batch {'vqa': {'image', 'text_ids', 'text_padding_mask', 'answer_scores' (B, A)}}."""

  def __init__(self, model_cfg, num_answers: int, *, text_len: int = 8, **kw):
    super().__init__(TASK, model_cfg, head_sizes={'num_answers': num_answers},
                     text_len=text_len, **kw)
    self.num_answers = int(num_answers)

  def logits(self, params, b) -> jax.Array:
    """(B, num_answers) float logits of the task's fields `b`, in evaluation mode."""
    return self.apply(params, None, False, images=self.images(b['image']),
                      text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'])

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
    del frozen
    b = batch[self.task]
    logits = self.apply(params, rng, train, images=self.images(b['image']),
                        text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'])
    scores = b['answer_scores'].astype(jnp.float32)
    w = base.example_weights(b, scores.shape[0])
    # Per-example sums over answers: their mean is unilm's mean over all entries x A.
    bce = jnp.sum(w * losses.vqa_example_losses(logits, scores))
    predicted = jnp.argmax(logits, axis=-1)
    score = jnp.take_along_axis(scores, predicted[:, None], axis=-1)[:, 0]
    sums = {'bce': bce, 'score': jnp.sum(w * score),
            'count': jnp.sum(w),
            # Summed target scores: its max / count is the accuracy of always giving the
            # most frequent answer, for one-hot and soft (VQAv2) targets alike.
            'histogram': jnp.sum(w[:, None] * scores, axis=0)}
    return bce / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return base.summarize_sums(sums, {'bce': 'loss', 'score': 'accuracy'})


# ------------------------------------------------------------------------------------------
# predict answer


def _add_arguments(p) -> None:
  p.add_argument('--image', action='append', metavar='PATH', help='an image file (repeatable); '
                 "with --questions, the folder of the file's images")
  p.add_argument('--question', action='append', help='a question (repeatable)')
  p.add_argument('--questions', metavar='FILE', help='one "image<TAB>question" per line; image '
                 'names are relative to the --image folder, else to the file\'s folder')
  p.add_argument('--answers', metavar='FILE', help='the answer vocabulary (one per line, or '
                 "unilm's answer2label.txt); default: the run config's")
  p.add_argument('--top-k', type=int, default=3)


def read_answers(path: str, read_lines) -> list[str]:
  """A VQA answer vocabulary: one answer per line, or unilm's answer2label.txt (one JSON
  object {"answer": str, "label": int} per line). `read_lines(path, what)` reads the file."""
  lines = read_lines(path, 'answers')
  if not lines[0].startswith('{'):
    return lines
  by_label = {}
  for n, line in enumerate(lines, 1):
    try:
      item = json.loads(line)
      by_label[int(item['label'])] = str(item['answer'])
    except (ValueError, KeyError, TypeError) as e:
      raise base.PredictError(f'{path}:{n}: expected {{"answer": ..., "label": ...}}: {e}'
                              ) from None
  if sorted(by_label) != list(range(len(by_label))):
    raise base.PredictError(f'{path}: the labels are not 0..{len(by_label) - 1}.')
  return [by_label[i] for i in range(len(by_label))]


def _answers(args, session) -> list[str]:
  model = session.model
  if args.answers:
    answers, where = read_answers(args.answers, session.read_lines), args.answers
  elif model.run_config is not None:
    answers, where = list(answer_vocabulary(model.run_config)), 'the run config'
  else:
    raise base.PredictError('A converted VQA model needs its answer vocabulary: --answers FILE '
                            '(one answer per line in the order of the head\'s outputs, or '
                            'unilm\'s answer2label.txt).')
  n = model.head_sizes['num_answers']
  if len(answers) != n:
    raise base.PredictError(f'{len(answers)} answers from {where}, but the head has {n} '
                            'outputs.')
  return answers


def read_questions(path: str, folder: str | None, session) -> tuple[list[str], list[str]]:
  """(image files, questions) of a questions file: one "image<TAB>question" per line (blank
  lines skipped). A relative image name is taken in `folder`, else in the file's folder.

  Raises:
    PredictError: the file cannot be read, or a line has no tab, no image name, no question or
      names no image file (with the file's name and the line number).
  """
  rows = session.read_table(path, 'questions', ('image', 'question'), 1, folder)
  return [r[0] for r in rows], [r[1] for r in rows]


def _pairs(args, session) -> tuple[list[str], list[str]]:
  """(image files, questions), paired in order, of --image/--question or --questions."""
  if args.questions:
    if args.question:
      raise base.PredictError('Give the questions with --questions FILE or with --question, '
                              'not both.')
    if args.image and (len(args.image) != 1 or not session.is_dir(args.image[0])):
      raise base.PredictError('With --questions, --image names one folder (where the file\'s '
                              'image names are), or is left out (the file\'s folder).')
    return read_questions(args.questions, args.image[0] if args.image else None, session)
  if not args.image or not args.question:
    raise base.PredictError('answer needs --image and --question (each repeatable), or '
                            '--questions FILE (one "image<TAB>question" per line).')
  paths, questions = session.image_paths(args.image), list(args.question)
  if len(paths) == 1 and len(questions) > 1:
    paths = paths * len(questions)
  elif len(questions) == 1 and len(paths) > 1:
    questions = questions * len(paths)
  elif len(paths) != len(questions):
    raise base.PredictError(f'{len(paths)} images and {len(questions)} questions: give one '
                            'image and several questions, one question and several images, or '
                            'as many of each (paired in order).')
  return paths, questions


def _answer(args, session) -> dict:
  paths, questions = _pairs(args, session)
  answers = _answers(args, session)
  _, ids, pad = session.texts(args, questions)
  images = session.images(args, paths)
  out = session.logits([images, ids, pad], args.batch_size)    # (N, A)
  idx, scores = session.top_k(1.0 / (1.0 + np.exp(-out.astype(np.float64))), args.top_k)
  names = [[answers[j] for j in row] for row in idx]
  for p, q, row, sc in zip(paths, questions, names, scores):
    alts = ', '.join(f'{a} {s:.3f}' for a, s in zip(row[1:], sc[1:]))
    print(f'{p} | {q!r} -> {row[0]} ({sc[0]:.3f})' + (f'   [then: {alts}]' if alts else ''))
  if args.report:
    unique = list(dict.fromkeys(paths))
    pictures = dict(zip(unique, session.thumbnails(unique)))
    session.report(args, [
        showcase.Example(session.name(p), pictures[p], [f'question: {q}', f'answer: {row[0]}'],
                list(zip(row, sc)))
        for p, q, row, sc in zip(paths, questions, names, scores)],
        [f'The top {len(names[0])} answers of each question, with sigmoid scores.'])
  return {'image_files': paths, 'questions': questions, 'answers': [r[0] for r in names],
          'logits': out, 'top_k': idx, 'top_k_scores': scores, 'top_k_answers': names}


# ------------------------------------------------------------------------------------------
# the evaluation server's file (mode=submit)


def submission(config, objective: VQAFinetune, source, tokenizer: TextTokenizer,
               fields, split: str) -> base.Submission:
  """VQAv2's EvalAI file, as unilm's VQAHandler writes it (`submit_vqav2_<split>.json`):
  [{"question_id": int, "answer": str}, ...], one entry per question of `source` in order, the
  answer being the arg-max over the answer vocabulary (`answer_vocabulary(config)`, unilm's
  label2ans). Answers in the data are not read (test-dev / test have none).

  Every question of an example gets an entry; `fields['question_id']` (default 'question_id')
  holds its id, or a list of one id per question. Inputs are the validation view: the eval
  image view, `<s>` question `</s>` in `data.text_len` tokens.

  Raises (when predicting): ValueError naming the example (its index) whose image cannot be
  read, that has no question, or whose ids do not pair with its questions.
  """
  answers = answer_vocabulary(config)
  if objective.num_answers != len(answers):
    raise ValueError(f'The VQA head has {objective.num_answers} outputs but config.answers '
                     f'has {len(answers)} answers.')
  inputs = FinetuneInputs.from_config(config, train=False)
  image_field, question_field = fields['image'], fields['question']
  id_field = fields.get('question_id') or 'question_id'

  def prepare(i, example):
    questions = [as_str(q).strip() for q in as_list(get_field(example, question_field))]
    try:
      ids = as_list(get_field(example, id_field))
    except KeyError as e:
      raise ValueError(f'Example {i} of {split!r}: {e.args[0]} A submission needs the question '
                       'ids: data.fields.question_id names their field.') from None
    if not questions:
      raise ValueError(f'Example {i} of {split!r} has no question in {question_field!r}.')
    if len(ids) != len(questions):
      raise ValueError(f'Example {i} of {split!r} has {len(questions)} questions in '
                       f'{question_field!r} but {len(ids)} ids in {id_field!r}; expected one '
                       'id per question (data.fields.question_id names the id field).')
    image = load_image(example, image_field)
    if isinstance(image, pipeline.Skip):
      raise ValueError(f'Example {i} of {split!r}: {image.reason} in {image_field!r}; every '
                       'question of a submission needs an answer.')
    picture = view(inputs, image, np.random.default_rng(0))
    rows = []
    for question, qid in zip(questions, ids):
      text, pad = tokenizer.encode_sequence(question, inputs.text_len)
      rows.append(({'image': picture, 'text_ids': text.astype(np.int32),
                    'text_padding_mask': pad}, base.json_id(qid, id_field, i)))
    return rows

  @jax.jit
  def best(params, batch):
    return jnp.argmax(objective.logits(params, batch), axis=-1).astype(jnp.int32)

  def predict(params, mesh) -> list[dict]:
    labels, qids = base.predict_split(
        source, prepare, lambda b: best(params, b), int(config.batch_size), mesh,
        threads=int(config.data.read_threads), what='questions')
    return [{'question_id': qid, 'answer': answers[int(j)]} for qid, j in zip(qids, labels)]

  return base.Submission(base.submission_file_name('vqav2', split), 'question_id', predict)


class VQATask(base.Task):
  name = 'vqa'
  best_metric = 'accuracy'
  head_size_names = ('num_answers',)
  normalize_output = False
  default_fields = {'image': 'image', 'question': 'qa/question', 'answer': 'qa/answer',
                    'answer_ids': '', 'answer_scores': ''}   # '': one-hot on `answer`
  batch_fields = {'image': schema.IMAGE, **schema.TEXT,
                  'answer_scores': schema.Field(('B', 'A'), 'float32',
                                                'soft answer scores in [0, 1]')}
  unilm_head_key = 'pooler.dense.weight'
  unilm_head_sizes = {'num_answers': 'head.3.weight'}

  def model(self, model_cfg, num_answers: int = 3129):
    return heads.VQAModel(model_cfg, int(num_answers))

  def example_inputs(self, model_cfg, batch_size: int = 1, text_len: int = 8) -> dict:
    images, ids, pad = base.zero_inputs(model_cfg, batch_size, text_len)
    return {'images': images, 'text_ids': ids, 'text_padding_mask': pad}

  def head_sizes(self, config) -> dict[str, int]:
    return {'num_answers': len(answer_vocabulary(config))}

  def objective(self, config) -> VQAFinetune:
    return VQAFinetune(config.model, len(answer_vocabulary(config)),
                       text_len=config.data.text_len, **base.objective_inputs(config))

  def transform(self, config, inputs, fields, tokenizer):
    return transform(inputs, tokenizer, answer_vocabulary(config), fields['image'],
                     fields['question'], fields['answer'], fields['answer_ids'],
                     fields['answer_scores'])

  def describe(self, config) -> str:
    return f'{len(answer_vocabulary(config))} answers'

  def submission(self, config, objective, source, tokenizer, fields, split):
    return submission(config, objective, source, tokenizer, fields, split)

  def describe_predictions(self, config, examples, logits, tokenizer):
    answers = answer_vocabulary(config)
    out = []
    for i in range(len(logits)):
      scores = examples['answer_scores'][i]
      truth = answers[int(np.argmax(scores))] if scores.max() > 0 else '(none)'
      out.append(showcase.Example(
          f'#{i}', examples['image'][i],
          [f"question: {tokenizer.decode(examples['text_ids'][i])}", f'truth: {truth}',
           'top answers: ' + base.top_k_text(logits[i], answers, 3)]))
    return out

  def predict_commands(self):
    return (base.PredictCommand('answer', 'visual question answering', _add_arguments,
                                _answer),)


TASK = registry.register(VQATask())

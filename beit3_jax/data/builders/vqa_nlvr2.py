"""TFDS builders of VQAv2 and NLVR2, prepared from their official files in a manual dir.

Nothing is downloaded: the user fetches the official files and points `manual_dir` at them.
Examples are array_record (no TensorFlow needed); images are stored as their original encoded
bytes (`image_bytes`, `image_a_bytes`, `image_b_bytes`) and decoded by the input pipeline.

    builder = prepare('vqav2', manual_dir='/data/vqa', data_dir=None)  # builds once, reuses
    vocab = load_answer_vocabulary(builder)                           # ['yes', 'no', '2', ...]
    source = tfds.data_source('beit3_vqav2/default', split='train',
                              data_dir=paths.tfds_dir(None), download=False)

VQAv2 (`Beit3Vqav2`, 'beit3_vqav2'). Manual dir layout (the names of the official zips' files):

    v2_OpenEnded_mscoco_train2014_questions.json   v2_mscoco_train2014_annotations.json
    v2_OpenEnded_mscoco_val2014_questions.json     v2_mscoco_val2014_annotations.json
    v2_OpenEnded_mscoco_test2015_questions.json
    train2014/COCO_train2014_<12-digit image id>.jpg
    val2014/COCO_val2014_<12-digit image id>.jpg
    test2015/COCO_test2015_<12-digit image id>.jpg

Labels as unilm `beit3/datasets.py` (`VQAv2Dataset`):
- The answer vocabulary: `vqa_answers.build_answer_vocabulary` over the `multiple_choice_answer` of
  all train2014 then val2014 annotations (normalised, kept if >= `min_count` = 9 occurrences:
  3129 answers on VQAv2). It is written as `answer_vocabulary.json` (a JSON list; the class of
  an answer is its index) into the builder's data dir; read it with `load_answer_vocabulary`.
- Per question, `vqa_answers.answer_scores(10 raw answers, vocabulary)`: the soft score of each
  distinct answer that is in the vocabulary, by its annotator count (0.3/0.6/0.9/1.0), in
  first-occurrence order -> `answer_ids` (vocabulary indices) and `answer_scores`. Like unilm the
  raw answer strings are looked up unnormalised (VQAv2's are already normalised); the config
  flag `normalize_answers=True` normalises them first.
- Splits: 'validation' = the questions of `num_holdout_images` (1000, unilm's "rest_val") val2014
  images; 'train' = all train2014 questions, then the val2014 questions of the other images;
  'test' = test2015 questions (no answers: `answers`, `answer_ids`, `answer_scores` empty,
  `multiple_choice_answer` ''; test-dev is a subset of test2015). Training questions without any
  in-vocabulary answer are dropped, as unilm drops them (`drop_unlabelled_train`); validation
  questions are all kept, so that the official accuracy (`vqa_answers.vqa_accuracy` on `answers`)
  covers every held-out question.
- The held-out images (deterministic, independent of file order and of library versions): the
  distinct val2014 image ids that have questions, sorted by the SHA-1 of their decimal string,
  the first `num_holdout_images`. unilm's exact choice of its 1000 images is not reproduced.
- Examples are in file order (train2014 first); `disable_shuffling=True`, so record i is the i-th.

VQAv2 features: image_bytes (bytes), question (text), question_id, image_id (int64),
answers (list of the 10 raw human answers), answer_ids (list of int64), answer_scores (list of
float32), multiple_choice_answer (text).

NLVR2 (`Beit3Nlvr2`, 'beit3_nlvr2'). Manual dir layout (github.com/lil-lab/nlvr `nlvr2/data/`
JSON-lines files, and the images of the official image zips):

    train.json  dev.json  test1.json    (one JSON object a line: identifier, sentence, label,
                                         directory (train only), left_url, right_url, ...)
    images/train/<directory>/<pair id>-img0.png, <pair id>-img1.png
    dev/<pair id>-img0.png ...          (or images/dev/...)
    test1/<pair id>-img0.png ...        (or images/test1/...)

Assumption: the pair id is the identifier without its last '-N' (the sentence index), e.g.
'train-10171-0-0' -> images 'train-10171-0-img0.png' (left = image_a) and '-img1.png' (right =
image_b); train images are in the numbered sub-folder given by the line's `directory` field,
dev and test1 images are flat in `dev/` and `test1/`, either at the top of the manual dir or
under `images/` (both are looked for, `images/<split>` first; train also falls back to
`train/<directory>/`). Splits: train, validation (dev), test (test1, which has public labels).
Features: image_a_bytes, image_b_bytes (bytes), statement (text), label (int: 1 = "True"),
identifier (text).

Errors: a missing file names its path and the expected layout; malformed JSON names file:line;
a malformed record names the file and the record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from beit3_jax.data import local_files, paths
from beit3_jax.data.local_files import AnnotationError, read_json_lines
from beit3_jax.data import vqa_answers

VOCABULARY_FILE = 'answer_vocabulary.json'
_VERSION = tfds.core.Version('1.0.0')
_RELEASE_NOTES = {'1.0.0': 'First release.'}
_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)

VQA_LAYOUT = """Expected VQAv2 manual dir layout:
  v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json
  v2_mscoco_{train2014,val2014}_annotations.json
  train2014/COCO_train2014_<12-digit image id>.jpg
  val2014/COCO_val2014_<12-digit image id>.jpg
  test2015/COCO_test2015_<12-digit image id>.jpg
(from https://visualqa.org/download.html and https://cocodataset.org)"""

NLVR2_LAYOUT = """Expected NLVR2 manual dir layout:
  train.json, dev.json, test1.json  (JSON lines, from github.com/lil-lab/nlvr nlvr2/data)
  images/train/<directory>/<identifier minus its last -N>-img0.png and -img1.png
  dev/<...>-img0.png, -img1.png     (or images/dev/)
  test1/<...>-img0.png, -img1.png   (or images/test1/)"""


def _require_file(path: str, layout: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Missing file {path}.\n{layout}')
  return path


def _read_bytes(path: str, where: str, layout: str) -> bytes:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{where}: missing image {path}.\n{layout}')
  with open(path, 'rb') as f:
    return f.read()


def _load_json(path: str, layout: str):
  _require_file(path, layout)
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise AnnotationError(f'{path}:{e.lineno}: not valid JSON ({e.msg}).') from e


def _field(record, key: str, where: str):
  if not isinstance(record, dict) or key not in record:
    got = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise AnnotationError(f'{where}: no "{key}" field; got {got}.')
  return record[key]


# ------------------------------------------------------------------------------------- VQAv2


@dataclasses.dataclass(eq=False)
class VqaConfig(tfds.core.BuilderConfig):
  """min_count: an answer enters the vocabulary with >= this many majority-answer occurrences;
  num_holdout_images: val2014 images held out as 'validation'; drop_unlabelled_train: drop
  training questions without an in-vocabulary answer; normalize_answers: normalise raw answers
  before the vocabulary lookup (unilm does not)."""
  min_count: int = 9
  num_holdout_images: int = 1000
  drop_unlabelled_train: bool = True
  normalize_answers: bool = False


_VQA_DEFAULT = VqaConfig(name='default', description='As unilm: min_count 9, 1000 held-out '
                         'val images, unlabelled training questions dropped.')


def _questions_file(manual_dir: str, split: str) -> str:
  return os.path.join(manual_dir, f'v2_OpenEnded_mscoco_{split}_questions.json')


def _annotations_file(manual_dir: str, split: str) -> str:
  return os.path.join(manual_dir, f'v2_mscoco_{split}_annotations.json')


def coco_image_path(manual_dir: str, split: str, image_id: int) -> str:
  """`<manual_dir>/<split>/COCO_<split>_<12-digit id>.jpg`, e.g. split 'val2014'."""
  return os.path.join(manual_dir, split, f'COCO_{split}_{int(image_id):012d}.jpg')


def _read_questions(manual_dir: str, split: str) -> list[dict]:
  path = _questions_file(manual_dir, split)
  data = _load_json(path, VQA_LAYOUT)
  questions = _field(data, 'questions', path)
  out = []
  for i, q in enumerate(questions):
    where = f'{path}: questions[{i}]'
    out.append({'question_id': int(_field(q, 'question_id', where)),
                'image_id': int(_field(q, 'image_id', where)),
                'question': str(_field(q, 'question', where)), 'where': where})
  return out


def _read_annotations(manual_dir: str, split: str) -> dict[int, dict]:
  path = _annotations_file(manual_dir, split)
  data = _load_json(path, VQA_LAYOUT)
  out = {}
  for i, a in enumerate(_field(data, 'annotations', path)):
    where = f'{path}: annotations[{i}]'
    answers = _field(a, 'answers', where)
    if not isinstance(answers, list):
      raise AnnotationError(f'{where}: "answers" must be a list.')
    out[int(_field(a, 'question_id', where))] = {
        'multiple_choice_answer': str(_field(a, 'multiple_choice_answer', where)),
        'answers': [str(_field(x, 'answer', f'{where}.answers[{j}]'))
                    for j, x in enumerate(answers)]}
  return out


def holdout_image_ids(image_ids, count: int) -> set[int]:
  """The `count` image ids held out for validation: sorted by SHA-1 of their decimal string."""
  unique = sorted(set(int(i) for i in image_ids))
  ranked = sorted(unique, key=lambda i: hashlib.sha1(str(i).encode()).hexdigest())
  return set(ranked[:max(0, int(count))])


def vocabulary_path(builder_or_dir) -> str:
  """Where the answer vocabulary of a prepared VQAv2 builder (or its data dir) lies."""
  data_dir = getattr(builder_or_dir, 'data_dir', builder_or_dir)
  return os.path.join(os.fspath(data_dir), VOCABULARY_FILE)


def load_answer_vocabulary(builder_or_dir) -> list[str]:
  """The answer vocabulary (a list; class = index) of a prepared VQAv2 builder, given the builder
  or its data dir (`<tfds dir>/beit3_vqav2/<config>/1.0.0`)."""
  path = vocabulary_path(builder_or_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No answer vocabulary at {path}; prepare beit3_vqav2 first.')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Takes the manual dir as a constructor argument (or from the DownloadConfig)."""
  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES
  LAYOUT = ''

  def __init__(self, *, manual_dir: str | None = None, **kwargs):
    self._manual = None if manual_dir is None else os.fspath(manual_dir)
    super().__init__(**kwargs)

  def _manual_root(self, dl_manager) -> str:
    root = self._manual or os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(root):
      raise FileNotFoundError(f'Manual dir {root} does not exist.\n{self.LAYOUT}')
    return root


class Beit3Vqav2(_ManualBuilder):
  """VQAv2 from the official question/annotation JSON files and COCO images (see module doc)."""
  name = 'beit3_vqav2'
  LAYOUT = VQA_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = VQA_LAYOUT
  BUILDER_CONFIGS = [_VQA_DEFAULT]

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            'image_bytes': _BYTES,
            'question': text,
            'question_id': tfds.features.Scalar(np.int64),
            'image_id': tfds.features.Scalar(np.int64),
            'answers': tfds.features.Sequence(text),
            'answer_ids': tfds.features.Sequence(tfds.features.Scalar(np.int64)),
            'answer_scores': tfds.features.Sequence(tfds.features.Scalar(np.float32)),
            'multiple_choice_answer': text,
        }),
        homepage='https://visualqa.org',
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    cfg = self.builder_config
    for f in ([_questions_file(root, s) for s in ('train2014', 'val2014', 'test2015')]
              + [_annotations_file(root, s) for s in ('train2014', 'val2014')]):
      _require_file(f, VQA_LAYOUT)  # fail before reading anything large
    questions = {s: _read_questions(root, s) for s in ('train2014', 'val2014', 'test2015')}
    annotations = {s: _read_annotations(root, s) for s in ('train2014', 'val2014')}
    for s in ('train2014', 'val2014'):
      for q in questions[s]:
        if q['question_id'] not in annotations[s]:
          raise AnnotationError(f'{q["where"]}: question_id {q["question_id"]} has no '
                                f'annotation in {_annotations_file(root, s)}.')
    majority = [annotations[s][q['question_id']]['multiple_choice_answer']
                for s in ('train2014', 'val2014') for q in questions[s]]
    vocab = vqa_answers.build_answer_vocabulary(majority, min_count=cfg.min_count)
    os.makedirs(self.data_dir, exist_ok=True)  # the temporary dir, renamed when done
    with open(os.path.join(self.data_dir, VOCABULARY_FILE), 'w', encoding='utf-8') as f:
      json.dump(vocab, f, ensure_ascii=False)
    held = holdout_image_ids([q['image_id'] for q in questions['val2014']],
                             cfg.num_holdout_images)
    train = ([('train2014', q) for q in questions['train2014']]
             + [('val2014', q) for q in questions['val2014'] if q['image_id'] not in held])
    validation = [('val2014', q) for q in questions['val2014'] if q['image_id'] in held]
    test = [('test2015', q) for q in questions['test2015']]
    index = {a: i for i, a in enumerate(vocab)}
    gens = {'train': self._generate_examples(root, train, annotations, index,
                                             cfg.drop_unlabelled_train),
            'validation': self._generate_examples(root, validation, annotations, index, False),
            'test': self._generate_examples(root, test, annotations, index, False)}
    sizes = {'train': len(train), 'validation': len(validation), 'test': len(test)}
    return {s: g for s, g in gens.items() if sizes[s] > 0}  # TFDS cannot write an empty split

  def _generate_examples(self, root, items, annotations, index, drop_unlabelled
                         ) -> Iterator[tuple[int, dict]]:
    normalize = self.builder_config.normalize_answers
    for split, q in items:
      ann = annotations.get(split, {}).get(q['question_id'])
      answers = [] if ann is None else ann['answers']
      scores = vqa_answers.answer_scores(answers, index, normalize=normalize) if answers else {}
      if drop_unlabelled and not scores:
        continue
      image = coco_image_path(root, split, q['image_id'])
      yield q['question_id'], {
          'image_bytes': _read_bytes(image, q['where'], VQA_LAYOUT),
          'question': q['question'],
          'question_id': q['question_id'],
          'image_id': q['image_id'],
          'answers': answers,
          'answer_ids': [index[a] for a in scores],
          'answer_scores': np.asarray(list(scores.values()), np.float32),
          'multiple_choice_answer': '' if ann is None else ann['multiple_choice_answer'],
      }


# ------------------------------------------------------------------------------------- NLVR2

_NLVR2_FILES = {'train': 'train.json', 'validation': 'dev.json', 'test': 'test1.json'}
_NLVR2_IMAGE_DIRS = {'train': 'train', 'validation': 'dev', 'test': 'test1'}


def read_nlvr2_lines(path: str) -> list[dict]:
  """The records of an NLVR2 JSON-lines file: identifier, sentence, label (0/1), directory
  (or None), where ('file:line')."""
  _require_file(path, NLVR2_LAYOUT)
  out = []
  for where, record in read_json_lines(path):
    identifier = str(_field(record, 'identifier', where))
    label = str(_field(record, 'label', where))
    if label not in ('True', 'False'):
      raise AnnotationError(f'{where}: label must be "True" or "False", got {label!r}.')
    if identifier.count('-') < 1:
      raise AnnotationError(f'{where}: malformed identifier {identifier!r}.')
    directory = record.get('directory')
    out.append({'identifier': identifier, 'sentence': str(_field(record, 'sentence', where)),
                'label': int(label == 'True'),
                'directory': None if directory is None else str(directory), 'where': where})
  return out


def nlvr2_image_paths(manual_dir: str, split: str, record: Mapping) -> tuple[str, str]:
  """(left, right) image paths of an NLVR2 record (split: 'train', 'validation' or 'test');
  the first candidate folder that holds the left image, else the first candidate."""
  pair = record['identifier'].rsplit('-', 1)[0]
  name = _NLVR2_IMAGE_DIRS[split]
  if split == 'train':
    if record.get('directory') is None:
      raise AnnotationError(f'{record["where"]}: a train record needs a "directory" field.')
    folders = [os.path.join(manual_dir, 'images', name, record['directory']),
               os.path.join(manual_dir, name, record['directory'])]
  else:
    folders = [os.path.join(manual_dir, 'images', name), os.path.join(manual_dir, name)]
  folder = next((d for d in folders if os.path.isfile(os.path.join(d, f'{pair}-img0.png'))),
                folders[0])
  return os.path.join(folder, f'{pair}-img0.png'), os.path.join(folder, f'{pair}-img1.png')


class Beit3Nlvr2(_ManualBuilder):
  """NLVR2 from the official JSON-lines files and images (see the module docstring)."""
  name = 'beit3_nlvr2'
  LAYOUT = NLVR2_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = NLVR2_LAYOUT

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            'image_a_bytes': _BYTES,
            'image_b_bytes': _BYTES,
            'statement': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=('False', 'True')),
            'identifier': tfds.features.Text(),
        }),
        homepage='https://lil.nlp.cornell.edu/nlvr/',
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    files = {s: _require_file(os.path.join(root, f), NLVR2_LAYOUT)
             for s, f in _NLVR2_FILES.items()}
    records = {s: read_nlvr2_lines(f) for s, f in files.items()}  # check all before writing
    return {s: self._generate_examples(root, s, r) for s, r in records.items() if r}

  def _generate_examples(self, root, split, records) -> Iterator[tuple[str, dict]]:
    for r in records:
      left, right = nlvr2_image_paths(root, split, r)
      yield r['identifier'], {
          'image_a_bytes': _read_bytes(left, r['where'], NLVR2_LAYOUT),
          'image_b_bytes': _read_bytes(right, r['where'], NLVR2_LAYOUT),
          'statement': r['sentence'], 'label': r['label'], 'identifier': r['identifier']}


# ------------------------------------------------------------------------------------- prepare

BUILDERS = {'vqav2': Beit3Vqav2, 'nlvr2': Beit3Nlvr2}


def make_vqa_config(**config) -> VqaConfig:
  """'default' when nothing differs from unilm, else a config named after what differs, e.g.
  'min_count2_num_holdout_images1'."""
  fields = {f.name for f in dataclasses.fields(VqaConfig)} - {
      f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  unknown = set(config) - fields
  if unknown:
    raise ValueError(f'Unknown VQAv2 config fields {sorted(unknown)}; expected {sorted(fields)}.')
  changed = {k: v for k, v in config.items() if getattr(_VQA_DEFAULT, k) != v}
  if not changed:
    return _VQA_DEFAULT
  name = '_'.join(f'{k}{int(v) if isinstance(v, bool) else v}' for k, v in sorted(changed.items()))
  return dataclasses.replace(_VQA_DEFAULT, name=name, description=f'Custom: {changed}.',
                             **changed)


def prepare(name: str, manual_dir: str, data_dir: str | None = None,
            **config) -> tfds.core.DatasetBuilder:
  """Builds VQAv2 or NLVR2 from `manual_dir` once, into `paths.tfds_dir(data_dir)`, and reuses it.

  Args:
    name: 'vqav2' / 'beit3_vqav2' or 'nlvr2' / 'beit3_nlvr2'.
    manual_dir: the folder with the official files (layouts in the module docstring).
    data_dir: the project data dir (None: the default of `beit3_jax.data.paths`).
    **config: VQAv2 only: `VqaConfig` fields (min_count, num_holdout_images,
      drop_unlabelled_train, normalize_answers); a non-default set gets its own config name.

  Returns:
    The prepared builder: `.as_data_source(split)`, `.data_dir`; for VQAv2
    `load_answer_vocabulary(builder)`.
  """
  key = name[len('beit3_'):] if name.startswith('beit3_') else name
  if key not in BUILDERS:
    raise ValueError(f'Unknown data set {name!r}; expected one of {sorted(BUILDERS)}.')
  if key == 'nlvr2' and config:
    raise ValueError(f'NLVR2 has no config fields; got {sorted(config)}.')
  kwargs = {'config': make_vqa_config(**config)} if key == 'vqav2' else {}
  builder = BUILDERS[key](manual_dir=manual_dir, data_dir=paths.tfds_dir(data_dir),
                          file_format='array_record', **kwargs)
  what = f'{builder.name}/{builder.builder_config.name}' if builder.builder_config else builder.name
  if builder.is_prepared():
    print(f'Reusing {what} at {builder.data_dir}')
    return builder
  seconds = local_files.build_from_manual_dir(builder, manual_dir, what)
  print(f'Built {what} in {seconds:.1f} s')
  return builder

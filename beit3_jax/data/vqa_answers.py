"""VQAv2 answers as the official evaluation and unilm read them, in plain Python.

- `normalize_vqa_answer`, `vqa_question_accuracy`, `vqa_accuracy`: the official VQA evaluation
  script (GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`).
- `vqa_soft_score`, `answer_scores`, `build_answer_vocabulary`: the training targets of unilm
  `beit3/datasets.py` (`VQAv2Dataset`).

Both the VQAv2 data builder and the VQA task use them; `beit3_jax.tasks.metrics` re-exports them
beside the other tasks' metrics.
"""

import collections
import re
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np


# Characters the official script treats as punctuation (the period has a rule of its own).
_VQA_PUNCT = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<',
              '@', '`', ',', '?', '!')
_DIGIT_COMMA_DIGIT = re.compile(r'\d,\d')
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a look-*ahead* for the text
# "<=digit", which can never match at a '.', so the pattern removes every period that is not
# followed by a digit. The official call also passes re.UNICODE as the `count` argument: at most
# 32 periods are removed per answer. Both are reproduced.
_VQA_PERIOD = re.compile(r'\.(?!\d)')
_VQA_PERIOD_MAX_REMOVALS = 32
_VQA_NUMBER_WORDS = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
    'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_VQA_ARTICLES = frozenset({'a', 'an', 'the'})

# The official contractions table as "written-form canonical-form" pairs. It is data, copied
# entry by entry, quirks included: a few keys start with a capital letter and so never match
# (the script looks them up after lower-casing), "somebody'd" maps to "somebodyd", and several
# entries map a word to itself.
_VQA_CONTRACTION_PAIRS = """
aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't  couldn'tve couldn't've
couldnt've couldn't've  didnt didn't  doesnt doesn't  dont don't  hadnt hadn't  hadnt've hadn't've
hadn'tve hadn't've  hasnt hasn't  havent haven't  hed he'd  hed've he'd've  he'dve he'd've
hes he's  howd how'd  howll how'll  hows how's  Id've I'd've  I'dve I'd've  Im I'm  Ive I've
isnt isn't  itd it'd  itd've it'd've  it'dve it'd've  itll it'll  let's let's  maam ma'am
mightnt mightn't  mightnt've mightn't've  mightn'tve mightn't've  mightve might've
mustnt mustn't  mustve must've  neednt needn't  notve not've  oclock o'clock  oughtnt oughtn't
ow's'at 'ow's'at  'ows'at 'ow's'at  'ow'sat 'ow's'at  shant shan't  shed've she'd've
she'dve she'd've  she's she's  shouldve should've  shouldnt shouldn't  shouldnt've shouldn't've
shouldn'tve shouldn't've  somebody'd somebodyd  somebodyd've somebody'd've
somebody'dve somebody'd've  somebodyll somebody'll  somebodys somebody's  someoned someone'd
someoned've someone'd've  someone'dve someone'd've  someonell someone'll  someones someone's
somethingd something'd  somethingd've something'd've  something'dve something'd've
somethingll something'll  thats that's  thered there'd  thered've there'd've
there'dve there'd've  therere there're  theres there's  theyd they'd  theyd've they'd've
they'dve they'd've  theyll they'll  theyre they're  theyve they've  twas 'twas  wasnt wasn't
wed've we'd've  we'dve we'd've  weve we've  werent weren't  whatll what'll  whatre what're
whats what's  whatve what've  whens when's  whered where'd  wheres where's  whereve where've
whod who'd  whod've who'd've  who'dve who'd've  wholl who'll  whos who's  whove who've
whyll why'll  whyre why're  whys why's  wont won't  wouldve would've  wouldnt wouldn't
wouldnt've wouldn't've  wouldn'tve wouldn't've  yall y'all  yall'll y'all'll  y'allll y'all'll
yall'd've y'all'd've  y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd  youd've you'd've
you'dve you'd've  youll you'll  youre you're  youve you've
"""
_VQA_CONTRACTIONS = dict(zip(_VQA_CONTRACTION_PAIRS.split()[0::2],
                             _VQA_CONTRACTION_PAIRS.split()[1::2]))


def _vqa_process_punctuation(text: str) -> str:
  """The official `processPunctuation`.

  Each punctuation character is deleted when it touches a space somewhere in the text (e.g.
  "red, white") or when the text has a digit-comma-digit anywhere (e.g. "1,000": then *all*
  punctuation is deleted); otherwise it becomes a space ("t-shirt" -> "t shirt"). The decisions
  look at the original text. Then periods not followed by a digit are removed ("3.5" is kept).
  """
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for p in _VQA_PUNCT:
    if delete_all or (p + ' ') in text or (' ' + p) in text:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  return _VQA_PERIOD.sub('', out, count=_VQA_PERIOD_MAX_REMOVALS)


def _vqa_process_digits_articles(text: str) -> str:
  """The official `processDigitArticle`: lower-case, split on whitespace, number words -> digits,
  drop a/an/the, then map contractions written without apostrophe ("dont" -> "don't")."""
  words = []
  for word in text.lower().split():
    word = _VQA_NUMBER_WORDS.get(word, word)
    if word not in _VQA_ARTICLES:
      words.append(_VQA_CONTRACTIONS.get(word, word))
  return ' '.join(words)


def normalize_vqa_answer(answer: str) -> str:
  """Normalise a predicted answer as the official VQA evaluation does.

  Steps: newlines and tabs -> spaces, strip; punctuation (see `_vqa_process_punctuation`:
  deleted or turned into spaces, the digit-comma-digit rule, periods not followed by a digit
  removed); lower-case; number words zero..ten and "none" -> digits; articles a/an/the removed;
  the contractions table ("dont" -> "don't"); single spaces. Examples: "Two" -> "2",
  "The dog." -> "dog", "1,000" -> "1000", "t-shirt" -> "t shirt", "3.5" -> "3.5".
  """
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return _vqa_process_digits_articles(_vqa_process_punctuation(answer))


def _normalize_vqa_word(answer: str) -> str:
  """unilm's `glossary.normalize_word` (from ViLT), used for the answer vocabulary: the official
  processing without the newline/tab step (its trailing comma removal is a no-op here)."""
  return _vqa_process_digits_articles(_vqa_process_punctuation(answer))


def vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Official VQA accuracy of one prediction against the human answers (10 in VQAv2), in [0, 1].

  The prediction is normalised with `normalize_vqa_answer`. The human answers are used as the
  official script uses them: only when they are not all identical, each gets the punctuation
  step (`_vqa_process_punctuation`), nothing else. (VQAv2 annotations are already normalised,
  so this matters only for hand-made answers: ["yes."] * 10 matches nothing.) For each of the n
  leave-one-out subsets, acc = min(1, #matches / 3); the result is their mean. With 10 answers
  of which c equal the prediction: c = 0, 1, 2, 3, >= 4 -> 0, 0.3, 0.6, 0.9, 1.0.
  """
  answers = list(answers)
  if not answers:
    raise ValueError('need at least one human answer')
  pred = normalize_vqa_answer(prediction)
  if len(set(answers)) > 1:
    answers = [_vqa_process_punctuation(a) for a in answers]
  matches = sum(a == pred for a in answers)
  # Leaving out a matching answer leaves matches - 1 matches; leaving out another leaves matches.
  return sum(min(1.0, (matches - (a == pred)) / 3.0) for a in answers) / len(answers)


def vqa_accuracy(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> float:
  """Official VQAv2 accuracy, in [0, 1]: the mean over questions of `vqa_question_accuracy`.

  Args:
    predictions: one answer string per question.
    gt_answers: per question, its human answers (10 in VQAv2), raw strings as in the annotation
      file's `answers[*].answer`.

  The official script prints round(100 * this, 2).
  """
  if len(predictions) != len(gt_answers) or not predictions:
    raise ValueError(f'{len(predictions)} predictions for {len(gt_answers)} questions')
  return float(np.mean([vqa_question_accuracy(p, a) for p, a in zip(predictions, gt_answers)]))


def vqa_soft_score(count: int) -> float:
  """Soft training target of an answer given by `count` annotators (unilm `get_score`):
  0 -> 0.0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0.

  With 10 annotators these are exactly the official accuracies of answering that answer.
  """
  if count < 0:
    raise ValueError(f'count must be >= 0, got {count}')
  return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def answer_scores(answers: Iterable[str], vocabulary: Optional[Iterable[str]] = None,
                  normalize: bool = False) -> Dict[str, float]:
  """Soft scores of one question's human answers, as unilm builds its VQAv2 targets.

  Args:
    answers: the question's human answers (10 in VQAv2).
    vocabulary: if given, answers not in it are dropped (unilm keeps only answers with a class).
    normalize: apply the vocabulary's normalisation (`build_answer_vocabulary`) to each answer
      before counting. unilm does **not**: it counts the raw annotation strings and looks them up
      in the vocabulary of normalised answers. VQAv2 annotations are already normalised, so the
      two agree on that data; the default reproduces unilm.

  Returns:
    {answer: vqa_soft_score(number of annotators who gave it)} in first-occurrence order.
    A question whose dict is empty has no target (unilm drops such training questions).
  """
  answers = [_normalize_vqa_word(a) if normalize else a for a in answers]
  vocab = None if vocabulary is None else set(vocabulary)
  counts = collections.Counter(answers)
  return {a: vqa_soft_score(c) for a, c in counts.items() if vocab is None or a in vocab}


def build_answer_vocabulary(majority_answers: Iterable[str], min_count: int = 9) -> List[str]:
  """The VQAv2 answer vocabulary as unilm builds it (3129 answers on VQAv2 train+val).

  Args:
    majority_answers: one answer per question: each question's `multiple_choice_answer` (the most
      frequent human answer), over the train and then the val annotations.
    min_count: keep answers that occur at least this often (unilm: 9).

  Returns:
    The answers, normalised like unilm's `glossary.normalize_word` (the official VQA processing
    of `normalize_vqa_answer`), that occur >= min_count times, in order of first occurrence;
    the class index of an answer is its position in this list (unilm's `answer2label.txt`).
  """
  counts = collections.Counter(_normalize_vqa_word(a) for a in majority_answers)
  return [a for a, c in counts.items() if c >= min_count]

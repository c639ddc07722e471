"""Evaluation metrics of BEiT-3's downstream tasks, in plain NumPy / Python (no JAX).

Units: every accuracy and recall here is a **fraction in [0, 1]** (papers and the unilm logs print
them x100). BLEU is a fraction in [0, 1] as well. CIDEr-D is on coco-caption's own scale, which
includes its x10 factor: papers print it x100, so 1.476 here is the "147.6" of a paper.

What each function follows:
- ImageNet: `topk_accuracy` (top-k accuracy; ties count against the label).
- NLVR2: `binary_accuracy` (plain accuracy).
- VQAv2: `normalize_vqa_answer`, `vqa_question_accuracy`, `vqa_accuracy`: the official VQA
  evaluation script (GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`).
- VQAv2 training targets: `vqa_soft_score`, `answer_scores`, `build_answer_vocabulary`: unilm
  `beit3/datasets.py` (`VQAv2Dataset`); `vqa_soft_target_score`: the score unilm logs on its
  held-out val split (`utils.VQAScore`).
- COCO / Flickr30k retrieval: `retrieval_recall` (R@k; an image query is right if any of its
  captions is in its top k).
- COCO captioning: `tokenize_caption` (approximates coco-caption's PTBTokenizer), `corpus_bleu`,
  `bleu4`, `cider_d_scores`, `cider_d`: coco-caption (`pycocoevalcap`) `Bleu(4)` and `Cider()`.

The functions are re-implemented from the metrics' definitions and the behaviour of the named
scripts, including their documented quirks (listed in each docstring), so that the numbers agree
with those scripts; tests/test_task_metrics.py checks BLEU and CIDEr-D against pycocoevalcap.
"""

import collections
import math
import re
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

__all__ = [
    'topk_accuracy', 'binary_accuracy',
    'normalize_vqa_answer', 'vqa_question_accuracy', 'vqa_accuracy', 'vqa_soft_score',
    'answer_scores', 'build_answer_vocabulary', 'vqa_soft_target_score',
    'retrieval_recall',
    'tokenize_caption', 'corpus_bleu', 'bleu4', 'cider_d_scores', 'cider_d',
]


def _rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per row, how many *other* entries score >= the target entry's score (0 = ranked first).

  Ties count against the target (pessimistic), so a collapsed model whose scores are all equal
  gets no credit; with continuous scores ties do not occur and this is the usual top-k rank.
  A NaN target ranks last.
  """
  ge = (scores >= target[:, None]).sum(axis=1) - 1
  return np.where(np.isnan(target), scores.shape[1], ge)


# ------------------------------------------------------------------------------------------------
# Classification (ImageNet) and NLVR2.
# ------------------------------------------------------------------------------------------------

def topk_accuracy(logits, labels, ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
  """Top-k accuracy for each k in ks, as fractions in [0, 1].

  Args:
    logits: (N, C) scores (logits or probabilities; only their order matters).
    labels: (N,) integer class indices.
    ks: the k values.

  Returns:
    {k: fraction of examples whose label is among the k highest scores}. A label counts as in
    the top k when fewer than k other classes score >= it: ties count against the label (an
    arg-max / top-k op would break ties by index instead). k >= C gives 1.0.
  """
  logits = np.asarray(logits, dtype=np.float64)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
    raise ValueError(f'need logits (N, C) and labels (N,), N > 0; got {logits.shape}, '
                     f'{labels.shape}')
  if labels.min() < 0 or labels.max() >= logits.shape[1]:
    raise ValueError('labels out of range')
  rank = _rank_of(logits, logits[np.arange(logits.shape[0]), labels])
  out = {}
  for k in ks:
    if int(k) < 1:
      raise ValueError(f'k must be >= 1, got {k}')
    out[int(k)] = float(np.mean(rank < int(k)))
  return out


def binary_accuracy(logits, labels) -> float:
  """Accuracy of a two-way classifier (NLVR2: label 1 = the statement is true), in [0, 1].

  Args:
    logits: (N, 2) class scores (the unilm NLVR2 head's output; prediction = arg-max, a tie
      predicts 0), or (N,) / (N, 1) single logits (prediction = logit > 0).
    labels: (N,) 0/1 (or bool) labels.
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  if logits.ndim == 2 and logits.shape[1] == 2:
    pred = np.argmax(logits, axis=1)
  elif logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
    pred = (logits.reshape(-1) > 0).astype(np.int64)
  else:
    raise ValueError(f'logits must be (N, 2), (N, 1) or (N,); got {logits.shape}')
  if pred.shape != labels.shape or labels.size == 0:
    raise ValueError(f'{pred.shape[0]} predictions for {labels.shape[0]} labels')
  return float(np.mean(pred == labels))


# ------------------------------------------------------------------------------------------------
# VQAv2.
# ------------------------------------------------------------------------------------------------

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


def vqa_soft_target_score(logits, targets) -> float:
  """The VQA score unilm logs during fine-tuning (`utils.VQAScore`), in [0, 1]: the mean over
  questions of the soft target (`answer_scores`) of the arg-max class.

  Args:
    logits: (N, A) scores over the answer vocabulary.
    targets: (N, A) soft targets (0 for answers no annotator gave).

  Approximates `vqa_accuracy` on questions whose answers are all in the vocabulary; it is 0 for
  a correct answer that is outside the vocabulary.
  """
  logits = np.asarray(logits)
  targets = np.asarray(targets, dtype=np.float64)
  if logits.ndim != 2 or logits.shape != targets.shape or logits.shape[0] == 0:
    raise ValueError(f'need logits and targets of one (N, A) shape; got {logits.shape}, '
                     f'{targets.shape}')
  best = np.argmax(logits, axis=1)
  return float(np.mean(targets[np.arange(targets.shape[0]), best]))


# ------------------------------------------------------------------------------------------------
# Image-text retrieval.
# ------------------------------------------------------------------------------------------------

def retrieval_recall(similarity, text_to_image, ks: Sequence[int] = (1, 5, 10),
                     chunk_size: int = 1024) -> Dict[str, float]:
  """Recall@k of image-to-text and text-to-image retrieval (COCO 5k / Flickr30k 1k), in [0, 1].

  Args:
    similarity: (N_images, N_texts) scores, higher = more similar (e.g. cosine similarities).
    text_to_image: (N_texts,) the index of each text's image (COCO/Flickr30k: 5 texts per image).
      Every image must have at least one text.
    ks: the k values.
    chunk_size: rows/columns processed at a time (bounds the temporary memory).

  Returns:
    {'i2t_r{k}': ..., 't2i_r{k}': ... for k in ks, 'r_mean': mean of all of them}. An image
    query is correct at k if any of its texts is among its k most similar texts (text
    retrieval, "TR@k"); a text query is correct at k if its image is among its k most similar
    images ("IR@k"). r_mean is unilm's "average_score" (used to select checkpoints). Ties count
    against the query: a candidate that scores >= the (best) correct one is ranked before it, so
    constant similarities give 0 (a top-k op would break ties by index instead).
  """
  sim = np.asarray(similarity, dtype=np.float64)
  t2i = np.asarray(text_to_image).astype(np.int64).reshape(-1)
  n_img, n_txt = sim.shape if sim.ndim == 2 else (None, None)
  if sim.ndim != 2 or t2i.shape != (n_txt,) or n_img == 0 or n_txt == 0:
    raise ValueError(f'need similarity (N_images, N_texts) and text_to_image (N_texts,); got '
                     f'{sim.shape}, {t2i.shape}')
  if t2i.min() < 0 or t2i.max() >= n_img:
    raise ValueError('text_to_image out of range')
  n_pos = np.bincount(t2i, minlength=n_img)
  if (n_pos == 0).any():
    raise ValueError(f'images without a text: {np.flatnonzero(n_pos == 0)[:10].tolist()}')

  pos_score = sim[t2i, np.arange(n_txt)]  # each text's score with its own image
  # Image -> text: the best-scoring own text, and how many other texts score >= it.
  best_pos = np.full(n_img, -np.inf)
  np.maximum.at(best_pos, t2i, np.where(np.isnan(pos_score), -np.inf, pos_score))
  pos_at_best = np.bincount(t2i[pos_score >= best_pos[t2i]], minlength=n_img)
  i2t_rank = np.empty(n_img, dtype=np.int64)
  for s in range(0, n_img, chunk_size):
    rows = sim[s:s + chunk_size]
    ge = (rows >= best_pos[s:s + chunk_size, None]).sum(axis=1)
    i2t_rank[s:s + chunk_size] = ge - pos_at_best[s:s + chunk_size]
  i2t_rank = np.where(np.isneginf(best_pos), n_txt, i2t_rank)
  # Text -> image: how many other images score >= the own image.
  t2i_rank = np.empty(n_txt, dtype=np.int64)
  for s in range(0, n_txt, chunk_size):
    t2i_rank[s:s + chunk_size] = _rank_of(sim[:, s:s + chunk_size].T, pos_score[s:s + chunk_size])

  out = {}
  for k in ks:
    out[f'i2t_r{int(k)}'] = float(np.mean(i2t_rank < int(k)))
  for k in ks:
    out[f't2i_r{int(k)}'] = float(np.mean(t2i_rank < int(k)))
  out['r_mean'] = float(np.mean(list(out.values())))
  return out


# ------------------------------------------------------------------------------------------------
# Captioning: tokenisation, BLEU, CIDEr-D.
# ------------------------------------------------------------------------------------------------

# Tokens that coco-caption's PTBTokenizer wrapper deletes after tokenising (lower-cased; -lrb- etc.
# are PTB's names for brackets), plus the raw characters our regex emits for them.
_CAPTION_DROP = frozenset({
    "''", "'", '``', '`', '-lrb-', '-rrb-', '-lcb-', '-rcb-', '.', '?', '!', ',', ':', '-', '--',
    '...', ';', '(', ')', '{', '}', '[', ']', '"', '\u201c', '\u201d', '\u2018', '\u2013',
    '\u2014', '\u2026'})
_CAPTION_CLITIC_NT = re.compile(r"(?<=\w)n't\b")
_CAPTION_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b")
_CAPTION_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"      # clitics split off above: "do n't", "dog 's"
    r"|\d+(?:,\d{3})+(?:\.\d+)?"       # 1,000 and 1,000.5 stay one token
    r"|\w+(?:[-.'&/]\w+)*"             # words, with inner hyphens, periods, apostrophes: t-shirt
    r"|\S")                            # any other single character
_CAPTION_SPACES = re.compile(r'\s+')


def tokenize_caption(text: str) -> str:
  """Lower-case and tokenise a caption roughly as coco-caption's PTBTokenizer does; returns the
  tokens joined by single spaces (the input format of `corpus_bleu` and `cider_d`).

  Like coco-caption (Stanford PTBTokenizer with -lowerCase, then deleting punctuation tokens):
  lower-cases, splits off "n't" and 's 're 've 'll 'd 'm ("don't" -> "do n't", "dog's" ->
  "dog 's"), keeps hyphenated words and numbers with commas/decimals whole, deletes punctuation
  tokens (. , ? ! : ; - -- ... quotes, brackets), keeps other symbols (& $ % # ...) as tokens.

  Differences from the Java tokenizer (no Java here), all rare in captions: no abbreviation list
  (PTB keeps "mr." / "e.g." whole; here the trailing period is dropped: "mr", "e.g"); square
  brackets are dropped (PTB turns them into "-lsb-"/"-rsb-", which coco-caption keeps); no PTB
  normalisations beyond the quotes and dashes dropped (e.g. "&amp;", fractions, British
  spellings are left as they are); inner "/", "&", "." and "'" keep a word whole ("and/or",
  "at&t"), which approximates PTB's token rules.
  """
  text = text.lower().replace('\u2019', "'")
  text = _CAPTION_CLITIC_NT.sub(" n't", text)
  text = _CAPTION_CLITIC.sub(r" '\1", text)
  tokens = [t for t in _CAPTION_TOKEN.findall(_CAPTION_SPACES.sub(' ', text))
            if t not in _CAPTION_DROP]
  return ' '.join(tokens)


def _ngram_counts(tokens: Sequence[str], max_n: int) -> collections.Counter:
  counts = collections.Counter()
  for n in range(1, max_n + 1):
    for i in range(len(tokens) - n + 1):
      counts[tuple(tokens[i:i + n])] += 1
  return counts


def _check_corpus(hypotheses, references):
  if len(hypotheses) != len(references) or not hypotheses:
    raise ValueError(f'{len(hypotheses)} hypotheses for {len(references)} reference sets')
  for refs in references:
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError('each item needs a non-empty list of reference strings')


# coco-caption's smoothing constants: precision = (clipped matches + 1e-15) / (n-grams + 1e-9),
# length ratio = (hypothesis length + 1e-15) / (reference length + 1e-9).
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                max_n: int = 4) -> List[float]:
  """Corpus-level BLEU-1..BLEU-max_n as coco-caption's `Bleu(4)` computes them, fractions in [0, 1].

  Args:
    hypotheses: one tokenised caption per image (tokens separated by whitespace).
    references: per image, its tokenised reference captions (>= 1).
    max_n: the largest n-gram order.

  Definition (Papineni et al. 2002, corpus level): modified n-gram precision p_n = sum over
  images of hypothesis n-gram counts clipped to their maximum count in any one reference, over
  the number of hypothesis n-grams; BLEU-n = (p_1 ... p_n)^(1/n) * BP with brevity penalty
  BP = exp(1 - r/c) if c < r else 1, where c = total hypothesis length and r = sum over images
  of the "closest" reference length (the reference length nearest to the hypothesis's; on a tie
  the shorter one). coco-caption's smoothing constants are included, so a precision with no
  match gives a tiny positive score rather than 0.
  """
  _check_corpus(hypotheses, references)
  guess = [0] * max_n
  correct = [0] * max_n
  hyp_len = ref_len = 0
  for hyp, refs in zip(hypotheses, references):
    tokens = hyp.split()
    clip: Dict[tuple, int] = {}
    lengths = []
    for ref in refs:
      ref_tokens = ref.split()
      lengths.append(len(ref_tokens))
      for gram, c in _ngram_counts(ref_tokens, max_n).items():
        clip[gram] = max(clip.get(gram, 0), c)
    hyp_len += len(tokens)
    ref_len += min(lengths, key=lambda l: (abs(l - len(tokens)), l))
    for n in range(1, max_n + 1):
      guess[n - 1] += max(0, len(tokens) - n + 1)
    for gram, c in _ngram_counts(tokens, max_n).items():
      correct[len(gram) - 1] += min(c, clip.get(gram, 0))

  ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
  brevity = math.exp(1.0 - 1.0 / ratio) if ratio < 1.0 else 1.0
  scores = []
  product = 1.0
  for n in range(max_n):
    product *= (correct[n] + _BLEU_TINY) / (guess[n] + _BLEU_SMALL)
    scores.append(product ** (1.0 / (n + 1)) * brevity)
  return scores


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Corpus BLEU-4 (coco-caption's "Bleu_4"), a fraction in [0, 1]; see `corpus_bleu`."""
  return corpus_bleu(hypotheses, references, max_n=4)[3]


def cider_d_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
                   sigma: float = 6.0) -> np.ndarray:
  """Per-image CIDEr-D as coco-caption's `Cider()` computes it (its scale: x10 included).

  Args:
    hypotheses: one tokenised caption per image (tokens separated by whitespace).
    references: per image, its tokenised reference captions (>= 1).
    n: n-gram orders 1..n.
    sigma: the Gaussian length penalty's standard deviation.

  Definition (Vedantam et al. 2015, CIDEr-D): each sentence becomes, per order k, a TF-IDF vector
  over its k-grams: term count * (log N - log max(1, df)), where N is the number of images in
  the evaluated corpus and df the number of images whose references contain the n-gram (so the
  IDF comes from this corpus's references, and an n-gram no reference has gets log N). Per
  reference and order, the score is sum_g min(h_g, r_g) * r_g / (|h| |r|) (the clipped cosine;
  0 if either vector is zero), times exp(-(l_h - l_r)^2 / (2 sigma^2)). The image's score is
  10 x the mean over orders of the mean over references. As in coco-caption, the length l is
  the number of *bigrams* (words - 1, 0 for an empty sentence), which only differs from the word
  count difference when a sentence is empty. A one-image corpus gives 0 (log 1 = 0).
  """
  _check_corpus(hypotheses, references)
  hyp_counts = [_ngram_counts(h.split(), n) for h in hypotheses]
  ref_counts = [[_ngram_counts(r.split(), n) for r in refs] for refs in references]
  doc_freq = collections.Counter()
  for refs in ref_counts:
    doc_freq.update(set().union(*refs))
  log_n = math.log(len(references))

  def tfidf(counts):
    weights = [{} for _ in range(n)]
    norms = [0.0] * n
    length = 0
    for gram, tf in counts.items():
      order = len(gram) - 1
      w = tf * (log_n - math.log(max(1.0, doc_freq.get(gram, 0))))
      weights[order][gram] = w
      norms[order] += w * w
      if order == 1:
        length += tf
    return weights, [math.sqrt(x) for x in norms], length

  scores = np.zeros(len(hypotheses))
  for i, (hc, refs) in enumerate(zip(hyp_counts, ref_counts)):
    h_w, h_norm, h_len = tfidf(hc)
    total = 0.0
    for rc in refs:
      r_w, r_norm, r_len = tfidf(rc)
      penalty = math.exp(-float(h_len - r_len) ** 2 / (2.0 * sigma ** 2))
      for order in range(n):
        if h_norm[order] == 0.0 or r_norm[order] == 0.0:
          continue
        dot = sum(min(w, r_w[order].get(g, 0.0)) * r_w[order].get(g, 0.0)
                  for g, w in h_w[order].items())
        total += dot / (h_norm[order] * r_norm[order]) * penalty
    scores[i] = 10.0 * total / n / len(refs)
  return scores


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
  """Corpus CIDEr-D (coco-caption's "CIDEr"): the mean of `cider_d_scores`, on coco-caption's
  scale (x10 included; papers print x100 of it: 1.476 -> "147.6")."""
  return float(np.mean(cider_d_scores(hypotheses, references, n=n, sigma=sigma)))

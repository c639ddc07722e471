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
from typing import Dict, List, Sequence

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

# The answer normalisation, accuracy and soft targets live with the data (the VQAv2 builder
# uses them too).
from beit3_jax.data.vqa_answers import (answer_scores, build_answer_vocabulary,  # noqa: E402
                                        normalize_vqa_answer, vqa_accuracy,
                                        vqa_question_accuracy, vqa_soft_score)


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

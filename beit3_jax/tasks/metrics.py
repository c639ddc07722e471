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
- COCO captioning: `ptb_tokenize` (coco-caption's PTBTokenizer, in Python or through its Java
  jar), `corpus_bleu`, `bleu4`, `cider_d_scores`, `cider_d`: coco-caption (`pycocoevalcap`)
  `Bleu(4)` and `Cider()` (which is CIDEr-D); `coco_caption_scores`: tokenise, then both.

The functions are re-implemented from the metrics' definitions and the behaviour of the named
scripts, including their documented quirks (listed in each docstring), so that the numbers agree
with those scripts; tests/test_task_metrics.py checks BLEU and CIDEr-D against pycocoevalcap.
"""

import collections
import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List, Sequence

import numpy as np

__all__ = [
    'topk_accuracy', 'binary_accuracy',
    'normalize_vqa_answer', 'vqa_question_accuracy', 'vqa_accuracy', 'vqa_soft_score',
    'answer_scores', 'build_answer_vocabulary', 'vqa_soft_target_score',
    'retrieval_recall',
    'ptb_tokenize', 'coco_caption_scores', 'corpus_bleu', 'bleu4', 'cider_d_scores', 'cider_d',
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

# The PTB lexer, re-implemented from the behaviour of Stanford CoreNLP 3.4.1's PTBTokenizer
# (the jar pycocoevalcap runs): ordered token rules; at each position the longest match wins
# (a rule's trailing context counts towards its length) and ties go to the earlier rule, as in
# its JFlex scanner. An action returns the token, None (delete) or False (rule does not apply).
_LET = '[^\\W\\d_\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff]'
_ALNUM = f'(?:{_LET}|\\d)'
_WORD = f"(?:{_LET}|&[aeiouAEIOU](?i:acute|grave|uml);|[\u00ad\u0300-\u036f])+"
_APOS = "(?:['\u0092\u2019]|&(?i:apos);)"
_APOSX = "(?:['\u0091\u0092\u2018\u2019\u201b]|&(?i:apos);)"
_REDAUX = _APOS + '(?i:[msd]|re|ve|ll)'
_SWORD = '[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*'
_SREDAUX = '(?i:n)' + _APOSX + '(?i:t)'
_HYPHEN = '[-_\u058a\u2010\u2011]'
_ACRO = ('(?:[A-Za-z](?:\\.[A-Za-z])+|(?i:canada|sino|korean|eu|japan|non)-(?i:u\\.s)'
         '|(?i:u\\.s\\.-(?:u\\.k|u\\.s\\.s\\.r)))')
_SPACE = '[ \t\u00a0\u2000-\u200a\u3000]'
_NL = '[\r\n\u2028\u2029\u000b\u000c\u0085]'
_THING_PART = f'(?:[dDoOlL]{_APOSX}{_ALNUM})?{_ALNUM}+'
_QUOTE_CHARS = ('`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a'
                '\u00ab\u00bb')
_MISC = ('\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7'
         '\u2020-\u2023\u2032-\u2038\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f'
         '\u2190-\u21ff\u2200-\u22ff\u2300-\u23ff\u2600-\u27bf\u3012\u30fb\uff01-\uff0f'
         '\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65')

_ABBREV_ANY = frozenset((
    'jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri '
    'ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla '
    'penn tenn va vt wis wisc wyo inc co cos corp ltd plc rt bancorp dept bhd assn univ intl sys '
    'invt elec natl ph tel est ext sq ft jr sr bros blvd rd esq etc al seq mr mrs ms dr drs prof '
    'profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj sgt cpl pvt mt capt '
    'st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det vs alex wm jos cie cf treas'
).split())
_ABBREV_UPPER_FIRST = frozenset('az ark del ill la mass miss ore pa tex wash'.split())
_ABBREV_LOWER_REST = re.compile('[Pp]p?t[ye]s?|[Mm][ft]g')


def _latex_quotes(s, left):
  if left:
    s = re.sub("(?i:&apos;)|'", '`', s)
    s = re.sub('"|(?i:&quot;)', '``', s)
  else:
    s = re.sub("(?i:&apos;)|'", "'", s)
    s = re.sub('"|(?i:&quot;)', "''", s)
  s = re.sub('[\u0091\u2018\u201b\u2039]', '`', s)
  s = re.sub('[\u0092\u2019\u203a]', "'", s)
  s = re.sub('[\u0093\u201c\u00ab]', '``', s)
  return re.sub('[\u0094\u201d\u00bb]', "''", s)


def _abbrev(m):
  word = m.group(1)
  low = word.lower()
  if (len(word) == 1 or low in _ABBREV_ANY
      or (low in _ABBREV_UPPER_FIRST and word[0].isupper())
      or _ABBREV_LOWER_REST.fullmatch(word)):
    return m.group(0)
  return False  # not this rule


def _hyphens(m):
  t = m.group(0)
  return '--' if 3 <= len(t) <= 4 else t


def _currency(m):
  t = m.group(0)
  return {'\u00a2': 'cents', '\u00a3': '#', '\u0080': '$', '\u00a4': '$', '\u20a0': '$',
          '\u20ac': '$'}.get(t, t)


_FRACTIONS = {'\u00bc': '1/4', '\u00bd': '1/2', '\u00be': '3/4', '\u2153': '1/3',
              '\u2154': '2/3'}

_KEEP = lambda m: m.group(0)
_DROP = lambda m: None

# (main regex, lookahead regex or None, action). Longest match (main + lookahead) wins; ties go
# to the earlier rule.
_RULES = [
    ('(?i:can)', '(?i:not)', _KEEP),
    ('(?i:gon|wan)', '(?i:na)', _KEEP),
    ('(?i:got)', '(?i:ta)', _KEEP),
    ('(?i:lem|gim)', '(?i:me)', _KEEP),
    ('<\\/?[A-Za-z!][^>\n]*>', None, _KEEP),
    ('&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]', None, lambda m: '--'),
    ('&(?i:amp);', None, lambda m: '&'),
    ('&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);', None, _KEEP),
    (_WORD, _REDAUX, lambda m: m.group(0).replace('\u00ad', '')),
    (_SWORD, _SREDAUX, lambda m: m.group(0).replace('\u00ad', '')),
    (_WORD, None, lambda m: m.group(0).replace('\u00ad', '')),
    # words with apostrophes inside that stay whole
    (f'{_APOS}(?i:n){_APOS}?', None, _KEEP),
    (f'[lLdDjJ]{_APOS}', None, _KEEP),
    (f"(?i:dunkin|somethin|ol){_APOS}", None, _KEEP),
    (f'{_APOS}(?i:em)', None, _KEEP),
    (f'[A-HJ-XZn]{_APOSX}{_LET}{{2,}}', None, _KEEP),
    (f'{_APOS}[2-9]0(?i:s)', None, _KEEP),
    (f'{_APOS}(?i:till?)', None, _KEEP),
    (f'{_LET}{_LET}+(?<=[aeiouyAEIOUY]){_APOSX}[aeiouA-Z]{_LET}*', None, _KEEP),
    (f'{_APOS}(?i:cause)', None, _KEEP),
    ("(?i:cont'd\\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", None, _KEEP),
    (f'{_APOS}(?i:t)', '(?i:is|was)', _KEEP),
    (f'[yY]{_APOS}', _LET, _KEEP),
    ('(?i:https?)://[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},-]', None, _KEEP),
    ('(?:(?:(?i:www)\\.(?:[^ \t\n\f\r"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4})'
     '|(?:(?:[^ \t\n\f\r"`\'<>|.!?(){},-_$]+\\.)+(?i:com|net|org|edu)))'
     '(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?', None, _KEEP),
    ('[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0]*@(?:[^ \t\n\f\r"<>|().\u00a0]+\\.)+[a-zA-Z]{2,4}',
     None, _KEEP),
    (_REDAUX, '[^A-Za-z]', lambda m: _latex_quotes(m.group(0), False)),
    (_SREDAUX, None, lambda m: _latex_quotes(m.group(0), False)),
    ('\\d{1,2}[-/]\\d{1,2}[-/]\\d{2,4}', None, _KEEP),
    ('[-+]?(?:\\d*(?:[.:,\u00ad\u066b\u066c]\\d+)+|\\d+)', None,
     lambda m: m.group(0).replace('\u00ad', '')),
    ('[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)',
     None, _KEEP),
    ('(?:\\d{1,4}[- \u00a0])?\\d{1,4}(?:\\\\?/|\u2044)\\d{1,4}', None,
     lambda m: m.group(0).replace(' ', '\u00a0')),
    ('[\u00bc\u00bd\u00be\u2153-\u215e]', None, lambda m: _FRACTIONS.get(m.group(0), m.group(0))),
    ('-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\\.d\\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)'
     f'|(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est)', None,
     lambda m: re.sub('(?i:&amp;)', '&', m.group(0))),
    ('[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}', None, _KEEP),
    ('[A-Z]*\\$|#', None, _KEEP),
    ('[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]',
     None, _currency),
    ('([A-Za-z]+)\\.', None, _abbrev),
    ('(?i:ed|ph)\\.(?i:d)\\.?', None, _KEEP),
    (f'{_ACRO}\\.?', None, _KEEP),
    (f"{_APOS}[0-9][0-9]", f'(?:{_SPACE}|{_NL})', _KEEP),
    (_WORD + '\\.', '[,;:]', lambda m: m.group(0).replace('\u00ad', '')),
    ('(?:\\([0-9]{3}\\)[ \u00a0]?|[0-9]{3}[- \u00a0.])[0-9]{3}[- \u00a0.][0-9]{4}', None,
     lambda m: m.group(0).replace(' ', '\u00a0').replace('(', '-LRB-').replace(')', '-RRB-')),
    ('"|&(?i:quot);', '[A-Za-z0-9$]', lambda m: _latex_quotes(m.group(0), True)),
    ('"|&(?i:quot);', None, lambda m: _latex_quotes(m.group(0), False)),
    ('\\+|[%&\u2030\u2031]|~|\\^|\\||\\\\', None, _KEEP),
    ('\\[', None, lambda m: '-LSB-'),
    ('\\]', None, lambda m: '-RSB-'),
    ('[<>]', None, _KEEP),
    ('\\{', None, lambda m: '-LCB-'),
    ('\\}', None, lambda m: '-RCB-'),
    ('\\(', None, lambda m: '-LRB-'),
    ('\\)', None, lambda m: '-RRB-'),
    ('-+', None, _hyphens),
    ('\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]', None, lambda m: '...'),
    ('@+|#+|_+', None, _KEEP),
    ('\\*+|(?:\\\\\\*){1,3}', None, _KEEP),
    ('[,;:]', None, _KEEP),
    ('[?!]+', None, _KEEP),
    ('[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]', None, _KEEP),
    ('=', None, _KEEP),
    ('/', None, _KEEP),
    ('[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:' + _ACRO + '\\.|[A-Za-z0-9\u00ad]+))+', None,
     lambda m: m.group(0).replace('\u00ad', '')),
    (f'{_THING_PART}(?:{_HYPHEN}{_THING_PART})*', None, _KEEP),
    ('[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+', None,
     lambda m: re.sub('(?i:&amp;)', '&', m.group(0))),
    ('(?i:c)(?:\\+\\+|#)', None, _KEEP),
    ("'", '[A-Za-z][^ \t\n\r\u00a0]', lambda m: _latex_quotes(m.group(0), True)),
    (_REDAUX, None, lambda m: _latex_quotes(m.group(0), False)),
    (f"[{_QUOTE_CHARS}]{{1,2}}|''|{_APOS}", None, lambda m: _latex_quotes(m.group(0), False)),
    (f'[{_MISC}]', None, _KEEP),
]
_COMPILED = [(re.compile(a), re.compile(b) if b else None, f) for a, b, f in _RULES]
_SKIP = re.compile(f'(?:{_SPACE}|{_NL}|[\u200b\u200e\u200f\ufeff\x00])+')
_FAST = re.compile('[a-z]+(?=[ \\n])')
_SLOW_WORDS = frozenset(['cannot', 'gonna', 'wanna', 'gotta', 'lemme', 'gimme'])
_PTB_DROP = frozenset(["''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!', ',',
                   ':', '-', '--', '...', ';'])

_PTB_NEWLINES = re.compile('[\r\n\u2028\u2029\u000b\u000c\u0085]')


def _ptb_tokenize_python(text: str) -> List[str]:
  text = text + '\n'  # in the toolkit's input file every caption is followed by a line break
  out = []
  pos, n = 0, len(text)
  while pos < n:
    m = _SKIP.match(text, pos)
    if m:
      pos = m.end()
      continue
    m = _FAST.match(text, pos)  # a plain lower-case word before a space: no other rule applies
    if m and m.group(0) not in _SLOW_WORDS:
      out.append(m.group(0))
      pos = m.end()
      continue
    best = None
    for rx, lookahead, action in _COMPILED:
      m = rx.match(text, pos)
      if not m or m.end() == pos:
        continue
      total = m.end()
      if lookahead is not None:
        m2 = lookahead.match(text, m.end())
        if not m2:
          continue
        total = m2.end()
      if best is not None and total <= best[0]:
        continue
      token = action(m)
      if token is False:
        continue
      best = (total, m.end(), token)
    if best is None:
      pos += 1  # a character no rule knows: the toolkit deletes it (with a warning)
      continue
    pos = best[1]
    if best[2] is not None:
      out.append(best[2].lower())
  return out


def _ptb_jar() -> str:
  import pycocoevalcap.tokenizer.ptbtokenizer as ptb  # pylint: disable=import-outside-toplevel
  jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)),
                     ptb.STANFORD_CORENLP_3_4_1_JAR)
  if not os.path.isfile(jar):
    raise FileNotFoundError(f'the CoreNLP jar that pycocoevalcap ships is missing: {jar}')
  return jar


def _java_backend_available() -> bool:
  if shutil.which('java') is None:
    return False
  try:
    _ptb_jar()
  except (ImportError, FileNotFoundError):
    return False
  return True


def _ptb_tokenize_java(texts: List[str]) -> List[str]:
  java = shutil.which('java')
  if java is None:
    raise RuntimeError("backend='java' needs `java` on PATH (or use backend='python')")
  try:
    jar = _ptb_jar()
  except ImportError as e:
    raise RuntimeError("backend='java' needs pycocoevalcap installed (pip install "
                       "pycocoevalcap), or use backend='python'") from e
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'captions.txt')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(''.join(t + '\n' for t in texts))
    proc = subprocess.run(
        [java, '-Dfile.encoding=UTF-8', '-Dsun.stdout.encoding=UTF-8', '-cp', jar,
         'edu.stanford.nlp.process.PTBTokenizer', '-preserveLines', '-lowerCase', path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'PTBTokenizer failed (exit {proc.returncode}): '
                       f'{proc.stderr.decode("utf-8", "replace")[-2000:]}')
  lines = proc.stdout.decode('utf-8').split('\n')
  if len(lines) < len(texts):
    raise RuntimeError(f'PTBTokenizer returned {len(lines)} lines for {len(texts)} captions')
  return [' '.join(w for w in line.rstrip().split(' ') if w not in _PTB_DROP)
          for line in lines[:len(texts)]]


def ptb_tokenize(texts: Sequence[str], backend: str = 'auto') -> List[str]:
  """Tokenise captions exactly as coco-caption's `PTBTokenizer` does; returns, per text, its
  tokens joined by single spaces (the input format of `corpus_bleu` and `cider_d`).

  coco-caption (pycocoevalcap 1.2) runs Stanford CoreNLP 3.4.1's PTBTokenizer with
  `-preserveLines -lowerCase` and then deletes the tokens '' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? !
  , : - -- ... ; (a case-sensitive match after lower-casing, so brackets, which come out as
  "-lrb-" etc., stay).

  Args:
    texts: the captions (a str each).
    backend: 'python' (the pure-Python lexer here), 'java' (runs the CoreNLP jar inside the
      installed pycocoevalcap package with `java`, in a temporary directory, one process for all
      texts: ~1 s start-up) or 'auto' ('java' when pycocoevalcap is importable and `java` is on
      PATH, else 'python').

  The Python lexer gives the toolkit's output on these cases (tests/fixtures/
  ptb_tokenized_captions.json holds the toolkit's own output for each):
  - lower-casing of everything, incl. non-ASCII letters (café, Zürich, Straße, Greek);
  - clitics split off: n't ("don't" -> "do n't", "can't" -> "ca n't", "won't" -> "wo n't"),
    's 're 've 'm 'd 'll, with ' or ’; "cannot" -> "can not"; "gonna" / "wanna" / "gotta" /
    "lemme" / "gimme" -> "gon na" etc.; "'tis" / "'twas" -> "'t is"; words that keep their
    apostrophe (o'clock, d'ye, O'Neil, 'n', 'em, '90s, ol', li'l, c'mon; y'all -> "y' all");
    a plural possessive's apostrophe is dropped ("cats'" -> "cats");
  - quotes: " ' ` ‘ ’ “ ” « » ‹ › become PTB quotes and are dropped; two stacked closing quotes
    make one kept token ("’”" -> "'''"); ‚ and „ are kept;
  - hyphens and dashes: hyphenated words stay whole (well-known, 3-4, x_y); a lone "-", "--",
    "---", "----", en and em dashes are dropped; longer runs ("-----") are kept;
  - periods: dropped at word ends, except after CoreNLP's abbreviations (mr. mrs. dr. st. ave.
    mt. ft. etc. inc. co. corp. ltd. vs. jan. ... and US state abbreviations, some only when
    capitalised: "Wash." "Mass." "Ark." "La."; "no." is not one), after a single letter ("b."),
    in acronyms (u.s., p.m., e.g., ph.d., a.k.a.; "U.S," -> "u.s") and before , ; : ("hello.,");
  - numbers: 1,000 / 3.14 / 10:30 / .5 / -5 / +3 stay whole; dates 12/25/2015 and fractions
    1/2, 24/7 stay whole; "2 1/2" becomes one token with a no-break space (U+00A0) inside;
    ½ ¼ ¾ ⅓ ⅔ -> 1/2 1/4 3/4 1/3 2/3; "10:30am" -> "10:30 am";
  - ellipses ("...", "......", ". . .", "…") are dropped; runs of ? and ! ("!!", "?!") are kept
    (a single "?" or "!" is dropped);
  - brackets: ( ) { } [ ] -> -lrb- -rrb- -lcb- -rcb- -lsb- -rsb-, all kept (the toolkit's list
    is upper-case); < and > are kept; SGML tags ("<b>") stay whole;
  - symbols: $ (and "US$"), %, &, #, @, *, +, =, ~, ^, |, the backslash, °, ×, ©, ™, ², ✓ are
    tokens; £ -> "#", € -> "$", ¢ -> "cents"; "&amp;" -> "&"; AT&T, Q&A, S&P-500, A+B
    (upper-case input only), c++, C# and and/or stay whole;
  - URLs (http://..., www.x.com, x.com) and e-mail addresses stay whole;
  - spaces: runs of spaces, tabs, no-break and zero-width spaces separate tokens; leading and
    trailing ones vanish; an empty caption gives "". Line breaks inside a text (LF, CR, U+2028,
    ...) are read as spaces by both backends: the toolkit replaces LF itself, but a CR there
    would split the caption into two lines and misalign every later caption;
  - characters CoreNLP cannot tokenise (e.g. emoji) are deleted.
  Text outside these cases follows the same rules but is not checked against the toolkit.
  """
  if isinstance(texts, str):
    raise TypeError('ptb_tokenize takes a sequence of strings, not one string')
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f'texts[{i}] is {type(t).__name__}, not str')
  if backend not in ('auto', 'python', 'java'):
    raise ValueError(f"backend must be 'auto', 'python' or 'java', got {backend!r}")
  if backend == 'auto':
    backend = 'java' if _java_backend_available() else 'python'
  clean = [_PTB_NEWLINES.sub(' ', t) for t in texts]
  if backend == 'java':
    return _ptb_tokenize_java(clean) if clean else []
  return [' '.join(w for w in _ptb_tokenize_python(t) if w not in _PTB_DROP) for t in clean]


def coco_caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                        backend: str = 'auto') -> Dict[str, float]:
  """BLEU-4 and CIDEr-D of raw captions as coco-caption scores them (unilm's coco_caption_eval).

  Args:
    hypotheses: one raw (untokenised) generated caption per image.
    references: per image, its raw reference captions (>= 1).
    backend: the `ptb_tokenize` backend; all texts go through one tokenizer call.

  Returns:
    {'bleu4': corpus BLEU-4 in [0, 1] (`bleu4`), 'cider_d': corpus CIDEr-D on coco-caption's
    scale, x10 included (`cider_d`)}, both on the PTB-tokenised texts.
  """
  _check_corpus(hypotheses, references)
  tokens = ptb_tokenize(list(hypotheses) + [r for refs in references for r in refs],
                        backend=backend)
  hyps = tokens[:len(hypotheses)]
  refs, start = [], len(hypotheses)
  for refs_i in references:
    refs.append(tokens[start:start + len(refs_i)])
    start += len(refs_i)
  return {'bleu4': bleu4(hyps, refs), 'cider_d': cider_d(hyps, refs)}


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

"""Tests of the downstream-task metrics (beit3_jax.tasks.metrics): hand-checked values, and BLEU /
CIDEr-D against coco-caption's own implementation (pycocoevalcap, pure Python parts only)."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from beit3_jax.tasks import metrics


# ------------------------------------------------------------------------------------------------
# Classification.
# ------------------------------------------------------------------------------------------------

def test_topk_accuracy_by_hand():
  logits = [[0.1, 0.5, 0.3, 0.2],   # label 2 is second
            [2.0, 1.0, 0.0, -1.0],  # label 0 is first
            [0.0, 1.0, 2.0, 3.0]]   # label 0 is last
  acc = metrics.topk_accuracy(logits, [2, 0, 0], ks=(1, 2, 3, 4, 10))
  assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3),
                 4: 1.0, 10: 1.0}
  assert metrics.topk_accuracy(logits, [1, 0, 3]) == {1: 1.0, 5: 1.0}


def test_topk_accuracy_ties_count_against_the_label():
  assert metrics.topk_accuracy([[1.0, 1.0, 0.0]], [1], ks=(1, 2)) == {1: 0.0, 2: 1.0}
  assert metrics.topk_accuracy([[1.0, 1.0, 0.0]], [0], ks=(1, 2)) == {1: 0.0, 2: 1.0}
  assert metrics.topk_accuracy(np.zeros((5, 10)), np.arange(5), ks=(1, 9, 10)) == {
      1: 0.0, 9: 0.0, 10: 1.0}


def test_topk_accuracy_matches_argsort_on_continuous_scores():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(200, 37))
  labels = rng.integers(0, 37, size=200)
  order = np.argsort(-logits, axis=1)
  for k in (1, 5, 10):
    expected = np.mean([labels[i] in order[i, :k] for i in range(200)])
    assert metrics.topk_accuracy(logits, labels, ks=(k,))[k] == pytest.approx(expected)


def test_binary_accuracy():
  labels = [1, 0, 1, 0]
  assert metrics.binary_accuracy([[0.0, 1.0], [2.0, 1.0], [3.0, -1.0], [0.5, 0.5]], labels) == 0.75
  assert metrics.binary_accuracy([0.3, -0.2, -1.0, 0.0], labels) == 0.75
  assert metrics.binary_accuracy(np.array([[0.3], [-0.2], [1.0], [-4.0]]),
                                 np.array(labels, bool)) == 1.0
  with pytest.raises(ValueError):
    metrics.binary_accuracy(np.zeros((4, 3)), labels)


# ------------------------------------------------------------------------------------------------
# VQAv2.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('raw,normalized', [
    ('Two', '2'), ('ten dogs', '10 dogs'), ('none', '0'), ('zero', '0'), ('eleven', 'eleven'),
    ('The dog.', 'dog'), ('an apple', 'apple'), ('a', ''), ('A Red Car', 'red car'),
    ('dont', "don't"), ('Dont', "don't"), ('Wheres the cat?', "where's cat"), ("it's", "it's"),
    ('  Yes\n', 'yes'), ('yes\tno', 'yes no'),
    # digit-comma-digit anywhere: every punctuation character is deleted, not spaced
    ('1,000', '1000'), ('ice-cream, 2,5', 'icecream 25'),
    # punctuation next to a space is deleted; otherwise it becomes a space
    ('red, white', 'red white'), ('yes,no', 'yes no'), ('t-shirt', 't shirt'),
    ('black and white!', 'black and white'), ('(left)', 'left'),
    # periods go unless a digit follows
    ('3.5', '3.5'), ('5.', '5'), ('mr. smith', 'mr smith'), ('.5', '.5'),
    # not in the punctuation list: kept
    ('3:00', '3:00'), ("o'clock", "o'clock"),
])
def test_normalize_vqa_answer(raw, normalized):
  assert metrics.normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize('count,accuracy', [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                            (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_matching_annotators(count, accuracy):
  answers = ['2'] * count + ['3'] * (10 - count)
  assert metrics.vqa_question_accuracy('Two', answers) == pytest.approx(accuracy)
  assert metrics.vqa_question_accuracy('2', answers) == pytest.approx(accuracy)
  # the soft training target is the same function of the count
  assert metrics.vqa_soft_score(count) == pytest.approx(accuracy)


def test_vqa_accuracy_ground_truth_processing_follows_the_official_script():
  # Answers that differ get the punctuation step ("yes." -> "yes") ...
  assert metrics.vqa_question_accuracy('yes', ['yes.'] * 3 + ['no'] * 7) == pytest.approx(0.9)
  # ... but not the digit/article step ("two" stays "two" and never equals a normalised "2") ...
  assert metrics.vqa_question_accuracy('two', ['two'] * 5 + ['3'] * 5) == 0.0
  # ... and identical answers are left as they are.
  assert metrics.vqa_question_accuracy('yes', ['yes.'] * 10) == 0.0
  assert metrics.vqa_question_accuracy('yes', ['yes'] * 10) == 1.0


def test_vqa_accuracy_mean_over_questions():
  preds = ['two', 'a dog', 'cat']
  gts = [['2'] + ['3'] * 9, ['dog'] * 10, ['mouse'] * 10]
  assert metrics.vqa_accuracy(preds, gts) == pytest.approx((0.3 + 1.0 + 0.0) / 3)
  with pytest.raises(ValueError):
    metrics.vqa_accuracy(preds, gts[:2])


def test_vqa_soft_targets():
  answers = ['yes'] * 4 + ['no'] * 3 + ['maybe'] * 2 + ['2']
  assert metrics.answer_scores(answers) == {'yes': 1.0, 'no': 0.9, 'maybe': 0.6, '2': 0.3}
  assert list(metrics.answer_scores(answers)) == ['yes', 'no', 'maybe', '2']
  assert metrics.answer_scores(answers, vocabulary=['no', '2', 'blue']) == {'no': 0.9, '2': 0.3}
  # unilm counts the raw strings; normalize=True first maps them onto vocabulary entries
  assert metrics.answer_scores(['Two', '2', 'two.']) == {'Two': 0.3, '2': 0.3, 'two.': 0.3}
  assert metrics.answer_scores(['Two', '2', 'two.'], normalize=True) == {'2': 0.9}
  assert metrics.answer_scores(['red'] * 10, vocabulary=['blue']) == {}
  with pytest.raises(ValueError):
    metrics.vqa_soft_score(-1)


def test_build_answer_vocabulary():
  majority = ['yes', 'No', 'the dog', 'Yes', 'two', 'dog', 'cat', '2', 'no.', 'yes']
  assert metrics.build_answer_vocabulary(majority, min_count=2) == ['yes', 'no', 'dog', '2']
  assert metrics.build_answer_vocabulary(majority, min_count=3) == ['yes']
  assert metrics.build_answer_vocabulary(majority) == []  # unilm's threshold: 9
  assert metrics.build_answer_vocabulary(['a cat'] * 9) == ['cat']


def test_vqa_soft_target_score():
  logits = np.array([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  targets = np.array([[0.0, 0.9, 0.3], [0.0, 1.0, 0.0], [0.6, 0.0, 1.0]])
  assert metrics.vqa_soft_target_score(logits, targets) == pytest.approx((0.9 + 0.0 + 1.0) / 3)


# ------------------------------------------------------------------------------------------------
# Retrieval.
# ------------------------------------------------------------------------------------------------

def test_retrieval_recall_by_hand():
  # 3 images with 2 texts each.
  sim = np.array([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],     # own texts 0, 1: best 0.9, rank 0
                  [0.7, 0.6, 0.5, 0.1, 0.9, 0.2],     # own texts 2, 3: best 0.5, rank 3
                  [0.2, 0.3, 0.4, 0.1, 0.0, 0.35]])   # own texts 4, 5: best 0.35, rank 1
  # text -> image ranks: t0 0, t1 2, t2 1, t3 2 (a tie with image 2 counts against it), t4 2, t5 1
  r = metrics.retrieval_recall(sim, [0, 0, 1, 1, 2, 2], ks=(1, 2, 5))
  expected = {'i2t_r1': 1 / 3, 'i2t_r2': 2 / 3, 'i2t_r5': 1.0,
              't2i_r1': 1 / 6, 't2i_r2': 3 / 6, 't2i_r5': 1.0}
  expected['r_mean'] = np.mean(list(expected.values()))
  assert r == pytest.approx(expected)
  assert list(r) == ['i2t_r1', 'i2t_r2', 'i2t_r5', 't2i_r1', 't2i_r2', 't2i_r5', 'r_mean']


def test_retrieval_recall_constant_similarity_scores_zero():
  r = metrics.retrieval_recall(np.zeros((20, 100)), np.repeat(np.arange(20), 5))
  assert r['i2t_r10'] == 0.0 and r['t2i_r10'] == 0.0


def test_retrieval_recall_matches_argsort():
  rng = np.random.default_rng(1)
  n_img, per = 40, 5
  t2i = rng.permutation(np.repeat(np.arange(n_img), per))
  sim = rng.normal(size=(n_img, n_img * per))
  sim[t2i, np.arange(n_img * per)] += 1.5  # make the task non-trivial but imperfect
  r = metrics.retrieval_recall(sim, t2i, chunk_size=7)
  img_order = np.argsort(-sim, axis=1)
  txt_order = np.argsort(-sim, axis=0)
  for k in (1, 5, 10):
    i2t = np.mean([np.any(t2i[img_order[i, :k]] == i) for i in range(n_img)])
    t2i_r = np.mean([t2i[t] in txt_order[:k, t] for t in range(n_img * per)])
    assert r[f'i2t_r{k}'] == pytest.approx(i2t)
    assert r[f't2i_r{k}'] == pytest.approx(t2i_r)
  assert 0 < r['i2t_r1'] < 1 and 0 < r['t2i_r1'] < 1


def test_retrieval_recall_rejects_images_without_text():
  with pytest.raises(ValueError, match='without a text'):
    metrics.retrieval_recall(np.zeros((3, 4)), [0, 0, 1, 1])


# ------------------------------------------------------------------------------------------------
# Captioning.
# ------------------------------------------------------------------------------------------------

_PTB_FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'ptb_tokenized_captions.json')


def _ptb_fixture():
  with open(_PTB_FIXTURE, encoding='utf-8') as f:
    data = json.load(f)
  assert 'pycocoevalcap 1.2' in data['source'] and len(data['captions']) >= 200
  return [c['raw'] for c in data['captions']], [c['tokenized'] for c in data['captions']]


def test_ptb_tokenize_python_matches_toolkit_output():
  raw, expected = _ptb_fixture()
  got = metrics.ptb_tokenize(raw, backend='python')
  bad = [(r, e, g) for r, e, g in zip(raw, expected, got) if e != g]
  assert not bad, f'{len(bad)} captions differ from the toolkit, e.g. {bad[:3]}'


def test_ptb_tokenize_java_matches_toolkit_output():
  assert shutil.which('java') is not None, (
      'java is not on PATH: the Java PTB tokenizer backend cannot be checked (install a JRE)')
  raw, expected = _ptb_fixture()
  got = metrics.ptb_tokenize(raw, backend='java')
  assert got == expected
  # texts with line breaks stay one line each (and so do not misalign the captions after them)
  assert metrics.ptb_tokenize(['a\rb', 'c\nd', 'e'], backend='java') == ['a b', 'c d', 'e']


def test_ptb_tokenize_examples_and_errors():
  out = metrics.ptb_tokenize(["A dog's toy isn't (here).", 'Mr. Smith -- 2 1/2 ft. tall!!', ''],
                             backend='python')
  assert out == ["a dog 's toy is n't -lrb- here -rrb-", 'mr. smith 2\u00a01/2 ft. tall !!', '']
  assert metrics.ptb_tokenize(['a\rb', 'c\u2028d'], backend='python') == ['a b', 'c d']
  assert metrics.ptb_tokenize([], backend='python') == []
  with pytest.raises(TypeError, match='not one string'):
    metrics.ptb_tokenize('a caption')
  with pytest.raises(TypeError, match=r'texts\[1\]'):
    metrics.ptb_tokenize(['a', None])
  with pytest.raises(ValueError, match='backend'):
    metrics.ptb_tokenize(['a'], backend='perl')


def test_bleu_by_hand():
  # c = 4, r = 5: p1 = 3/4, p2 = 1/3 (only "a b"), p3 = p4 = 0; BP = exp(1 - 5/4).
  b = metrics.corpus_bleu(['a b c d'], [['a b x d e']])
  assert b[0] == pytest.approx(0.75 * math.exp(-0.25), rel=1e-9)
  assert b[1] == pytest.approx(math.sqrt(0.75 / 3) * math.exp(-0.25), rel=1e-9)
  assert b[2] < 1e-4 and b[3] < 1e-3  # no 3-gram match: only coco-caption's smoothing is left
  # "closest" reference length: 3 and 5 are both 1 away from 4; the shorter wins, so no penalty.
  assert metrics.bleu4(['a b c d'], [['a b c', 'a b c d e']]) == pytest.approx(1.0, abs=1e-9)
  # clipping: "the" counts at most twice (its maximum in one reference)
  assert metrics.corpus_bleu(['the the the the'], [['the cat the mat', 'the']], max_n=1)[0] == (
      pytest.approx(0.5))


def test_cider_by_hand():
  # Two images, every n-gram in one image's references only: idf = log 2 for all, so each
  # exact hypothesis has cosine 1 for 1- and 2-grams, 0 for 3-, 4-grams (none): 10 * 2/4 = 5.
  scores = metrics.cider_d_scores(['a b', 'c d'], [['a b'], ['c d']])
  np.testing.assert_allclose(scores, [5.0, 5.0])
  assert metrics.cider_d(['a b', 'c d'], [['a b'], ['c d']]) == pytest.approx(5.0)
  # a one-image corpus has log N = 0: every weight is 0
  assert metrics.cider_d(['a b c'], [['a b c']]) == 0.0


def _random_corpus(rng, n_images, vocab_size=8):
  vocab = [f'w{i}' for i in range(vocab_size)]
  def sentence(lo, hi):
    return ' '.join(rng.choice(vocab, size=rng.integers(lo, hi + 1)))
  hyps = [sentence(1, 12) for _ in range(n_images)]
  refs = [[sentence(2, 14) for _ in range(rng.integers(1, 6))] for _ in range(n_images)]
  return hyps, refs


_CAPTIONS = [
    ('A man riding a wave on top of a surfboard.',
     ['A man riding a wave on top of a surfboard.', 'A surfer rides a large wave in the ocean.',
      'A person on a surf board riding a wave', 'Man surfing a wave on a sunny day.',
      'The surfer is riding the wave.']),
    ('Two dogs playing with a frisbee in the grass',
     ['Two dogs play with a frisbee on a lawn.', "A dog's frisbee game in the park",
      'Two brown dogs running in grass with a frisbee.', 'Dogs chasing a flying disc.',
      'A pair of dogs playing outside.']),
    ('A plate of food with broccoli and rice',
     ['A white plate topped with rice and broccoli.', 'A plate of food on a table.',
      'Broccoli, rice and chicken on a plate', 'A healthy meal with vegetables.',
      'Some food is sitting on a plate.']),
    ('A red bus driving down a city street',
     ['A red double-decker bus on a street.', "A bus that's driving down the road",
      'A large red bus in the city.', 'The bus is parked near the sidewalk.',
      'Red bus traveling down a busy city street.']),
    ('A cat', ['A cat sitting on top of a laptop computer.', 'A cat lies on a keyboard.',
               'Cat on a laptop', 'An orange cat laying on a computer.',
               "The cat is on the owner's laptop."]),
]


def _corpora():
  rng = np.random.default_rng(0)
  tok = lambda texts: metrics.ptb_tokenize(texts, backend='python')
  yield 'captions', (tok([h for h, _ in _CAPTIONS]), [tok(refs) for _, refs in _CAPTIONS])
  yield 'exact', (['a b c d e', 'x y z'], [['a b c d e', 'a b c'], ['x y z', 'x y']])
  yield 'short', (['a', 'b c', 'a b'], [['a b c d', 'a'], ['b c d e f g'], ['c d', 'a b c']])
  yield 'empty', (['', 'a b', 'c'], [['a b'], ['a b c', ''], ['c d e']])
  for i, n in enumerate((2, 5, 30)):
    yield f'random{i}', _random_corpus(rng, n)


@pytest.mark.parametrize('name,corpus', [pytest.param(n, c, id=n) for n, c in _corpora()])
def test_bleu_and_cider_match_pycocoevalcap(name, corpus):
  bleu_mod = pytest.importorskip('pycocoevalcap.bleu.bleu')
  cider_mod = pytest.importorskip('pycocoevalcap.cider.cider')
  hyps, refs = corpus
  gts = {i: list(r) for i, r in enumerate(refs)}
  res = {i: [h] for i, h in enumerate(hyps)}
  ref_bleu, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
  ref_cider, ref_cider_each = cider_mod.Cider().compute_score(gts, res)
  np.testing.assert_allclose(metrics.corpus_bleu(hyps, refs), ref_bleu, rtol=1e-9, atol=1e-12)
  assert metrics.bleu4(hyps, refs) == pytest.approx(ref_bleu[3], rel=1e-9, abs=1e-12)
  np.testing.assert_allclose(metrics.cider_d_scores(hyps, refs), ref_cider_each, rtol=1e-9,
                             atol=1e-12)
  assert metrics.cider_d(hyps, refs) == pytest.approx(ref_cider, rel=1e-9, abs=1e-12)
  if name == 'captions':
    assert 0.1 < ref_bleu[3] < 1 and 0.1 < ref_cider < 10  # a corpus that exercises the metrics


def test_coco_caption_scores_match_pycocoevalcap():
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  assert shutil.which('java') is not None, 'java is not on PATH: the toolkit cannot be run'
  hyps = [h for h, _ in _CAPTIONS] + ['A cat (orange) on a laptop...', "It's a man's bus!!"]
  refs = [r for _, r in _CAPTIONS] + [[c.upper() for c in _CAPTIONS[4][1]],
                                      ["The man's red bus.", 'A bus -- parked.']]
  # the toolkit's own pipeline, as unilm's coco_caption_eval runs it
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize({i: [{'caption': c} for c in r] for i, r in enumerate(refs)})
  res = tokenizer.tokenize({i: [{'caption': h}] for i, h in enumerate(hyps)})
  ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  ref_cider, _ = Cider().compute_score(gts, res)
  for backend in ('python', 'java'):
    got = metrics.coco_caption_scores(hyps, refs, backend=backend)
    assert got['bleu4'] == pytest.approx(ref_bleu[3], abs=1e-6), backend
    assert got['cider_d'] == pytest.approx(ref_cider, abs=1e-6), backend
  assert 0.1 < ref_bleu[3] < 1 and 0.1 < ref_cider < 10
  with pytest.raises(ValueError, match='reference sets'):
    metrics.coco_caption_scores(['a'], [['a'], ['b']])

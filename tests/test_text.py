"""beit3_jax.data.text: XLM-R ids (checked against transformers), padded sequences, training, CLI.

A tiny unigram .spm is trained here from generated sentences about shapes and colours.
"""

import io
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from beit3_jax.data import text as text_lib
from beit3_jax.data.text import TextTokenizer

VOCAB = 120  # a unigram model of this corpus can hold at most ~170 pieces

COLOURS = 'red green blue yellow purple orange black white grey brown pink cyan'.split()
SHAPES = ('circle square triangle rectangle hexagon star diamond oval cube sphere cylinder '
          'cone').split()
SIZES = 'small large tiny huge medium big'.split()
RELATIONS = ['to the left of', 'to the right of', 'above', 'below', 'next to', 'behind',
             'in front of', 'inside', 'near']
VERBS = 'is sits lies rests floats stands appears hangs leans spins glows rolls'.split()
MATERIALS = ('wooden metal glass plastic paper stone rubber golden silver woollen striped dotted '
             'shiny matte').split()
COUNTS = 'two three four five six seven eight nine ten eleven twelve several many'.split()
OBJECTS = 'ball box cup book lamp chair table vase bottle kite clock shoe hat bowl plate'.split()
PLACES = 'room garden kitchen street beach forest desk shelf floor window'.split()

# Seen and unseen words, digits, punctuation, odd whitespace, and characters the model never saw
# (these become <unk>, id 3). No literal "<s>"/"<mask>": see test_special_token_strings_are_text.
EDGE_TEXTS = [
    'A tiny red circle is above the blue square.',
    'zebra 123 4.5 $% ©',
    'Ünïcödé café naïve',
    '日本語 text',
    'emoji 😀 star',
    ' lead\ttab\nnewline  end ',
    'ＡＢＣ full width',
    'x' * 30,
    'it\'s a "quoted" (paren) [brack] {brace}',
    'a<b>c',
    '',
    ' ',
    'red-green/blue_yellow',
    '\u00a0nbsp\u200bzero width',
    'ﬁ ligature ½ Ⅻ',
    'The 3 purple hexagons cost €42,50?!',
    'SHOUTING RED TRIANGLE',
    'Ωmega δelta',
]


def make_sentences(n, seed):
  """`n` English-ish sentences about shapes, colours and objects."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a = f'{rng.choice(["a", "the", "one"])} {rng.choice(SIZES)} {rng.choice(COLOURS)} ' \
        f'{rng.choice(SHAPES)}'
    b = f'{rng.choice(["a", "the", "another"])} {rng.choice(COLOURS)} {rng.choice(SHAPES)}'
    kind = rng.random()
    if kind < 0.4:
      s = f'{a} {rng.choice(VERBS)} {rng.choice(RELATIONS)} {b}'
    elif kind < 0.7:
      s = f'{rng.choice(COUNTS)} {rng.choice(MATERIALS)} {rng.choice(OBJECTS)}s are on the ' \
          f'{rng.choice(PLACES)}'
    else:
      s = f'there is a {rng.choice(MATERIALS)} {rng.choice(COLOURS)} {rng.choice(OBJECTS)} ' \
          f'{rng.choice(RELATIONS)} {b} in the {rng.choice(PLACES)}'
    if rng.random() < 0.5:
      s = s[0].upper() + s[1:]
    out.append(s + rng.choice(['.', '', ' .', '!']))
  return out


def comparison_texts():
  """60+ texts: held-out sentences, some with digits, unseen words, punctuation, unknown chars."""
  rng = random.Random(7)
  texts = []
  extras = ['42', '3.14', 'zebra', 'quixotic', ';', '?!', '—', '日本', '😀', 'ß', '#1', '(x)']
  for i, s in enumerate(make_sentences(45, seed=1)):
    words = s.split()
    if i % 3:
      words.insert(rng.randrange(len(words) + 1), rng.choice(extras))
    texts.append(' '.join(words))
  return texts + EDGE_TEXTS


@pytest.fixture(scope='module')
def proto():
  return text_lib.train_spm(make_sentences(400, seed=0), VOCAB)


@pytest.fixture(scope='module')
def tok(proto):
  return TextTokenizer.from_proto(proto)


@pytest.fixture(scope='module')
def hf_tok(proto, tmp_path_factory):
  # transformers 5.x: `XLMRobertaTokenizer` is the tokenizers-backed (fast) class; there is no
  # sentencepiece-backed slow class any more. `from_pretrained(folder)` finds
  # `sentencepiece.bpe.model` (its vocab file name) and converts it on the fly
  # (XLMRobertaConverter.convert_from_spm: <s> <pad> </s> <unk>, pieces[3:], <mask>) into a
  # Unigram model with unk id 3, plus the .spm's normalizer. `XLMRobertaTokenizer(vocab_file=...)`
  # ignores the file and builds a 5-token vocab that maps every piece to <unk>. The conversion is
  # always Unigram, so it only matches sentencepiece for unigram .spm (BEiT-3's and XLM-R's are).
  transformers = pytest.importorskip('transformers')
  folder = tmp_path_factory.mktemp('xlmr')
  (folder / 'sentencepiece.bpe.model').write_bytes(proto)
  return transformers.XLMRobertaTokenizer.from_pretrained(str(folder))


# --- ids against transformers' XLM-R tokenizer ---------------------------------------------------


def test_ids_match_transformers_xlmr(tok, hf_tok):
  texts = comparison_texts()
  assert len(texts) >= 50
  all_hf = []
  for text in texts:
    hf_ids = hf_tok(text)['input_ids']
    assert hf_ids == [0] + tok.encode(text) + [2], text
    all_hf.extend(hf_ids)
  # The comparison is meaningful: real pieces and <unk> both occur (a tokenizer built wrongly,
  # e.g. XLMRobertaTokenizer(vocab_file=...), gives nothing but 0, 3 and 2).
  real = [i for i in all_hf if i > 3]
  assert len(set(real)) > 50
  assert all_hf.count(3) >= 10


def test_special_ids_match_transformers(tok, hf_tok):
  assert (hf_tok.bos_token_id, hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (
      tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  assert hf_tok.mask_token_id == tok.mask_id == VOCAB + 1
  assert len(hf_tok) == tok.vocab_size == VOCAB + 2
  assert tok.special_ids == frozenset({0, 1, 2, 3, VOCAB + 1})
  assert hf_tok.convert_ids_to_tokens(list(range(4, 10))) == [
      spm.SentencePieceProcessor(model_proto=tok.serialized_proto()).id_to_piece(i)
      for i in range(3, 9)]


def test_special_token_strings_are_text(tok, hf_tok):
  # Deliberate difference: transformers splits out literal special tokens; we keep them as text.
  assert hf_tok('red <mask> blue')['input_ids'].count(tok.mask_id) == 1
  assert tok.mask_id not in tok.encode('red <mask> blue')
  assert tok.bos_id not in tok.encode('a<s>b')


def test_unknown_characters_map_to_unk(tok, proto):
  sp = spm.SentencePieceProcessor(model_proto=proto)
  assert 0 in sp.encode('日本 😀')  # sentencepiece's own unk id ...
  ids = tok.encode('日本 😀')
  assert 3 in ids and 0 not in ids and 1 not in ids  # ... becomes XLM-R's unk 3, not 1
  assert tok.encode('red') == [i + 1 for i in sp.encode('red')]


# --- sequences -----------------------------------------------------------------------------------


def test_encode_sequence_pads(tok):
  text = 'a small red circle'
  pieces = tok.encode(text)
  n = len(pieces) + 2
  ids, mask = tok.encode_sequence(text, 16)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_
  assert ids.shape == mask.shape == (16,)
  assert ids.tolist() == [0] + pieces + [2] + [1] * (16 - n)
  assert mask.tolist() == [False] * n + [True] * (16 - n)


def test_encode_sequence_truncates_keeping_eos(tok):
  text = 'there is a wooden blue lamp to the left of the red square in the kitchen'
  pieces = tok.encode(text)
  assert len(pieces) > 8
  ids, mask = tok.encode_sequence(text, 8)
  assert ids.tolist() == [0] + pieces[:6] + [2]
  assert not mask.any()
  # Exactly full: no padding, nothing dropped.
  ids, mask = tok.encode_sequence(text, len(pieces) + 2)
  assert ids.tolist() == [0] + pieces + [2] and not mask.any()


def test_encode_sequence_edge_lengths(tok):
  ids, mask = tok.encode_sequence('red circle', 2)
  assert ids.tolist() == [0, 2] and mask.tolist() == [False, False]
  ids, mask = tok.encode_sequence('', 4)
  assert ids.tolist() == [0, 2, 1, 1] and mask.tolist() == [False, False, True, True]
  for bad in (1, 0, -3):
    with pytest.raises(ValueError, match='max_len'):
      tok.encode_sequence('red', bad)
  with pytest.raises(ValueError, match='max_len'):
    tok.encode_batch(['red'], 1)


def test_encode_batch_matches_encode_sequence(tok):
  texts = comparison_texts()[:20] + ['x' * 50, '']
  ids, mask = tok.encode_batch(texts, 12)
  assert ids.shape == mask.shape == (len(texts), 12)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_
  for row, text in enumerate(texts):
    one_ids, one_mask = tok.encode_sequence(text, 12)
    np.testing.assert_array_equal(ids[row], one_ids)
    np.testing.assert_array_equal(mask[row], one_mask)
    last = int((~mask[row]).sum()) - 1
    assert ids[row, 0] == 0 and ids[row, last] == 2
    assert (ids[row, last + 1:] == 1).all() and not mask[row, :last + 1].any()
  empty_ids, empty_mask = tok.encode_batch([], 12)
  assert empty_ids.shape == empty_mask.shape == (0, 12)
  with pytest.raises(TypeError):
    tok.encode_batch('not a list', 12)


def _waits_of_this_thread() -> int:
  with open('/proc/thread-self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('voluntary_ctxt_switches'))


@pytest.mark.skipif(not os.path.exists('/proc/thread-self/status'), reason='needs Linux /proc')
def test_encode_sequence_does_not_wait_on_other_threads(tok):
  """Data workers encode one text per example: sentencepiece's list form starts a thread pool
  and blocks on it at every call (2 waits per call on 2 cores), which idled the workers' cores;
  the one-string form runs in the calling thread."""
  texts = comparison_texts()[:20]
  tok.encode_sequence(texts[0], 12)
  before = _waits_of_this_thread()
  for i in range(200):
    tok.encode_sequence(texts[i % len(texts)], 12)
  assert _waits_of_this_thread() - before < 20


def test_decode_round_trip(tok):
  for text in ['A tiny red circle is above the blue square.', 'two wooden boxs are on the shelf',
               'seven golden kites hang near the window!']:
    assert tok.decode(tok.encode(text)) == text
    ids, _ = tok.encode_sequence(text, 40)
    assert tok.decode(ids) == text  # <s>, </s> and padding dropped
  assert tok.decode([0, tok.mask_id, 2, 1, 1]) == ''
  assert tok.decode(tok.encode('red 42 circle')) == 'red  circle'  # <unk> dropped too
  assert tok.decode([]) == ''
  with pytest.raises(ValueError, match='out of range'):
    tok.decode([0, tok.vocab_size])


def test_pickles(tok):
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode('a red circle') == tok.encode('a red circle')
  assert again.vocab_size == tok.vocab_size


# --- loading -------------------------------------------------------------------------------------


def test_from_file(tmp_path, proto, tok):
  path = text_lib.save_spm(proto, tmp_path / 'sub' / 'x.spm')
  assert TextTokenizer.from_file(path).encode('a red circle') == tok.encode('a red circle')
  missing = tmp_path / 'missing.spm'
  with pytest.raises(FileNotFoundError, match='missing.spm'):
    TextTokenizer.from_file(missing)
  for name, data in [('text.spm', b'this is not a model\n'), ('empty.spm', b'')]:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=name):
      TextTokenizer.from_file(tmp_path / name)


def test_rejects_non_default_special_ids(tmp_path):
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(make_sentences(100, seed=3)), model_writer=writer, vocab_size=40,
      bos_id=-1, eos_id=-1, minloglevel=2, num_threads=1)
  with pytest.raises(ValueError, match='default special ids'):
    TextTokenizer.from_proto(writer.getvalue())


# --- training ------------------------------------------------------------------------------------


def test_train_spm_is_deterministic_with_default_special_ids(proto):
  again = text_lib.train_spm(make_sentences(400, seed=0), VOCAB)
  assert again == proto
  sp = spm.SentencePieceProcessor(model_proto=proto)
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
  assert sp.get_piece_size() == VOCAB
  # Sampling a subset is seeded too.
  sampled = [text_lib.train_spm(make_sentences(400, seed=0), VOCAB, input_sentence_size=200,
                                seed=s) for s in (3, 3, 4)]
  assert sampled[0] == sampled[1] != sampled[2]


def test_train_spm_bpe(tok):
  proto = text_lib.train_spm(make_sentences(200, seed=0), 80, model_type='bpe')
  bpe = TextTokenizer.from_proto(proto)
  assert bpe.vocab_size == 82
  assert bpe.decode(bpe.encode('a small red circle')) == 'a small red circle'


def test_train_spm_errors():
  sentences = make_sentences(50, seed=0)
  with pytest.raises(ValueError, match='no sentences'):
    text_lib.train_spm([], 50)
  with pytest.raises(TypeError):
    text_lib.train_spm('a single string', 50)
  with pytest.raises(ValueError, match='Vocabulary size too high'):
    text_lib.train_spm(sentences, 5000)
  with pytest.raises(ValueError, match='model_type'):
    text_lib.train_spm(sentences, 50, model_type='wordpiece')
  with pytest.raises(ValueError, match='pad_id'):
    text_lib.train_spm(sentences, 50, pad_id=3)


def test_save_spm_refuses_to_overwrite(tmp_path, proto):
  path = tmp_path / 'x.spm'
  text_lib.save_spm(proto, path)
  with pytest.raises(FileExistsError, match='x.spm'):
    text_lib.save_spm(b'other', path)
  assert path.read_bytes() == proto
  text_lib.save_spm(b'other', path, overwrite=True)
  assert path.read_bytes() == b'other'
  assert sorted(os.listdir(tmp_path)) == ['x.spm']  # no temporary files left behind


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_train_and_encode(tmp_path, capsys):
  a, b = tmp_path / 'a.txt', tmp_path / 'b.txt'
  a.write_text('\n'.join(make_sentences(250, seed=0)) + '\n\n\n', encoding='utf-8')
  b.write_text('\n  \n'.join(make_sentences(150, seed=5)), encoding='utf-8')
  out = tmp_path / 'x.spm'
  train = ['train', '--input', str(a), '--input', str(b), '--output', str(out),
           '--vocab_size', str(VOCAB)]
  assert text_lib.main(train) == 0
  printed = capsys.readouterr().out
  assert '400 sentences' in printed and str(out) in printed
  assert f'{VOCAB} pieces' in printed and f'vocab_size {VOCAB + 2}' in printed
  tok = TextTokenizer.from_file(out)
  assert tok.vocab_size == VOCAB + 2

  assert text_lib.main(train) == 1  # refuses to overwrite
  err = capsys.readouterr().err
  assert 'already exists' in err and str(out) in err
  assert text_lib.main(train + ['--overwrite', '--model_type', 'bpe']) == 0
  capsys.readouterr()
  assert text_lib.main(train + ['--overwrite', '--input_sentence_size', '300']) == 0
  assert '300 (sampled from 400) sentences' in capsys.readouterr().out
  tok = TextTokenizer.from_file(out)

  assert text_lib.main(['encode', '--spm', str(out), '--max_len', '16', 'a red circle']) == 0
  printed = capsys.readouterr().out
  ids, mask = tok.encode_sequence('a red circle', 16)
  assert 'ids:          ' + ' '.join(map(str, ids)) in printed
  assert 'padding_mask: ' + ' '.join(str(int(m)) for m in mask) in printed


def test_cli_errors(tmp_path, capsys):
  missing = tmp_path / 'nope.txt'
  rc = text_lib.main(['train', '--input', str(missing), '--output', str(tmp_path / 'x.spm'),
                      '--vocab_size', '50'])
  assert rc == 1 and str(missing) in capsys.readouterr().err
  assert not (tmp_path / 'x.spm').exists()
  rc = text_lib.main(['encode', '--spm', str(tmp_path / 'none.spm'), '--max_len', '8', 'red'])
  assert rc == 1 and 'none.spm' in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path, proto):
  path = text_lib.save_spm(proto, tmp_path / 'x.spm')
  result = subprocess.run(
      [sys.executable, '-m', 'beit3_jax.data.text', 'encode', '--spm', path, '--max_len', '6',
       'red'], capture_output=True, text=True, check=True)
  ids, _ = TextTokenizer.from_proto(proto).encode_sequence('red', 6)
  assert 'ids:          ' + ' '.join(map(str, ids)) in result.stdout

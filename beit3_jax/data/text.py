"""SentencePiece text for BEiT-3: the XLM-R id layout, padded sequences, training, and a CLI.

BEiT-3 tokenizes with an XLM-R style SentencePiece model (`beit3.spm`), which the original
pipeline loaded through transformers' `XLMRobertaTokenizer`. That tokenizer puts the fairseq
specials first and shifts every sentencepiece piece up by one:

    id  0 <s>    1 <pad>    2 </s>    3 <unk>
    id  p + 1    sentencepiece piece p >= 3 (sentencepiece's own unk 0 becomes 3)
    id  spm_size + 1 <mask> (the last id; vocab_size = spm_size + 2)

The model's text embedding may have more rows than `vocab_size` (BEiT-3's has 64010); the
extra rows are never produced here.

`TextTokenizer` runs sentencepiece itself and maps its ids to that layout, so it gives the ids
of the original pipeline without transformers. `train_spm` trains a model with sentencepiece's
default special ids (unk 0, bos 1, eos 2, no pad), the layout of XLM-R's and BEiT-3's .spm.

CLI:

    python -m beit3_jax.data.text train --input a.txt [--input b.txt ...] --output x.spm \
        --vocab_size 1000 [--model_type unigram|bpe] [--overwrite]
    python -m beit3_jax.data.text encode --spm x.spm --max_len 16 "some text" ["more" ...]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import random
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
# Sentencepiece's default special ids, which the id mapping assumes (XLM-R's and BEiT-3's .spm).
_SPM_UNK, _SPM_BOS, _SPM_EOS = 0, 1, 2

MODEL_TYPES = ('unigram', 'bpe', 'char', 'word')
# Trainer options that would break the in-memory training or the id layout.
_RESERVED_TRAINER_KWARGS = frozenset({
    'input', 'model_prefix', 'sentence_iterator', 'model_writer', 'unk_id', 'bos_id', 'eos_id',
    'pad_id'})


class TextTokenizer:
  """XLM-R ids from a SentencePiece model, as the original BEiT-3 pipeline computed them.

  Build with `TextTokenizer.from_file(path)` or `TextTokenizer.from_proto(bytes)`. The model must
  use sentencepiece's default special ids (unk 0, bos 1, eos 2), like XLM-R's and BEiT-3's .spm.

  The text is always treated as plain text: a literal "<mask>" or "<s>" in it is split into
  ordinary pieces, whereas transformers' tokenizer would turn it into the special id.
  """

  def __init__(self, processor: spm.SentencePieceProcessor, source: str = '<proto>'):
    """Use `from_file` or `from_proto`; `processor` must already be loaded."""
    size = processor.get_piece_size()
    layout = (processor.unk_id(), processor.bos_id(), processor.eos_id())
    if size <= 3 or layout != (_SPM_UNK, _SPM_BOS, _SPM_EOS):
      raise ValueError(
          f'{source}: expected a SentencePiece model with the default special ids (unk 0, bos 1, '
          f'eos 2) and more than 3 pieces, like XLM-R\'s and BEiT-3\'s .spm; got unk '
          f'{layout[0]}, bos {layout[1]}, eos {layout[2]} and {size} pieces.')
    self._sp = processor
    self._spm_size = size

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> TextTokenizer:
    """Load a .spm file; FileNotFoundError / ValueError name the path."""
    path = os.fspath(path)
    if '://' in path:  # e.g. gs:// on TPU pods
      from etils import epath
      if not epath.Path(path).exists():
        raise FileNotFoundError(f'SentencePiece model not found: {path}')
      return cls.from_proto(epath.Path(path).read_bytes(), source=path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'SentencePiece model not found: {path}')
    with open(path, 'rb') as f:
      return cls.from_proto(f.read(), source=path)

  @classmethod
  def from_proto(cls, proto: bytes, source: str = '<proto>') -> TextTokenizer:
    """Load a serialized SentencePiece model (the bytes of a .spm file).

    Args:
      proto: the serialized `ModelProto`.
      source: where it came from, for error messages.
    """
    if not isinstance(proto, (bytes, bytearray)):
      raise TypeError(f'{source}: proto must be bytes, got {type(proto).__name__}.')
    if not proto:  # sentencepiece "loads" empty bytes as a model without pieces
      raise ValueError(f'{source} is not a SentencePiece model: it is empty.')
    processor = spm.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(bytes(proto))
    except RuntimeError as e:
      raise ValueError(f'{source} is not a SentencePiece model: {e}') from e
    return cls(processor, source)

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def mask_id(self) -> int:
    """`<mask>`, the last id: spm_size + 1."""
    return self._spm_size + 1

  @property
  def spm_size(self) -> int:
    """Number of pieces in the SentencePiece model (its own unk/bos/eos included)."""
    return self._spm_size

  @property
  def vocab_size(self) -> int:
    """Number of ids, `<mask>` included: spm_size + 2 (a text embedding needs >= this many rows)."""
    return self._spm_size + 2

  @property
  def special_ids(self) -> frozenset[int]:
    """The ids of <s>, <pad>, </s>, <unk> and <mask>."""
    return frozenset({BOS_ID, PAD_ID, EOS_ID, UNK_ID, self.mask_id})

  def serialized_proto(self) -> bytes:
    """The SentencePiece model as bytes (what `save_spm` writes)."""
    return self._sp.serialized_model_proto()

  def tokenize(self, text: str) -> list[str]:
    """The sentencepiece pieces of `text` (e.g. '▁red'); unknown ones are shown as they are."""
    return self._sp.encode(_check_text(text), out_type=str)

  def encode(self, text: str) -> list[int]:
    """The ids of the pieces of `text`: no <s>/</s>, unknown pieces as `unk_id` (3)."""
    return _to_xlmr(self._sp.encode(_check_text(text), out_type=int)).tolist()

  def encode_sequence(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`<s>` + pieces + `</s>`, cut to `max_len` (keeping `</s>`) and padded with `pad_id`.

    Returns:
      ids: (max_len,) int32.
      padding_mask: (max_len,) bool, True = padding.
    """
    # One string, not a list of one: the list form starts a thread pool on every call, which
    # in a data worker costs a thread start per example and stalls the other workers' cores.
    ids, padding_mask = self._pack([self._sp.encode(_check_text(text), out_type=int)],
                                   _check_max_len(max_len))
    return ids[0], padding_mask[0]

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`encode_sequence` for a batch, with sentencepiece's (multithreaded) batch encoder.

    Each text keeps at most max_len - 2 pieces, as in BEiT-3's `_get_text_segment`.

    Returns:
      ids: (B, max_len) int32.
      padding_mask: (B, max_len) bool, True = padding.
    """
    max_len = _check_max_len(max_len)
    if isinstance(texts, (str, bytes)):
      raise TypeError('encode_batch takes a sequence of texts; use encode_sequence for one.')
    texts = [_check_text(t) for t in texts]
    return self._pack(self._sp.encode(texts, out_type=int) if texts else [], max_len)

  @staticmethod
  def _pack(pieces: Sequence[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """sentencepiece ids per text -> (ids (B, max_len) int32, padding_mask (B, max_len) bool)."""
    ids = np.full((len(pieces), max_len), PAD_ID, np.int32)
    lengths = np.empty((len(pieces),), np.int32)
    for row, piece_ids in enumerate(pieces):
      n = min(len(piece_ids), max_len - 2)
      ids[row, 0] = BOS_ID
      ids[row, 1:n + 1] = _to_xlmr(piece_ids[:n])
      ids[row, n + 1] = EOS_ID
      lengths[row] = n + 2
    padding_mask = np.arange(max_len)[None, :] >= lengths[:, None]
    return ids, padding_mask

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of 1-D `ids`, with the special ids (padding, <unk>, <mask>, ...) dropped."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f'decode takes a 1-D sequence of int ids, got shape {ids.shape}, '
                       f'dtype {ids.dtype}.')
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f'ids out of range [0, {self.vocab_size}): {bad[:8].tolist()}')
    keep = ids[~np.isin(ids, list(self.special_ids))]
    return self._sp.decode((keep - 1).tolist())


def _check_text(text) -> str:
  if not isinstance(text, str):
    raise TypeError(f'text must be a str, got {type(text).__name__}.')
  return text


def _check_max_len(max_len) -> int:
  if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)):
    raise TypeError(f'max_len must be an int, got {type(max_len).__name__}.')
  if max_len < 2:
    raise ValueError(f'max_len must be >= 2 (room for <s> and </s>), got {max_len}.')
  return int(max_len)


def _to_xlmr(spm_ids) -> np.ndarray:
  """Sentencepiece piece ids -> XLM-R ids (int32): unk 0 -> 3, every other piece p -> p + 1."""
  spm_ids = np.asarray(spm_ids, np.int32)
  return np.where(spm_ids == _SPM_UNK, UNK_ID, spm_ids + 1).astype(np.int32)


def train_spm(sentences: Iterable[str], vocab_size: int, model_type: str = 'unigram',
              character_coverage: float = 1.0, seed_sentencepiece_size: int = 1_000_000,
              input_sentence_size: int = 0, seed: int = 0, **trainer_kwargs) -> bytes:
  """Trains a SentencePiece model in memory and returns its bytes (a .spm file's contents).

  The model keeps sentencepiece's default special ids (unk 0, bos 1, eos 2, no pad), the layout
  of XLM-R's and BEiT-3's .spm, so `TextTokenizer` maps its ids the same way. Training runs on
  one thread (`num_threads=1`, overridable through `trainer_kwargs`) so that the same sentences
  always give the same bytes (several threads give other bytes). `input_sentence_size` sampling
  is done here, with `seed`: sentencepiece's own sampling is seeded from the OS unless
  `sentencepiece.set_random_generator_seed` was called before its first use in the process, and
  later calls do not change it.

  Note: transformers' XLMRobertaTokenizer (>= 5) turns any .spm into a Unigram tokenizer, so it
  reproduces these ids only for `model_type='unigram'` (the type of XLM-R's and BEiT-3's .spm).

  Args:
    sentences: the training text, one sentence per item.
    vocab_size: number of sentencepiece pieces (unk/bos/eos included); the tokenizer then has
      vocab_size + 2 ids.
    model_type: 'unigram', 'bpe', 'char' or 'word'.
    character_coverage: share of characters covered by the model; the rest become unk.
    seed_sentencepiece_size: number of seed pieces of the unigram trainer.
    input_sentence_size: if > 0, train on that many sentences sampled uniformly (reservoir
      sampling with `seed`) from the input; 0 uses all.
    seed: seed of that sampling.
    **trainer_kwargs: other `SentencePieceTrainer` options (e.g. split_digits=True); not the
      special ids or the input/output options.

  Raises:
    ValueError: no sentences, a bad option, or a vocab_size the text cannot fill.
  """
  if isinstance(sentences, (str, bytes)):
    raise TypeError('sentences must be an iterable of str, not a single str.')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type must be one of {MODEL_TYPES}, got {model_type!r}.')
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 3:
    raise ValueError(f'vocab_size must be an int > 3 (unk, bos, eos + pieces), got {vocab_size!r}.')
  reserved = sorted(_RESERVED_TRAINER_KWARGS & trainer_kwargs.keys())
  if reserved:
    raise ValueError(f'train_spm sets these SentencePieceTrainer options itself: {reserved}.')
  it = iter(sentences)
  if input_sentence_size > 0:
    it = iter(_reservoir_sample(it, input_sentence_size, seed))
  first = next(it, None)
  if first is None:
    raise ValueError('train_spm got no sentences.')
  options = dict(
      vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
      seed_sentencepiece_size=seed_sentencepiece_size, input_sentence_size=0, num_threads=1,
      minloglevel=2)
  options.update(trainer_kwargs)
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], it), model_writer=writer, **options)
  except RuntimeError as e:
    raise ValueError(f'SentencePiece training failed: {e}') from e
  return writer.getvalue()


def _reservoir_sample(items: Iterable[str], k: int, seed: int) -> list[str]:
  """`k` items drawn uniformly from `items` (all of them if fewer), in one pass."""
  rng = random.Random(seed)
  sample = []
  for i, item in enumerate(items):
    if i < k:
      sample.append(item)
    else:
      j = rng.randrange(i + 1)
      if j < k:
        sample[j] = item
  return sample


def save_spm(proto: bytes, path: str | os.PathLike, overwrite: bool = False) -> str:
  """Writes a SentencePiece model to `path` (local, creating its folder, or a gs:// URL) and
  returns the path.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
  """
  path = os.fspath(path)
  if '://' in path:   # one object written whole: no half-written model either
    from etils import epath
    if epath.Path(path).exists() and not overwrite:
      raise FileExistsError(f'{path} already exists; pass overwrite=True to replace it.')
    epath.Path(path).write_bytes(proto)
    return path
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists; pass overwrite=True to replace it.')
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.spm')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(proto)
    os.replace(tmp, path)  # no half-written model if interrupted
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def read_sentences(paths: Sequence[str], on_empty=None) -> Iterator[str]:
  """The non-empty lines (stripped) of UTF-8 text files, one sentence per line.

  `on_empty()`, if given, is called for every empty line (e.g. to count them).
  """
  for path in paths:
    with open(path, encoding='utf-8') as f:
      for line in f:
        line = line.strip()
        if line:
          yield line
        elif on_empty is not None:
          on_empty()


class _Counter:
  """Counts what an iterator yields (the sentences sentencepiece read)."""

  def __init__(self, items: Iterable[str]):
    self.items, self.count = items, 0

  def __iter__(self) -> Iterator[str]:
    for item in self.items:
      self.count += 1
      yield item


def _train_command(args) -> int:
  missing = [p for p in args.input if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'--input file not found: {", ".join(missing)}')
  if os.path.exists(args.output) and not args.overwrite:
    raise FileExistsError(f'{args.output} already exists; pass --overwrite to replace it.')
  sentences = _Counter(read_sentences(args.input))
  proto = train_spm(iter(sentences), args.vocab_size, model_type=args.model_type,
                    character_coverage=args.character_coverage,
                    input_sentence_size=args.input_sentence_size)
  save_spm(proto, args.output, overwrite=args.overwrite)
  tok = TextTokenizer.from_proto(proto, source=args.output)
  used = sentences.count
  if 0 < args.input_sentence_size < sentences.count:
    used = f'{args.input_sentence_size} (sampled from {sentences.count})'
  print(f'Trained a {args.model_type} SentencePiece model on {used} sentences from '
        f'{len(args.input)} file(s): {tok.spm_size} pieces, vocab_size {tok.vocab_size} '
        f'(with <pad> and <mask>), written to {args.output}')
  return 0


def _encode_command(args) -> int:
  tok = TextTokenizer.from_file(args.spm)
  ids, padding_mask = tok.encode_batch(args.text, args.max_len)
  for text, row_ids, row_mask in zip(args.text, ids, padding_mask):
    print(f'text:         {text}')
    print(f'pieces:       {" ".join(tok.tokenize(text))}')
    print(f'ids:          {" ".join(str(i) for i in row_ids)}')
    print(f'padding_mask: {" ".join(str(int(m)) for m in row_mask)}  (1 = padding)')
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m beit3_jax.data.text',
      description='Train a SentencePiece model for BEiT-3, or encode text with one.')
  sub = parser.add_subparsers(dest='command', required=True)
  train = sub.add_parser('train', help='train a .spm from text files (one sentence per line)')
  train.add_argument('--input', action='append', required=True,
                     help='UTF-8 text file, one sentence per line; repeat for more files')
  train.add_argument('--output', required=True, help='the .spm file to write')
  train.add_argument('--vocab_size', type=int, required=True,
                     help='number of sentencepiece pieces (the tokenizer adds <pad> and <mask>)')
  train.add_argument('--model_type', choices=('unigram', 'bpe'), default='unigram')
  train.add_argument('--character_coverage', type=float, default=1.0)
  train.add_argument('--input_sentence_size', type=int, default=0,
                     help='train on this many sentences sampled from the input (0: all)')
  train.add_argument('--overwrite', action='store_true', help='replace an existing --output')
  train.set_defaults(run=_train_command)
  encode = sub.add_parser('encode', help='print the ids and padding mask of text')
  encode.add_argument('--spm', required=True, help='the .spm file')
  encode.add_argument('--max_len', type=int, required=True, help='sequence length, >= 2')
  encode.add_argument('text', nargs='+', help='text to encode')
  encode.set_defaults(run=_encode_command)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (1 with a message on stderr on a bad file/value)."""
  args = _parser().parse_args(argv)
  try:
    return args.run(args)
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # incl. UnicodeDecodeError
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())

"""The batch schema: concrete shapes and the checker's messages."""

import numpy as np
import pytest

from beit3_jax.data import schema

SIZES = dict(B=2, H=64, W=64, T=64, V=64, N=16, L=8, A=5)


def zeros(kind, sizes=SIZES):
  return {k: np.zeros(shape, dtype) for k, (shape, dtype) in schema.shapes(kind, sizes).items()}


@pytest.mark.parametrize('kind', sorted(schema.SCHEMAS))
def test_every_kind_has_concrete_shapes_that_pass_the_check(kind):
  batch = zeros(kind)
  schema.check(kind, batch, SIZES)
  for key, field in schema.SCHEMAS[kind].items():
    assert batch[key].ndim == len(field.dims)


def test_pair_stream_layout():
  shapes = schema.shapes('pair', SIZES)
  assert shapes['image'] == ((2, 64, 64, 3), np.dtype('uint8'))
  assert shapes['image_mask'] == ((2, 16), np.dtype('bool'))
  assert shapes['flip'] == ((2,), np.dtype('bool'))
  assert shapes['jitter'] == ((2, 3), np.dtype('float32'))
  assert shapes['jitter_order'] == ((2, 3), np.dtype('int32'))
  # The host reference layout: both views made on the host.
  reference = schema.shapes(schema.REFERENCE_SCHEMAS['pair'], SIZES)
  assert reference['tokenizer_image'] == ((2, 64, 64, 3), np.dtype('uint8'))
  assert 'jitter' not in reference
  assert shapes['text_ids'] == ((2, 8), np.dtype('int32'))
  assert set(schema.PRETRAINING_STREAMS) <= set(schema.SCHEMAS)


def test_check_names_every_problem():
  batch = zeros('text')
  batch['text_ids'] = batch['text_ids'].astype(np.int64)
  batch['text_mask'] = np.zeros((2, 9), bool)
  del batch['text_targets']
  batch['extra'] = np.zeros(3)
  with pytest.raises(ValueError) as e:
    schema.check('text', batch, SIZES)
  msg = str(e.value)
  for part in ('missing text_targets', 'unexpected extra', 'text_ids has dtype int64',
               'text_mask has shape (2, 9)'):
    assert part in msg, msg
  with pytest.raises(KeyError, match='needs the size'):
    schema.shapes('image', {'B': 1})
  with pytest.raises(KeyError, match='Unknown batch kind'):
    schema.check('video', {})

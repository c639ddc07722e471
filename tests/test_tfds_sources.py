"""Opening prepared TFDS data sets by name, and the errors when they are not there."""

import time

import pytest

from beit3_jax.data import local_files, tfds_sources


def test_missing_dataset_fails_at_once_with_instructions(tmp_path):
  start = time.perf_counter()
  with pytest.raises(tfds_sources.DatasetNotPreparedError) as e:
    tfds_sources.open_source('coco_captions/2017', 'train', str(tmp_path))
  assert time.perf_counter() - start < 5  # no download attempt
  assert 'tfds build coco_captions' in str(e.value) and str(tmp_path) in str(e.value)
  with pytest.raises(ValueError, match='name'):
    tfds_sources.open_source('Bad Name!', 'train', str(tmp_path))


def test_opens_a_prepared_dataset_by_name_and_checks_the_split(tmp_path):
  (tmp_path / 'a.txt').write_text('one\ntwo\n')
  local_files.build_text('corpus', {'train': [str(tmp_path / 'a.txt')]},
                         data_dir=str(tmp_path / 'data'))
  tfds_dir = str(tmp_path / 'data' / 'tfds')
  for name in ('corpus', 'corpus:1.0.0'):
    src = tfds_sources.open_source(name, 'train', tfds_dir)
    assert len(src) == 2 and src[1]['text'] == b'two'
  with pytest.raises(KeyError, match='validation'):
    tfds_sources.open_source('corpus', 'validation', tfds_dir)
  with pytest.raises(tfds_sources.DatasetNotPreparedError):
    tfds_sources.open_source('corpus:2.0.0', 'train', tfds_dir)

"""Preparing the built-in data (tiny sizes): the data sets, the demo .spm, reuse."""

import os
import shutil

import numpy as np
import tensorflow_datasets as tfds

from beit3_jax.data import builtin, paths, synthetic_world, tfds_sources
from beit3_jax.data import text as text_lib
from beit3_jax.data.builders import synthetic_world_builder


def test_prepare_builds_once_then_reuses(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / 'env_dir'))
  sizes = {'train': 200, 'validation': 4, 'test': 4}
  data = builtin.prepare_builtin(num_examples=sizes)  # the env var's data dir
  assert data.tfds_dir == str(tmp_path / 'env_dir' / 'tfds')
  assert os.path.exists(data.spm_path)
  first = capsys.readouterr().out
  assert 'Trained the SentencePiece model' in first
  spm_mtime = os.path.getmtime(data.spm_path)

  again = builtin.prepare_builtin(num_examples=sizes)
  out = capsys.readouterr().out
  assert 'Reusing the SentencePiece model' in out and out.count('Reusing') == 4
  assert again == data and os.path.getmtime(data.spm_path) == spm_mtime

  tokenizer = text_lib.TextTokenizer.from_file(data.spm_path)
  source = tfds.data_source(data.names['images'], data_dir=data.tfds_dir, split='train')
  caption = source[0]['captions'][0].decode()
  assert tokenizer.unk_id not in tokenizer.encode(caption)
  rng = np.random.default_rng(5)
  for _ in range(20):
    assert tokenizer.unk_id not in tokenizer.encode(synthetic_world.text_corpus_sentence(rng))

  # The names pin this code's version: a newer build in the same data dir (from a newer
  # checkout) is not read in its place.
  version = str(synthetic_world_builder.SyntheticWorld.VERSION)
  assert data.names['images'].endswith(':' + version)
  folder = tfds_sources.dataset_dir(data.names['images'], data.tfds_dir)
  shutil.copytree(folder, folder.parent / '99.0.0')
  assert tfds_sources.dataset_dir(data.names['images'], data.tfds_dir) == folder
  unpinned = data.names['images'].split(':')[0]
  assert tfds_sources.dataset_dir(unpinned, data.tfds_dir).name == '99.0.0'


def test_config_data_dir_wins_over_env(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / 'env_dir'))
  assert paths.resolve_data_dir(str(tmp_path / 'cfg')) == str(tmp_path / 'cfg')
  assert paths.default_data_dir() == str(tmp_path / 'env_dir')
  monkeypatch.delenv(paths.ENV_VAR)
  assert paths.default_data_dir().endswith(os.path.join('.cache', 'beit3_jax'))

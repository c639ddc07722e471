"""Opening the TFDS splits a job reads, with a split the data set lacks refused by name.

Jobs open every split they will read (training and evaluation) when they are built, before
anything compiles, so that a missing one stops the run at once instead of at its first
evaluation.
"""

from __future__ import annotations

from beit3_jax.data import tfds_sources
from beit3_jax.defaults import ConfigError

HELD_OUT_HINT = ('a held-out slice such as "train[99.9%:]" (with "train[:99.9%]" to train on) '
                 'serves where a data set has no validation split')


def open_split(name: str, split: str, field: str, tfds_dir):
  """`tfds_sources.open_source(name, split, tfds_dir)`; a split the data set lacks is a
  ConfigError naming the config `field` that chose it."""
  try:
    return tfds_sources.open_source(name, split, tfds_dir)
  except tfds_sources.MissingSplitError as e:
    raise ConfigError(f'{field}={split!r}: {e} Set {field} ({HELD_OUT_HINT}).') from None

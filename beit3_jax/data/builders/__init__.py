"""TFDS builders of the project's built-in data sets.

- `synthetic_world_builder`: the synthetic world (images with captions, labels and questions;
  NLVR2-style image pairs; a text corpus). Import it (or call its `prepare`) to register the
  builders with TFDS; reading a prepared data set back with `tfds.data_source` needs no import.
"""

"""The built-in data: the synthetic world's TFDS data sets and the demo's SentencePiece model.

`prepare_builtin()` builds, on first use, into the default data dir (`paths.default_data_dir()`:
$BEIT3_JAX_DATA_DIR or ~/.cache/beit3_jax; a config's `data_dir` overrides it):

    <data_dir>/tfds/beit3_synthetic_world/64px/...        images, captions, labels, VQA
    <data_dir>/tfds/beit3_synthetic_world_nlvr2/64px/...  NLVR2-style pairs of images
    <data_dir>/tfds/beit3_synthetic_world_text/...        the text corpus
    <data_dir>/spm/synthetic_world.spm                    trained on the corpus's train split

and reuses what is there afterwards. Command line: `python -m beit3_jax.data.builtin
[--data_dir DIR] [--image_size 64]` prints what it built or reused and where.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from etils import epath

from beit3_jax.data import paths
from beit3_jax.data import text as text_lib
from beit3_jax.data.builders import synthetic_world_builder

SPM_NAME = 'synthetic_world.spm'
# The world has about a hundred distinct words; SentencePiece caps a unigram vocabulary at what
# the text supports, so this is an upper bound (hard_vocab_limit=False).
SPM_VOCAB_SIZE = 256


@dataclasses.dataclass(frozen=True)
class BuiltinData:
  """Where the built-in data lives."""
  tfds_dir: str
  names: dict[str, str]        # 'images' / 'nlvr2' / 'text' -> TFDS 'name/config:version'
  spm_path: str


def prepare_builtin(data_dir: str | None = None, image_size: int = 64, *,
                    num_examples: dict[str, int] | None = None, seed: int = 0,
                    verbose: bool = True) -> BuiltinData:
  """Builds (or reuses) the synthetic world data sets and the demo .spm; returns their paths.

  Args:
    data_dir: the project data dir (default: `paths.default_data_dir()`).
    image_size: 64 (default, builds in about half a minute on 2 cores) or 224.
    num_examples: split sizes ({'train': ..., 'validation': ..., 'test': ...}) for a small
      build, e.g. in tests; default: the builder's sizes.
    seed: the world's seed.
  """
  builders = synthetic_world_builder.prepare(data_dir=data_dir, image_size=image_size,
                                             num_examples=num_examples, seed=seed)
  # The version is pinned: a data dir may also hold a build of another version of the code, and
  # a name without one reads the newest there.
  names = {which: f'{b.name}/{b.builder_config.name}:{b.version}' for which, b in builders.items()}
  spm_path = paths.join(paths.spm_dir(data_dir), SPM_NAME)
  if epath.Path(spm_path).exists():
    if verbose:
      print(f'Reusing the SentencePiece model {spm_path}')
  else:
    start = time.perf_counter()
    source = builders['text'].as_data_source('train')
    sentences = (source[i]['text'].decode('utf-8') for i in range(len(source)))
    proto = text_lib.train_spm(sentences, vocab_size=SPM_VOCAB_SIZE, hard_vocab_limit=False)
    text_lib.save_spm(proto, spm_path)
    if verbose:
      tokenizer = text_lib.TextTokenizer.from_proto(proto)
      print(f'Trained the SentencePiece model {spm_path} ({tokenizer.spm_size} pieces) on '
            f'{len(source)} sentences in {time.perf_counter() - start:.1f} s')
  return BuiltinData(tfds_dir=paths.tfds_dir(data_dir), names=names, spm_path=spm_path)


BUILTIN_PREFIX = 'builtin:'


def resolve_names(names: dict[str, str], data_dir: str | None = None, image_size: int = 64,
                  spm_path: str = '') -> tuple[str, dict[str, str], str]:
  """(TFDS dir, names with 'builtin:<which>' replaced by the built-in TFDS name, spm path).

  Names like 'builtin:images' / 'builtin:text' / 'builtin:nlvr2' build (or reuse) the built-in
  data first; other names are TFDS names under `paths.tfds_dir(data_dir)`. `spm_path` falls
  back to the built-in .spm when the built-in data is used.
  """
  names = dict(names)
  if not any(n.startswith(BUILTIN_PREFIX) for n in names.values()):
    return paths.tfds_dir(data_dir), names, spm_path
  builtin = prepare_builtin(data_dir, image_size=image_size)
  for key, name in names.items():
    if name.startswith(BUILTIN_PREFIX):
      which = name[len(BUILTIN_PREFIX):]
      if which not in builtin.names:
        raise ValueError(f'{key}={name!r}: the built-in data has {sorted(builtin.names)}.')
      names[key] = builtin.names[which]
  return builtin.tfds_dir, names, spm_path or builtin.spm_path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m beit3_jax.data.builtin',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data_dir', default=None,
                      help=f'project data dir (default ${paths.ENV_VAR} or ~/.cache/beit3_jax)')
  parser.add_argument('--image_size', type=int, default=64)
  args = parser.parse_args(argv)
  data = prepare_builtin(args.data_dir, args.image_size)
  print(f'TFDS data dir: {data.tfds_dir}')
  for which, name in data.names.items():
    print(f'  {which:7s} {name}')
  print(f'SentencePiece model: {data.spm_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

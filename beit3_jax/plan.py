"""Plan a run on a TPU slice without a TPU: `python -m beit3_jax.plan`.

    python -m beit3_jax.plan --config=configs/pretrain/giant.py --topology=v5p-512 [--json]
        [--num_slices=2] [--config.model.remat_policy=full ...]

compiles the config's real train step for the slice with XLA's TPU compiler (libtpu:
`bash launch/setup_venv.sh tpu`, or `pip install 'jax[tpu]'`; no TPU is used or needed) and
prints, per chip: parameters, optimizer state, batch and temporaries, the peak against the
chip's HBM and whether it fits with 10% headroom, the compile time, the HLO FLOPs, the model
FLOPs and the roofline bound on the step time with the MFU it implies
(`beit3_jax.planning.planner`). `--json` prints one JSON object instead. A mesh that does not
match the slice, or a batch that does not split over it, is an error naming the field.
--topology is a gcloud accelerator type (v4-128, v5p-512, v5litepod-64, v6e-256) or a topology
(v5p:4x8x8); --num_slices plans a multislice run (data parallel across slices over DCN).
Runs on the host's CPU; a plan of a large model can take minutes and over 10 GB of memory.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # the host compiles; it needs no accelerator

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402

from beit3_jax import defaults  # noqa: E402
from beit3_jax import main as main_lib  # noqa: E402  (its --config flag)
from beit3_jax.planning import planner, slices  # noqa: E402

_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice: v5p-512, v4-8, v6e:16x16, ... '
                                '(default: the config\'s tpu_slice)')
_NUM_SLICES = flags.DEFINE_integer('num_slices', 1, 'slices of a multislice run')
_JSON = flags.DEFINE_bool('json', False, 'print one JSON object')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = main_lib._CONFIG.value  # pylint: disable=protected-access
  topology = _TOPOLOGY.value or (config.get('tpu_slice', '') if config is not None else '')
  if config is None or not topology:
    raise app.UsageError('--config is required, and --topology unless the config names its '
                         'slice (tpu_slice), e.g. --config=configs/pretrain/base.py '
                         '--topology=v5p-128')
  source = flags.FLAGS['config'].config_filename
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  jax.config.update('jax_enable_compilation_cache', False)   # compile times are real ones
  try:
    defaults.check_fields(config, source=source)
    tpu = slices.parse(topology, _NUM_SLICES.value)
    plan = planner.make_plan(config, tpu)
  except (defaults.ConfigError, ValueError, RuntimeError) as e:
    raise SystemExit(f'Error: {e}') from None
  if _JSON.value:
    print(json.dumps({'config': source, **plan.to_json()}, indent=1))
  else:
    print(f'Plan of {source}')
    for line in planner.describe(plan):
      print(line)
  return 0


if __name__ == '__main__':
  sys.exit(app.run(main, flags_parser=main_lib.parse_flags))

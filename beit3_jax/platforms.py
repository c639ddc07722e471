"""Which JAX platform the command-line tools use on a host without accelerators.

JAX starts every backend plugin it finds. With libtpu installed (the `test` and `tpu` extras
bring it, for `beit3_jax.plan`) but no TPU present, that prints warnings about missing TPU
metadata before falling back to the CPU. The CLIs call `cpu_unless_accelerators()` first
thing (before any JAX backend starts): on a host with no TPU (/dev/accel*, /dev/vfio) and no
NVIDIA GPU device they use the CPU directly. An explicit JAX_PLATFORMS is always kept.
"""

from __future__ import annotations

import glob
import os

import jax

ACCELERATOR_DEVICES = ('/dev/accel*', '/dev/vfio/*', '/dev/nvidia[0-9]*')


def cpu_unless_accelerators() -> None:
  if 'JAX_PLATFORMS' in os.environ or any(glob.glob(p) for p in ACCELERATOR_DEVICES):
    return
  os.environ['JAX_PLATFORMS'] = 'cpu'        # child processes
  jax.config.update('jax_platforms', 'cpu')  # this one (read when the first backend starts)

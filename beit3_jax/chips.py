"""What one accelerator chip can do: peak FLOP/s, HBM capacity and bandwidth.

The one table the MFU report (`trainer/flops.py`) and the planner (`beit3_jax.plan`) read.
TPU figures are Google Cloud's published per-chip ones (cloud.google.com/tpu/docs/v4, /v5p,
/v5e, /v6e); GPU peaks are NVIDIA's dense bfloat16 figures.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip: dense bfloat16 peak (FLOP/s), HBM (bytes), HBM bandwidth (bytes/s)."""
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  device_kinds: tuple[str, ...]   # jax `device_kind` prefixes of this chip
  three_d: bool = False           # a 3-D torus (v4, v5p) rather than 2-D
  megacore: bool = False          # two TensorCores run as one device

  @property
  def ridge(self) -> float:
    """FLOP per byte of HBM traffic above which a step is compute-bound."""
    return self.peak_flops / self.hbm_bandwidth


GIB = 2 ** 30

CHIPS: dict[str, Chip] = {
    'v4': Chip(275e12, 32 * GIB, 1228e9, ('TPU v4',), three_d=True, megacore=True),
    'v5e': Chip(197e12, 16 * GIB, 819e9, ('TPU v5 lite', 'TPU v5e')),
    'v5p': Chip(459e12, 95 * GIB, 2765e9, ('TPU v5p', 'TPU v5'), three_d=True, megacore=True),
    'v6e': Chip(918e12, 32 * GIB, 1640e9, ('TPU v6 lite', 'TPU v6e')),
}

# Dense bfloat16 peak FLOP/s per chip by jax device_kind prefix, for the MFU report.
PEAK_FLOPS = {kind: chip.peak_flops for chip in CHIPS.values() for kind in chip.device_kinds}
PEAK_FLOPS.update({'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12})


def peak_flops_of(device_kind: str) -> float | None:
  """The peak of a jax `device_kind` (longest matching prefix), or None (e.g. a CPU)."""
  for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if device_kind.startswith(prefix):
      return flops
  return None

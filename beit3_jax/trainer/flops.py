"""Model FLOP utilisation (MFU): the peak FLOP/s of a device.

    MFU = (training FLOPs per step / step seconds) / (devices * peak FLOP/s per device)

The training FLOPs per step come from the job (`beit3_jax.models.flops`: forward FLOPs of the
models, 3x for what is trained, 1x for frozen parts).
"""

from __future__ import annotations

import jax

from beit3_jax import chips

def peak_flops_per_device(override: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: `override` if > 0, else the table by device kind
  (`beit3_jax.chips`), else None (e.g. CPUs, whose peak depends on the machine: set the
  config's `peak_tflops_per_device`)."""
  if override and override > 0:
    return float(override)
  return chips.peak_flops_of(jax.devices()[0].device_kind)

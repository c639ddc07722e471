"""Model FLOP utilisation (MFU): the peak FLOP/s of a device.

    MFU = (training FLOPs per step / step seconds) / (devices * peak FLOP/s per device)

The training FLOPs per step come from the job (`beit3_jax.models.flops`: forward FLOPs of the
models, 3x for what is trained, 1x for frozen parts).
"""

from __future__ import annotations

import jax

# Dense bfloat16 peak FLOP/s per chip (vendor figures), by jax device_kind prefix.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: `override` if > 0, else the table by device kind, else None
  (e.g. CPUs, whose peak depends on the machine: set the config's `peak_tflops_per_device`)."""
  if override and override > 0:
    return float(override)
  kind = jax.devices()[0].device_kind
  for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return flops
  return None

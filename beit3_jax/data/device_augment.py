"""The device half of the pretraining image augmentation (jax.numpy, batched, works under jit).

What moved and why: on TPU hosts the host CPU, not the accelerator, limits the pretraining input
pipeline. `image_ops.augment` resizes every crop twice (bicubic model view, lanczos tokenizer
view) and runs the colour jitter on both views in NumPy. With `image_ops.augment_for_device` the
host makes one uint8 view, the tokenizer's (lanczos), and draws the flip and jitter parameters;
inside the jitted train step `finish_images` flips, applies the colour jitter
(`apply_color_jitter`), rounds to
whole pixel values as the reference's uint8 images are, and derives the model's view from the
jittered view (`model_view_from`: the same pixels at equal sizes, else a bicubic resize). The
host functions stay the reference implementation.

Measured differences from the host reference (tests/test_device_augment.py prints them;
photo-like JPEGs of 320 x 240 to 500 x 375, quality 90, CPU):
  * Colour jitter: the float32 device result is within 0.5 (0..255 units) of the host's uint8
    result before the rounding (2e-6 of the values differ by 1 after it), over 67 draws covering
    every op order and factors at the range ends 0.6 and 1.4. A factor of 1.0 is an exact
    identity.
  * Tokenizer view: the reference's pixels, jittered and rounded here: equal to the host's on
    all but 3-5 in 10,000 values, which differ by 1/255 (the reference takes the contrast mean
    from its model view).
  * Model view: a lanczos rather than bicubic resample of the crop at equal sizes (224/224):
    mean absolute difference 0.18/255 in [0, 1] pixel units (largest single differences, about
    14/255, on hard edges); 0.47/255 for a 224 px model view from a 256 px tokenizer view.
  * Visual tokens: the demo tokenizer (configs/pretrain/tokenizer_demo.py, 243 codes in use)
    gives the same code on 100% of 32,768 patches of built-in-world crops without jitter and on
    99.95% with jitter 0.4.
  * JPEG draft decoding of large crops (`image_ops.augment_for_device`): 0.29/255 mean absolute
    difference from the full decode at a 1/4 DCT scale (2000 x 1500 photo, 224 px view).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.data import image_ops
from beit3_jax.data.image_ops import BEIT3_MEAN, BEIT3_STD

# ITU-R 601-2 luma weights, as image_ops (and PIL's convert('L')).
_LUMA = (0.299, 0.587, 0.114)


def _luma(x: jax.Array) -> jax.Array:
  # Elementwise rather than a matmul: a float32 dot runs at bfloat16 precision on TPU by default.
  return x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]


def apply_color_jitter(images: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """Colour jitter per example, with the semantics of the host `image_ops.apply_color_jitter`.

  Each op is the affine map f * x + (1 - f) * g followed by a clip to [0, 255], with g = 0 for
  brightness, g = mean luma of the image at that point of the chain for contrast, and g = the
  pixel's luma for saturation (luma = 0.299 R + 0.587 G + 0.114 B). The host clips only when
  f > 1; for f <= 1 the op cannot leave the range, so clipping always is the same. A factor of
  1.0 is an exact identity. Hue is not supported (the recipe keeps it off).

  Args:
    images: float32 (B, H, W, 3) in [0, 255] (uint8 is converted).
    factors: float32 (B, 3), the factor of each op by id (0 brightness, 1 contrast,
      2 saturation), as from `image_ops.encode_jitter`.
    order: int32 (B, 3), the op ids in application order (a permutation of 0, 1, 2).

  Returns:
    float32 (B, H, W, 3) in [0, 255], not rounded.
  """
  x = jnp.asarray(images).astype(jnp.float32)
  factors = jnp.asarray(factors, jnp.float32)
  order = jnp.asarray(order, jnp.int32)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'expected images (B, H, W, 3), got {x.shape}')
  if factors.shape != (x.shape[0], 3) or order.shape != (x.shape[0], 3):
    raise ValueError(f'expected factors and order of shape ({x.shape[0]}, 3), got '
                     f'{factors.shape} and {order.shape}')
  for step in range(3):
    op = order[:, step]  # (B,)
    f = jnp.take_along_axis(factors, op[:, None], axis=1)[:, 0]  # (B,)
    gray = _luma(x)  # (B, H, W)
    mean = jnp.mean(gray, axis=(1, 2))  # (B,)
    op3 = op[:, None, None]
    g = jnp.where(op3 == 0, 0.0, jnp.where(op3 == 1, mean[:, None, None], gray))
    f4 = f[:, None, None, None]
    x = jnp.clip(f4 * x + (1.0 - f4) * g[..., None], 0.0, 255.0)
  return x


def tokenizer_view_from(images: jax.Array, size: int) -> jax.Array:
  """The VQ-KD tokenizer input derived from the (jittered) model view.

  Args:
    images: float32 (B, H, W, 3) in [0, 255] (uint8 is converted).
    size: tokenizer view side in pixels.

  Returns:
    float32 (B, size, size, 3) in [-1, 1]: the images (resampled with antialiased lanczos3 when
    (size, size) != (H, W)) mapped by x / 127.5 - 1 and clipped (lanczos overshoots). Written as
    (x - 127.5) / 127.5, the operations of `image_ops.tokenizer_view`, so at equal size the
    result on integer pixels equals `tokenizer_view` of the same jax batch bit for bit.
  """
  x = jnp.asarray(images).astype(jnp.float32)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'expected images (B, H, W, 3), got {x.shape}')
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f'size must be a positive int, got {size!r}')
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), 'lanczos3', antialias=True)
  return jnp.clip((x - np.float32(127.5)) / np.float32(127.5), -1.0, 1.0)


def _normalize_float(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """`image_ops.normalize` on float32 pixels in [0, 255] (same constants, same operations)."""
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  if mean.shape != (x.shape[-1],) or mean.shape != std.shape or np.any(std <= 0):
    raise ValueError(f'bad mean/std for {x.shape[-1]} channels: {mean}, {std}')
  return (x - (255.0 * mean).astype(np.float32)) / (255.0 * std).astype(np.float32)


def model_view_from(images: jax.Array, size: int) -> jax.Array:
  """The model's view from the (jittered) host view: the same pixels at equal size, else an
  antialiased bicubic resize (the reference's model interpolation), clipped to [0, 255].

  Args:
    images: float32 (B, V, V, 3) in [0, 255].
    size: the model's image side S in pixels.

  Returns:
    float32 (B, S, S, 3) in [0, 255].
  """
  if images.shape[1:3] == (size, size):
    return images
  out = jax.image.resize(images, (images.shape[0], size, size, 3), 'bicubic', antialias=True)
  return jnp.clip(out, 0.0, 255.0)


def finish_images(stream_batch: Mapping[str, Any], *, model_size: int | None = None,
                  tokenizer_size: int | None = None,
                  mean: Sequence[float] = BEIT3_MEAN, std: Sequence[float] = BEIT3_STD
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Finishes a batch from `image_ops.augment_for_device` on the device (call it under jit).

  Args:
    stream_batch: {'image': uint8 (B, V, V, 3), the host view; optional 'flip': bool (B,),
      mirror left-right; optional 'jitter': float32 (B, 3) and 'jitter_order': int32 (B, 3)
      (absent: no jitter); optional 'tokenizer_image':
      uint8 (B, T, T, 3), a host-made tokenizer view (the `augment` layout), used as is}.
    model_size: the model's image side S (None: V).
    tokenizer_size: tokenizer view side T, or None for no tokenizer view unless the batch holds
      'tokenizer_image'.
    mean: per-channel mean in [0, 1] units, as `image_ops.normalize`.
    std: per-channel std in [0, 1] units.

  Returns:
    (model_images float32 (B, S, S, 3), normalised as `image_ops.normalize`; tokenizer_images
    float32 (B, T, T, 3) in [-1, 1], or None). On uint8 input without jitter at S = V the model
    images equal `image_ops.normalize` of the same jax batch bit for bit (both are the same
    operations; XLA divides by a constant through its reciprocal, so either may differ from
    NumPy's `normalize` by 1 ulp).
  """
  images = stream_batch['image']
  if images.dtype != np.uint8:
    raise TypeError(f"expected uint8 'image', got {images.dtype}")
  jitter = stream_batch.get('jitter')
  jitter_order = stream_batch.get('jitter_order')
  if (jitter is None) != (jitter_order is None):
    raise ValueError("'jitter' and 'jitter_order' must come together")
  x = jnp.asarray(images).astype(jnp.float32)
  flip = stream_batch.get('flip')
  if flip is not None:
    x = jnp.where(jnp.asarray(flip)[:, None, None, None], x[:, :, ::-1], x)
  if jitter is not None:
    # Rounded to whole pixel values as the reference's uint8 images are: the visual tokens of
    # a fine codebook change with sub-pixel differences (demo tokenizer: 98.9% of the codes
    # equal unrounded, 99.9% rounded).
    x = jnp.floor(apply_color_jitter(x, jitter, jitter_order) + 0.5)
  model_images = _normalize_float(model_view_from(x, model_size or x.shape[1]), mean, std)
  host_view = stream_batch.get('tokenizer_image')
  if host_view is not None:
    if tokenizer_size is not None and tuple(host_view.shape[1:3]) != (tokenizer_size,) * 2:
      raise ValueError(f"'tokenizer_image' has shape {host_view.shape}, expected side "
                       f'{tokenizer_size}')
    return model_images, image_ops.tokenizer_view(jnp.asarray(host_view))
  if tokenizer_size is None:
    return model_images, None
  return model_images, tokenizer_view_from(x, tokenizer_size)

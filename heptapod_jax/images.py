"""Image grids that a person can look at: PNG files and arrays for TensorBoard."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from heptapod_jax.storage import paths


def to_uint8(images) -> np.ndarray:
  """float[..., 3] in [-1, 1] -> uint8 (rounded, clipped)."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, min_tile: int = 64) -> np.ndarray:
  """uint8[N, H, W, 3] -> one uint8 image of ceil(N / ncols) rows.

  Tiles smaller than `min_tile` pixels are enlarged by an integer factor
  (nearest neighbour) so that tiny images (32x32 digits) stay legible.
  """
  n, h, w, c = images.shape
  scale = max(1, -(-min_tile // max(h, w)))
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return grid


def png_bytes(image: np.ndarray) -> bytes:
  """uint8[H, W, 3] encoded as PNG."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def save_png(image: np.ndarray, path: str) -> str:
  """Writes uint8[H, W, 3] as PNG to a local path or a URL (whole or not at all); returns the
  path."""
  paths.write_bytes(path, png_bytes(image))
  return path

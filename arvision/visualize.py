"""Image grids as PNG (Pillow)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, rounding as the official samplers do ((x+1)/2*255)."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def grid(images_uint8: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
  """Tiles [N, H, W, C] uint8 images into rows of `nrow` images."""
  images = np.asarray(images_uint8)
  n, h, w, c = images.shape
  ncol = -(-n // nrow)
  out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, nrow)
    out[
      pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
    ] = images[i]
  return out


def save_grid(path: str, images_uint8: np.ndarray, nrow: int, scale: int = 1) -> None:
  g = grid(images_uint8, nrow)
  img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)

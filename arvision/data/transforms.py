"""Per-example preprocessing (numpy + Pillow): the VAR recipe, as grain transforms.

Train: [hflip] -> resize the short side to `round(resize_ratio * image_size)` (Pillow LANCZOS, long
side `int(short * long / short_in)`) -> random crop `image_size` -> [-1, 1]. Eval: the same resize
-> center crop -> [-1, 1]. This is VAR's torchvision pipeline (`RandomHorizontalFlip`,
`Resize(mid_reso, LANCZOS)`, `RandomCrop`/`CenterCrop`, `ToTensor`, `x + x - 1`) step for step, so
the same image gives the same pixels.

Randomness comes only from the `np.random.Generator` grain hands to `RandomMap.random_map`, which
grain seeds per record index: a resumed iterator reproduces the same crops and flips.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from PIL import Image

Example = dict[str, Any]


def check_config(data_config) -> None:
  """Validates the fields the transforms use; errors name the field and what is accepted."""
  if data_config.image_size < 1:
    raise ValueError(f"config.data.image_size={data_config.image_size} must be >= 1")
  if data_config.channels not in (1, 3):
    raise ValueError(
      f"config.data.channels={data_config.channels} is not supported; accepted: 1, 3"
    )
  if round(data_config.resize_ratio * data_config.image_size) < data_config.image_size:
    raise ValueError(
      f"config.data.resize_ratio={data_config.resize_ratio} must be >= 1 (the resized short side "
      "must cover the crop)"
    )


def convert_channels(image_HxWxC: np.ndarray, channels: int) -> np.ndarray:
  """uint8 HxWx{1,3,4} -> HxWx`channels`: grey is replicated to RGB, RGB(A) -> L uses Pillow's luma."""
  c = image_HxWxC.shape[-1]
  if c == channels:
    return image_HxWxC
  if c == 1 and channels == 3:
    return np.repeat(image_HxWxC, 3, axis=-1)
  if c in (3, 4) and channels in (1, 3):
    mode = "L" if channels == 1 else "RGB"
    out = np.asarray(Image.fromarray(image_HxWxC, "RGB" if c == 3 else "RGBA").convert(mode))
    return out[..., None] if out.ndim == 2 else out
  raise ValueError(f"cannot convert an image with {c} channels to config.data.channels={channels}")


def _to_pil(image_HxWxC: np.ndarray) -> Image.Image:
  if image_HxWxC.shape[-1] == 1:
    return Image.fromarray(image_HxWxC[..., 0], "L")
  return Image.fromarray(image_HxWxC, "RGB")


def _from_pil(im: Image.Image) -> np.ndarray:
  out = np.asarray(im)
  return out[..., None] if out.ndim == 2 else out


def resize_short_side(image_HxWxC: np.ndarray, short: int) -> np.ndarray:
  """Resizes so that the short side is `short` (torchvision `Resize(int)` sizing, Pillow LANCZOS)."""
  h, w = image_HxWxC.shape[:2]
  if h <= w:
    new_h, new_w = short, int(short * w / h)
  else:
    new_h, new_w = int(short * h / w), short
  if (new_h, new_w) == (h, w):
    return image_HxWxC
  return _from_pil(_to_pil(image_HxWxC).resize((new_w, new_h), Image.Resampling.LANCZOS))


def center_crop(image_HxWxC: np.ndarray, size: int) -> np.ndarray:
  """torchvision `CenterCrop`: offsets `int(round((h - size) / 2))` (Python rounding)."""
  h, w = image_HxWxC.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image_HxWxC[top : top + size, left : left + size]


def normalize(image_u8: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1], as `ToTensor()` then `x + x - 1` (bit-identical in float32)."""
  x = image_u8.astype(np.float32) / np.float32(255.0)
  return x + x - np.float32(1.0)


class _Preprocess:
  def __init__(self, image_size: int, resize_ratio: float, channels: int):
    self.image_size, self.channels = int(image_size), int(channels)
    self.mid_size = int(round(resize_ratio * image_size))

  @classmethod
  def from_config(cls, data_config, **kw):
    check_config(data_config)
    return cls(data_config.image_size, data_config.resize_ratio, data_config.channels, **kw)

  def _resized(self, example: Example) -> np.ndarray:
    image = convert_channels(np.asarray(example["image"]), self.channels)
    return resize_short_side(image, self.mid_size)


class TrainTransform(_Preprocess, grain.transforms.RandomMap):
  """[hflip] -> resize -> random (or center) crop -> float32 [-1, 1]; label -> int32."""

  def __init__(
    self, image_size: int, resize_ratio: float, channels: int, random_crop: bool = True,
    hflip: bool = False,
  ):  # fmt: skip
    super().__init__(image_size, resize_ratio, channels)
    self.random_crop, self.hflip = bool(random_crop), bool(hflip)

  @classmethod
  def from_config(cls, data_config):
    return super().from_config(
      data_config, random_crop=data_config.random_crop, hflip=data_config.hflip
    )

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    image = convert_channels(np.asarray(element["image"]), self.channels)
    # VAR flips first (RandomHorizontalFlip is inserted at the front of the train transforms).
    if self.hflip and rng.random() < 0.5:
      image = image[:, ::-1]
    image = resize_short_side(np.ascontiguousarray(image), self.mid_size)
    if self.random_crop:
      h, w = image.shape[:2]
      top = int(rng.integers(0, h - self.image_size + 1))
      left = int(rng.integers(0, w - self.image_size + 1))
      image = image[top : top + self.image_size, left : left + self.image_size]
    else:
      image = center_crop(image, self.image_size)
    return {"image": normalize(image), "label": np.int32(element["label"])}


class EvalTransform(_Preprocess, grain.transforms.Map):
  """Resize -> center crop -> float32 [-1, 1] (or uint8 with `as_uint8`); other keys pass through."""

  def __init__(self, image_size: int, resize_ratio: float, channels: int, as_uint8: bool = False):
    super().__init__(image_size, resize_ratio, channels)
    self.as_uint8 = bool(as_uint8)

  def map(self, element: Example) -> Example:
    image = center_crop(self._resized(element), self.image_size)
    out = dict(element)
    out["image"] = np.ascontiguousarray(image) if self.as_uint8 else normalize(image)
    out["label"] = np.int32(element["label"])
    return out

"""Random-access data sources: `config.data.source` -> an object with `len`, `[i]` and a stable repr.

Every source returns examples `{"image": uint8 [H, W, C], "label": int}` in its native size and
channel count; `transforms.py` resizes, crops and converts channels. The stable `__repr__` matters:
grain's checkpoints compare `repr(source)` on restore.

Sources (`SOURCES`; add one with `register_source`):
  - `fashion_mnist`: the embedded default, Debian's Fashion-MNIST built once into a TFDS array_record
    dataset under the data dir (see `fashion_mnist.py`), then held in memory.
  - `tfds:<name>`: a TFDS dataset already prepared in array_record format under the data dir.
  - `folder:<path>`: class-per-folder images decoded with Pillow (see `FolderSource`).
  - `synthetic`: deterministic images with class-dependent gratings, any size; for tests.
  - `tokens:<dir>`: pre-extracted tokenizer codes (`arvision tokenize`; see `tokens.py`), examples
    `{"tokens": int32 [views, h*w], "label": int}`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from arvision import errors
from arvision.data import fashion_mnist

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EVAL_SPLIT_NAMES = ("test", "validation", "val")
ON_BAD_IMAGE = ("skip", "error")  # config.data.on_bad_image
SKIPPED_LIST = "skipped_images.txt"  # written to the workdir by `arvision train`


class ArraySource:
  """An in-memory source over `images` uint8 [N, H, W, C] and `labels` int [N]."""

  def __init__(
    self, images: np.ndarray, labels: np.ndarray, name: str, num_classes: int | None = None
  ):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(
        f"{name}: images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
      )
    if len(images) != len(labels):
      raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
    self.images, self.labels, self.name, self.num_classes = images, labels, name, num_classes

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"ArraySource(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


class SyntheticSource:
  """Deterministic images whose class decides a grating's orientation, frequency and tint.

  Example `i` of a split has label `i % num_classes` (balanced) and an image drawn from a generator
  seeded by `(seed, split, i)`: a sinusoidal grating (angle `pi * k / K`, 2-4 cycles per image,
  random phase), a class tint over channels, and mild noise. A small classifier learns it in a few
  hundred steps; a generator's samples can be checked for class structure.
  """

  SIZES = {"train": 512, "test": 128, "validation": 128}

  def __init__(self, split: str, image_size: int, channels: int, num_classes: int, seed: int = 0):
    if split not in self.SIZES:
      raise errors.UserError(
        f"synthetic split {split!r} is unknown; accepted: {sorted(self.SIZES)}"
      )
    if image_size < 1 or channels < 1 or num_classes < 1:
      raise errors.UserError(
        f"synthetic source needs image_size, channels, num_classes >= 1; got "
        f"{image_size}, {channels}, {num_classes}"
      )
    self.split, self.image_size, self.channels = split, image_size, channels
    self.num_classes, self.seed = num_classes, seed
    self._split_id = sorted(self.SIZES).index(split)
    grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")

  def __len__(self) -> int:
    return self.SIZES[self.split]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"synthetic {self.split} index {index} out of range [0, {len(self)})")
    k, K = index % self.num_classes, self.num_classes
    rng = np.random.default_rng([self.seed, self._split_id, index])
    angle = np.pi * k / K
    freq = 2.0 + (k % 3)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    wave_HxW = np.sin(
      2.0 * np.pi * freq * (self._xx * np.cos(angle) + self._yy * np.sin(angle)) + phase
    )
    tint_C = 0.6 + 0.4 * np.cos(
      2.0 * np.pi * (k / K + np.arange(self.channels) / max(self.channels, 1))
    )
    noise = rng.normal(0.0, 0.06, (self.image_size, self.image_size, self.channels))
    x = 0.5 + 0.4 * wave_HxW[..., None] * tint_C + noise
    image = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return {"image": image, "label": k}

  def __repr__(self) -> str:
    return (
      f"SyntheticSource(split={self.split!r}, image_size={self.image_size}, "
      f"channels={self.channels}, num_classes={self.num_classes}, seed={self.seed})"
    )


def decode_image(value: Any, what: str = "image") -> np.ndarray:
  """A decoded array (HxW or HxWxC) or encoded bytes (decoded with Pillow) -> uint8 [H, W, C]."""
  if isinstance(value, (bytes, bytearray, np.bytes_)) or (
    isinstance(value, np.ndarray) and value.dtype.kind in ("S", "O") and value.ndim == 0
  ):
    from PIL import Image

    raw = value.item() if isinstance(value, np.ndarray) else value
    with Image.open(io.BytesIO(bytes(raw))) as im:
      if im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
      value = np.asarray(im)
  value = np.asarray(value)
  if value.ndim == 2:
    value = value[..., None]
  if value.ndim != 3:
    raise ValueError(f"{what}: expected an image HxW or HxWxC, got shape {value.shape}")
  if value.dtype != np.uint8:
    raise ValueError(f"{what}: expected uint8 pixels, got {value.dtype}")
  return value


class TfdsSource:
  """A prepared TFDS dataset (array_record) read through `tfds.data_source`, no TensorFlow.

  Examples need an `image` feature (decoded array or encoded bytes) and a `label` feature.
  """

  def __init__(self, name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds

    self.name, self.split, self.data_dir = name, split, data_dir
    hint = (
      f"Prepare it in array_record format on a machine with TensorFlow: `tfds build {name} "
      f"--file_format=array_record --data_dir {data_dir}`, then copy it there, or point "
      "config.data.data_dir / $ARVISION_DATA_DIR at a directory holding it."
    )
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types (DatasetNotFoundError, ValueError, ...)
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # TFDS appends a long list
      raise errors.NotFound(
        f"config.data.source='tfds:{name}': cannot open it ({first}). {hint}"
      ) from e
    if not builder.is_prepared():
      raise errors.NotFound(
        f"config.data.source='tfds:{name}': not prepared under {builder.data_dir}. {hint}"
      )
    splits = sorted(builder.info.splits.keys())
    if split.split("[")[0] not in splits:
      raise errors.UserError(f"tfds:{name} split {split!r} is unknown; accepted: {splits}")
    try:
      self._source = builder.as_data_source(split)
    except Exception as e:
      raise errors.UserError(
        f"config.data.source='tfds:{name}': cannot open split {split!r} as a random-access source "
        f"({e}); it must be prepared with --file_format=array_record. {hint}"
      ) from e
    features = builder.info.features
    keys = sorted(features.keys()) if hasattr(features, "keys") else []
    if "image" not in keys or "label" not in keys:
      raise errors.UserError(f"tfds:{name}: needs features 'image' and 'label'; it has {keys}")
    self.num_classes = getattr(features["label"], "num_classes", None)
    self._dir = os.fspath(builder.data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._source[int(index)]
    return {
      "image": decode_image(ex["image"], f"tfds:{self.name}[{index}]"),
      "label": int(ex["label"]),
    }

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, split={self.split!r}, dir={self._dir!r})"


class FolderSource:
  """Class-per-folder images; labels are the class folder names sorted alphabetically.

  Layout: if `root/<split>/` exists, its subfolders are the classes (`root/<split>/<class>/*`).
  Otherwise `root/<class>/*` is split deterministically: within each class, files sorted by name,
  every 20th file (index 19, 39, ...) is held out, so about 95% go to `train` and 5% to
  `test`/`validation`/`val`. Files with extensions in `IMAGE_EXTENSIONS` (any case) count; images
  are converted to `L` (channels=1) or `RGB` (channels=3) with Pillow.

  Faults: with `on_bad_image="skip"` an image that does not decode (unreadable, truncated, not an
  image) is replaced by the next one that does (deterministic, so resumed runs see the same
  batches), logged with a running count and recorded for `skipped_images()` (the loop writes the
  list to `WORKDIR/skipped_images.txt`); with `"error"` it raises a `UserError` naming the file.
  With per-split folders, the class folders of `other_splits` (e.g. train vs eval) must match:
  labels are indices into the sorted folder names, so a missing folder would shift them.
  """

  def __init__(
    self,
    root: str,
    split: str,
    channels: int,
    on_bad_image: str = "skip",
    other_splits: tuple[str, ...] = (),
  ):
    if channels not in (1, 3):
      raise errors.UserError(
        f"config.data.channels={channels} is not supported by folder:; accepted: 1, 3"
      )
    if on_bad_image not in ON_BAD_IMAGE:
      raise errors.UserError(
        f"config.data.on_bad_image={on_bad_image!r} is unknown; accepted: {list(ON_BAD_IMAGE)}"
      )
    self.on_bad_image = on_bad_image
    self.root, self.split, self.channels = (
      os.path.abspath(os.path.expanduser(root)),
      split,
      channels,
    )
    if not os.path.isdir(self.root):
      raise errors.NotFound(
        f"config.data.source='folder:{root}': directory {self.root} does not exist; expected "
        "<path>/<split>/<class>/*.png|jpg|... or <path>/<class>/*.png|jpg|..."
      )
    split_dir = os.path.join(self.root, split)
    if os.path.isdir(split_dir):
      self.classes = _subdirs(split_dir)
      _check_same_classes(root, self.root, split, self.classes, other_splits)
      files = [(c, f) for c in self.classes for f in _images(os.path.join(split_dir, c))]
      self._base = split_dir
    else:
      if split != "train" and split not in EVAL_SPLIT_NAMES:
        raise errors.UserError(
          f"folder:{root} has no {split!r} subfolder; without one, accepted splits are "
          f"'train' and {list(EVAL_SPLIT_NAMES)} (a deterministic 95/5 split)"
        )
      self.classes = _subdirs(self.root)
      held_out = split != "train"
      files = [
        (c, f)
        for c in self.classes
        for i, f in enumerate(_images(os.path.join(self.root, c)))
        if (i % 20 == 19) == held_out
      ]
      self._base = self.root
    if not self.classes:
      raise errors.NotFound(f"folder:{root}: no class subfolders in {self._base}")
    if not files:
      raise errors.NotFound(
        f"folder:{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) for split {split!r} under "
        f"{self._base}/<class>/"
      )
    index = {c: i for i, c in enumerate(self.classes)}
    self._paths = [os.path.join(self._base, c, f) for c, f in files]
    self._labels = np.asarray([index[c] for c, _ in files], np.int32)
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self._paths)

  def _read(self, index: int) -> np.ndarray:
    from PIL import Image

    with Image.open(self._paths[index]) as im:
      image = np.asarray(im.convert("L" if self.channels == 1 else "RGB"))  # decodes it all
    return image[..., None] if image.ndim == 2 else image

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    for j in range(index, index + len(self)):
      j %= len(self)
      try:
        return {"image": self._read(j), "label": int(self._labels[j])}
      except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for a bad file
        path, reason = self._paths[j], " ".join(f"{type(e).__name__}: {e}".split())
        if self.on_bad_image == "error":
          raise errors.UserError(
            f"folder:{self.root}: cannot decode {path} ({reason}); remove or replace it, or set "
            "config.data.on_bad_image='skip' to skip unreadable images"
          ) from e
        _record_skipped(path, reason)
    raise errors.UserError(f"folder:{self.root}: no image of split {self.split!r} decodes")

  def __repr__(self) -> str:
    return (
      f"FolderSource(root={self.root!r}, split={self.split!r}, channels={self.channels}, "
      f"n={len(self)}, classes={len(self.classes)})"
    )


_SKIPPED: dict[str, str] = {}  # path -> why, for every FolderSource of this process
_SKIPPED_LOCK = threading.Lock()  # grain reads with several threads


def _record_skipped(path: str, reason: str) -> None:
  with _SKIPPED_LOCK:
    if path in _SKIPPED:
      return
    _SKIPPED[path] = reason
    n = len(_SKIPPED)
  logging.warning(
    "skipped unreadable image %s (%s); %d skipped so far (listed in WORKDIR/%s; set "
    "config.data.on_bad_image='error' to stop instead)",
    path,
    reason,
    n,
    SKIPPED_LIST,
  )


def skipped_images() -> dict[str, str]:
  """Images that `folder:` sources of this process skipped so far: path -> why."""
  with _SKIPPED_LOCK:
    return dict(_SKIPPED)


def write_skipped_images(workdir: str) -> int:
  """Writes `WORKDIR/skipped_images.txt` (path TAB why) when images were skipped; their count."""
  skipped = skipped_images()
  if skipped:
    with open(os.path.join(workdir, SKIPPED_LIST), "w") as f:
      f.writelines(f"{p}\t{r}\n" for p, r in sorted(skipped.items()))
  return len(skipped)


def _check_same_classes(arg, root, split, classes, other_splits) -> None:
  for other in other_splits:
    other_dir = os.path.join(root, other)
    if other == split or not os.path.isdir(other_dir):
      continue
    theirs = _subdirs(other_dir)
    if theirs != classes:
      only_a = sorted(set(classes) - set(theirs))
      only_b = sorted(set(theirs) - set(classes))
      raise errors.UserError(
        f"folder:{arg}: the class folders of splits {split!r} and {other!r} differ (only in "
        f"{split}: {only_a}; only in {other}: {only_b}); labels are the sorted folder names, so "
        "both splits need the same folders (an empty folder is fine)"
      )


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and d[0] != ".")


def _images(path: str) -> list[str]:
  return sorted(
    f
    for f in os.listdir(path)
    if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))
  )


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """How to build a source. `factory(arg, data_config, split)`; `arg` is the text after `name:`."""

  factory: Callable[[str, Any, str], Any]
  takes_arg: bool
  usage: str  # how it is written in config.data.source, for error messages


SOURCES: dict[str, SourceSpec] = {}


def register_source(
  name: str, factory: Callable[[str, Any, str], Any], takes_arg: bool, usage: str
):
  """Adds a source kind: `config.data.source = name` (or `name:<arg>` when `takes_arg`)."""
  SOURCES[name] = SourceSpec(factory, takes_arg, usage)


def _fashion_mnist(arg: str, data_config, split: str) -> ArraySource:
  del arg
  images, labels = fashion_mnist.load(data_config.data_dir, split)
  return ArraySource(images, labels, name=f"fashion_mnist/{split}", num_classes=10)


def _synthetic(arg: str, data_config, split: str) -> SyntheticSource:
  del arg
  return SyntheticSource(
    split, data_config.image_size, data_config.channels, data_config.num_classes
  )


def _tfds(arg: str, data_config, split: str) -> TfdsSource:
  return TfdsSource(arg, split, fashion_mnist.resolve_data_dir(data_config.data_dir))


def _folder(arg: str, data_config, split: str) -> FolderSource:
  return FolderSource(
    arg,
    split,
    data_config.channels,
    on_bad_image=data_config.get("on_bad_image", "skip"),  # configs saved before the field
    other_splits=(data_config.get("train_split", "train"), data_config.get("eval_split", "test")),
  )


register_source("fashion_mnist", _fashion_mnist, False, "fashion_mnist")
register_source("synthetic", _synthetic, False, "synthetic")
register_source("tfds", _tfds, True, "tfds:<name>")
register_source("folder", _folder, True, "folder:<path>")


def _tokens(arg: str, data_config, split: str):
  from arvision.data.tokens import TokensSource

  return TokensSource(arg, split)


register_source("tokens", _tokens, True, "tokens:<dir written by arvision tokenize>")


def get_source(data_config, split: str):
  """Builds the source that `data_config.source` names, for `split`.

  Raises:
    ValueError: an unknown source name or a malformed `name:<arg>`, listing the accepted forms.
  """
  spec = str(data_config.source)
  name, sep, arg = spec.partition(":")
  accepted = ", ".join(s.usage for s in SOURCES.values())
  if name not in SOURCES:
    raise errors.UserError(f"config.data.source={spec!r} is unknown; accepted: {accepted}")
  entry = SOURCES[name]
  if entry.takes_arg and not arg:
    raise errors.UserError(f"config.data.source={spec!r} needs an argument: {entry.usage}")
  if not entry.takes_arg and sep:
    raise errors.UserError(f"config.data.source={spec!r} takes no argument; write {entry.usage!r}")
  return entry.factory(arg, data_config, split)

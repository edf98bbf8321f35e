"""ADM-format `.npz` I/O (samples and reference statistics) and a statistics cache.

The OpenAI ADM evaluator, which VAR and LlamaGen report with, reads sample batches as `.npz` files
with `arr_0` = uint8 NHWC images, and reference batches (`VIRTUAL_imagenet256_labeled.npz`) with
`arr_0` (10k reference images), `mu`, `sigma` (pool3) and `mu_s`, `sigma_s` (spatial, for sFID).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np

REFERENCE_KEYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s")


def _atomic_savez(path: str, **arrays) -> None:
  """Writes `path` through a temp file and a rename, so a crash never leaves a half file."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    # A file object keeps numpy from appending ".npz" to the name.
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"images have dtype {images.dtype} and shape {images.shape}; accepted: uint8 [N, H, W, C] "
      "with C in (1, 3)"
    )
  return images


def save_samples(path: str, images_uint8, labels=None) -> None:
  """Saves generated samples as ADM expects: `arr_0` (uint8 NHWC) and, if given, `labels` `[N]`."""
  images = _check_images(images_uint8)
  arrays = {"arr_0": images}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
        f"labels have dtype {labels.dtype} and shape {labels.shape}; accepted: integer "
        f"[N] with N={images.shape[0]} (one per image)"
      )
    arrays["labels"] = labels.astype(np.int64)
  _atomic_savez(path, **arrays)


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """Loads `(images uint8 NHWC, labels or None)` from a samples `.npz`.

  Labels come from `labels`, or from `arr_1` (where ADM's `image_sample.py` writes them).
  """
  with np.load(path) as f:
    if "arr_0" not in f.files:
      raise KeyError(f"{path}: no 'arr_0' (the uint8 NHWC images); keys present: {f.files}")
    images = _check_images(f["arr_0"])
    labels = f["labels"] if "labels" in f.files else f["arr_1"] if "arr_1" in f.files else None
  return images, labels


def save_reference_stats(path: str, mu, sigma, mu_s=None, sigma_s=None, arr_0=None) -> None:
  """Writes an ADM reference batch: `mu`, `sigma`, optional `mu_s`, `sigma_s`, `arr_0`."""
  mu, sigma = np.asarray(mu), np.asarray(sigma)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"mu {mu.shape} / sigma {sigma.shape}; accepted: [D] and [D, D]")
  arrays = {"mu": mu, "sigma": sigma}
  if (mu_s is None) != (sigma_s is None):
    raise ValueError("mu_s and sigma_s go together; got only one of them")
  if mu_s is not None:
    mu_s, sigma_s = np.asarray(mu_s), np.asarray(sigma_s)
    if mu_s.ndim != 1 or sigma_s.shape != (mu_s.shape[0],) * 2:
      raise ValueError(f"mu_s {mu_s.shape} / sigma_s {sigma_s.shape}; accepted: [D] and [D, D]")
    arrays.update(mu_s=mu_s, sigma_s=sigma_s)
  if arr_0 is not None:
    arrays["arr_0"] = _check_images(arr_0)
  _atomic_savez(path, **arrays)


def load_reference_stats(path: str, required=("mu", "sigma"), load_images: bool = False) -> dict:
  """Reads an ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`).

  Args:
    path: the `.npz` file.
    required: keys that must be present (any of `REFERENCE_KEYS`); a missing one is an error naming
      it and the keys the file has.
    load_images: also return `arr_0` (10k ImageNet images are ~2 GB, so off by default).

  Returns:
    dict with the present keys among `mu`, `sigma`, `mu_s`, `sigma_s` (float64), and `arr_0` if
    `load_images`.
  """
  unknown = [k for k in required if k not in REFERENCE_KEYS]
  if unknown:
    raise ValueError(
      f"required={tuple(required)} has unknown keys {unknown}; accepted: {REFERENCE_KEYS}"
    )
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference statistics file {path!r} does not exist")
  with np.load(path) as f:
    missing = [k for k in required if k not in f.files]
    if missing:
      raise KeyError(
        f"{path}: missing reference key(s) {missing}; keys present: {sorted(f.files)}; an ADM "
        f"reference batch has {REFERENCE_KEYS}"
      )
    out = {k: f[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in f.files}
    if load_images and "arr_0" in f.files:
      out["arr_0"] = _check_images(f["arr_0"])
  return out


def cache_dir() -> str:
  """Where evaluation caches what it computes once: `$ARVISION_CACHE`, default ~/.cache/arvision."""
  return os.environ.get(
    "ARVISION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "arvision")
  )


def stats_key(dataset: str, split: str, extractor: str, n: int) -> str:
  """A short stable hash of what the statistics depend on."""
  blob = json.dumps([str(dataset), str(split), str(extractor), int(n)])
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stats_cache_path(cache_dir: str, dataset: str, split: str, extractor: str, n: int) -> str:
  """Cache file for the statistics of `n` images of `dataset/split` under feature `extractor`.

  `extractor` must identify the feature function *and its weights*
  (e.g. `"fmnist_cnn@<fingerprint>"`) so that retraining the extractor never reuses stale
  statistics.
  """
  safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))[:40]
  key = stats_key(dataset, split, extractor, n)
  name = f"{safe(dataset)}-{safe(split)}-{safe(extractor)}-{int(n)}-{key}.npz"
  return os.path.join(cache_dir, name)


def fingerprint(tree) -> str:
  """A short hash of a pytree of arrays (e.g. classifier params), for `extractor` names."""
  import jax  # local: keep this module importable without touching a backend

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.dtype, a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def cached_stats(cache_path: str, compute_fn: Callable[[], dict]) -> dict:
  """Returns the dict of arrays stored at `cache_path`, computing and saving it on the first call.

  Args:
    cache_path: usually from `stats_cache_path(...)`.
    compute_fn: `() -> dict[str, array]` (e.g. `{"mu": ..., "sigma": ...}`), only called on a miss.
  """
  if os.path.exists(cache_path):
    with np.load(cache_path) as f:
      return {k: f[k] for k in f.files}
  stats = compute_fn()
  if not isinstance(stats, dict) or not stats:
    raise ValueError(
      f"compute_fn returned {type(stats).__name__}; accepted: a non-empty dict of arrays"
    )
  stats = {k: np.asarray(v) for k, v in stats.items()}
  _atomic_savez(cache_path, **stats)
  return stats

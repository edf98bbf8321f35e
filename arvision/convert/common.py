"""Mapping official PyTorch state dicts onto arvision param trees, with full coverage checks.

A converter is a list of `(regex, replacement)` renames from dotted torch keys to `/`-joined flax
paths, a set of torch keys to skip (buffers), and leaf rules that are the same for every model:
torch `weight` becomes whichever of `kernel` / `embedding` / `scale` the flax module has there;
Linear weights [out, in] -> kernel [in, out]; conv weights OIHW -> HWIO; everything else keeps its
layout, reshaped only where the flax param has the same number of elements in another shape.
Every torch key must map to a param, every param must be covered, shapes must match; errors name
the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np

from arvision import errors

CHECKPOINT_WRAPPERS = ("model", "module", "state_dict")


def torch_load(path: str):
  """The object in a `.pth`/`.pt`/`.ckpt` file (torch is needed only here, for reading)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "reading PyTorch checkpoints needs torch: pip install 'arvision[convert]'"
    ) from e
  return torch.load(path, map_location="cpu", weights_only=False)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.pth`/`.pt` file (raw state dict or wrapped in model/module/state_dict) as numpy."""
  return unwrap_state_dict(torch_load(path), path)


def unwrap_state_dict(obj, what: str = "checkpoint") -> dict[str, np.ndarray]:
  if isinstance(obj, Mapping):
    for key in CHECKPOINT_WRAPPERS:
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise errors.UserError(f"{what}: expected a state dict (or one under {CHECKPOINT_WRAPPERS})")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "shape"):
      raise errors.UserError(
        f"{what}: not a state dict of tensors: entry {k!r} is a "
        f"{type(v).__name__} (wrappers understood: {CHECKPOINT_WRAPPERS})"
      )
    out[k[len("module.") :] if k.startswith("module.") else k] = _to_numpy(v)
  return out


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def flatten(tree, sep: str = "/") -> dict[str, object]:
  return {
    sep.join(str(getattr(k, "key", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def unflatten(flat: Mapping[str, object], sep: str = "/") -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, last = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _fuse_indices(key: str) -> str:
  """`down.0.block.1.conv1.weight` -> `down_0/block_1/conv1/weight`."""
  parts, out = key.split("."), []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return "/".join(out)


def _leaf(torch_value: np.ndarray, flax_shape: tuple, kind: str, key: str) -> np.ndarray:
  v = torch_value
  if kind == "kernel" and v.ndim == 4:
    v = v.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif kind == "kernel" and v.ndim == 2:
    v = v.T  # Linear [out, in] -> [in, out]
  if v.shape != tuple(flax_shape):
    if v.size == int(np.prod(flax_shape)) and kind not in ("kernel",):
      v = v.reshape(flax_shape)  # e.g. scale_mul_1H11 [1,H,1,1] -> [H]
    else:
      raise errors.UserError(
        f"shape mismatch for {key!r}: checkpoint {torch_value.shape} "
        f"-> {v.shape}, model expects {tuple(flax_shape)}"
      )
  return v


def convert(
  state_dict: Mapping[str, np.ndarray],
  abstract_params,
  *,
  renames: Iterable[tuple[str, str]] = (),
  skip: Iterable[str] = (),
  what: str = "checkpoint",
) -> dict:
  """Maps a torch state dict onto the structure of `abstract_params` (numpy leaves, f32)."""
  expected = {k: tuple(v.shape) for k, v in flatten(abstract_params).items()}
  skip_res = [re.compile(s) for s in skip]
  renames = [(re.compile(a), b) for a, b in renames]
  out, unknown = {}, []
  for tkey, value in state_dict.items():
    if any(r.fullmatch(tkey) for r in skip_res):
      continue
    name = tkey
    for pattern, repl in renames:
      name = pattern.sub(repl, name)
    path = _fuse_indices(name)
    prefix, _, leaf = path.rpartition("/")
    candidates = (
      [f"{prefix}/{k}" if prefix else k for k in ("kernel", "embedding", "scale")]
      if leaf == "weight"
      else [path]
    )
    found = [c for c in candidates if c in expected]
    if not found:
      unknown.append(f"{tkey} (-> {candidates[0]})")
      continue
    fkey = found[0]
    if fkey in out:
      raise errors.UserError(f"{what}: two checkpoint keys map to {fkey!r} (second: {tkey!r})")
    out[fkey] = _leaf(value, expected[fkey], fkey.rpartition("/")[2], tkey).astype(
      np.float32, copy=False
    )
  if unknown:
    raise errors.UserError(
      f"{what}: {len(unknown)} checkpoint keys do not belong to the model, e.g. "
      f"{unknown[:5]} (wrong model or config?)"
    )
  missing = sorted(set(expected) - set(out))
  if missing:
    raise errors.UserError(
      f"{what}: {len(missing)} model params are missing from the checkpoint, e.g. "
      f"{missing[:5]} (wrong model or config?)"
    )
  return unflatten(out)


def to_state_dict(params, *, renames: Iterable[tuple[str, str]] = ()) -> dict[str, np.ndarray]:
  """The inverse layout (flax -> torch-style keys): for round-trip tests and exporting."""
  renames = [(re.compile(a), b) for a, b in renames]
  out = {}
  for fkey, v in flatten(params).items():
    v = np.asarray(v)
    prefix, _, leaf = fkey.rpartition("/")
    if leaf == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    tleaf = "weight" if leaf in ("kernel", "embedding", "scale") else leaf
    key = re.sub(r"_(\d+)(?=/|$)", r".\1", f"{prefix}/{tleaf}" if prefix else tleaf).replace(
      "/", "."
    )
    for pattern, repl in renames:
      key = pattern.sub(repl, key)
    out[key] = v
  return out

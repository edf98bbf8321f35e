"""The FID Inception-v3 (TF graph `inception-2015-12-05`) in Flax: preprocessing and loaders.

This is the network behind FID, sFID, IS and precision/recall in the OpenAI ADM evaluation suite
(what VAR and LlamaGen report), torch-fidelity (what MAR reports) and pytorch-fid. It is the
TF-1 graph's variant of Inception-v3, not torchvision's: average pools in the A/C/E_1 blocks skip
the padding (`count_include_pad=False`), the last E block pools with a max, convs have no bias and
BatchNorm uses eps 1e-3, and the classifier has 1008 classes.

Outputs of `InceptionV3FID` / `inception_features`:
  - `pool`    [N, 2048]: TF `pool_3:0`, the FID / KID / precision-recall features.
  - `spatial` [N, 2023]: the sFID features of the ADM evaluator. It reads TF `mixed_6/conv:0`,
    keeps the first 7 channels and flattens the NHWC tensor, i.e. `t[..., :7].reshape(N, -1)`
    in (h, w, c) order. In the TF graph `mixed_k` are the Inception blocks in order
    (`mixed`..`mixed_2` = Mixed_5b..5d, `mixed_3` = Mixed_6a, `mixed_4`..`mixed_7` = Mixed_6b..6e,
    `mixed_8`..`mixed_10` = Mixed_7a..7c; this is the name map of torch-fidelity's weight
    converter, and `mixed_6`'s 7x7 towers have 160 channels like Mixed_6d, not 192 like Mixed_6e).
    Within a block, `conv` is the 1x1 branch and the node named `<scope>` is the ReLU after
    `<scope>/batchnorm`. So `mixed_6/conv:0` = ReLU(BN(conv1x1)) of Mixed_6d's `branch1x1`,
    [N, 17, 17, 192]; 17 * 17 * 7 = 2023.
  - `logits`  [N, 1008]: `pool @ fc.weight.T` without the bias (torch-fidelity's
    "logits_unbiased"; the ADM evaluator's IS takes the softmax of the same product).

Preprocessing is torch-fidelity's `inception-v3-compat` = the TF graph's own: uint8 -> float,
TF-1 bilinear resize to 299x299 (`align_corners=False`: source = dest * in / out, no half-pixel
offset), then `(x - 128) / 128`.

The weights cannot be downloaded on offline machines; `load_weights` reads a file the user supplies:
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (both torchvision-named state dicts), or the `.npz`
that `save_converted` writes (no torch needed to read it).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
NUM_LOGITS = 1008
BN_EPS = 1e-3
NPZ_FORMAT = "arvision-inception-v3-fid-2015-12-05/v1"

WEIGHTS_HELP = (
  "The FID Inception-v3 weights (TF inception-2015-12-05) are not bundled with any package and "
  "cannot be downloaded automatically on offline machines. Download one of these on a machine "
  "with internet access and pass its path:\n"
  "  - pytorch-fid: https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  "pt_inception-2015-12-05-6726825d.pth\n"
  "  - torch-fidelity: https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
  "weights-inception-2015-12-05-6726825d.pth\n"
  "  - or an arvision .npz made from either with "
  "`arvision.evaluation.inception.save_converted(load_weights(pth), 'inception.npz')` "
  "(needs torch once; the .npz loads without it).\n"
  "clean-fid's TorchScript inception-2015-12-05.pt is not a state dict and is not accepted."
)


# ------------------------------------------------------------------------------------------------
# Preprocessing


def resize_bilinear_tf1(x_NxHxWxC: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize as TF 1.x `resize_bilinear(align_corners=False)` computes it.

  The source coordinate of output pixel `i` is `i * in / out` (no half-pixel offset, unlike
  `jax.image.resize`), computed in float32 as torch-fidelity's
  `interpolate_bilinear_2d_like_tensorflow1x` does; the upper neighbour is clamped to the edge.

  Args:
    x_NxHxWxC: float images.
    size: output (height, width).

  Returns:
    float32 [N, size[0], size[1], C].
  """
  if x_NxHxWxC.ndim != 4:
    raise ValueError(f"resize_bilinear_tf1: x must be NHWC (4-D), got shape {x_NxHxWxC.shape}")
  out_h, out_w = size
  x = x_NxHxWxC.astype(jnp.float32)
  in_h, in_w = x.shape[1], x.shape[2]

  def grid(in_size, out_size):
    # float32 scale and product, as in the reference, so the truncation points agree exactly.
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = src.astype(np.int32)  # src >= 0, so truncation is floor
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac

  y_lo, y_hi, dy = grid(in_h, out_h)
  x_lo, x_hi, dx = grid(in_w, out_w)
  top = jnp.take(x, y_lo, axis=1)
  bottom = jnp.take(x, y_hi, axis=1)
  dx_ = jnp.asarray(dx)[None, None, :, None]
  # Same lerp order as the reference: rows first along x, then between rows along y.
  in_0 = jnp.take(top, x_lo, axis=2)
  in_0 = in_0 + (jnp.take(top, x_hi, axis=2) - in_0) * dx_
  in_1 = jnp.take(bottom, x_lo, axis=2)
  in_1 = in_1 + (jnp.take(bottom, x_hi, axis=2) - in_1) * dx_
  return in_0 + (in_1 - in_0) * jnp.asarray(dy)[None, :, None, None]


def preprocess(images_NxHxWx3: jax.Array) -> jax.Array:
  """uint8 RGB NHWC -> the network input: float32 [N, 299, 299, 3] in [-1, 1)."""
  x = resize_bilinear_tf1(images_NxHxWx3.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
  return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------------------------
# Network (submodule names follow torchvision / torch-fidelity so the weight map is by name)

_HIGHEST = jax.lax.Precision.HIGHEST


def _pad(p):
  return ((p[0], p[0]), (p[1], p[1]))


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=_pad(self.padding),
      use_bias=False,
      precision=_HIGHEST,  # FID features are compared across runs: no TF32/bf16 passes on GPU
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's average pool does not count the zero padding (pytorch-fid's FID patch).
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """The 17x17 block. Returns (output, branch1x1) so Mixed_6d can expose TF `mixed_6/conv`."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """The 8x8 block; `max_pool=True` is the TF graph's last block (mixed_10 = Mixed_7c)."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.max_pool:
      # The TF graph max-pools here (padding acts as -inf, as in torch's max_pool2d).
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """The FID Inception-v3 on preprocessed input (see `preprocess`).

  Call with float32 [N, 299, 299, 3] in [-1, 1]; returns a dict with `pool` [N, 2048],
  `spatial` [N, 2023] and `logits` [N, 1008] (see the module docstring). Variables are
  `{"params": ..., "batch_stats": ...}` with torchvision's module names.
  """

  @nn.compact
  def __call__(self, x_Nx299x299x3):
    x = x_Nx299x299x3
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool_Nx2048 = jnp.mean(x, axis=(1, 2))
    fc_2048x1008 = self.param("fc", nn.initializers.lecun_normal(), (POOL_DIM, NUM_LOGITS))
    logits = jnp.dot(pool_Nx2048, fc_2048x1008, precision=_HIGHEST)
    n = x.shape[0]
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(n, -1)
    return {"pool": pool_Nx2048, "spatial": spatial, "logits": logits}


# ------------------------------------------------------------------------------------------------
# Weights


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten(v, key))
    else:
      out[key] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat `collection/module/.../name` -> shape of every variable of `InceptionV3FID`."""
  abstract = jax.eval_shape(
    InceptionV3FID().init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
  )
  return {k: tuple(v.shape) for k, v in _flatten(abstract).items()}


def _validated(flat: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
  """Checks a flat variable dict against the model (names and shapes) and returns the tree."""
  expected = _expected_shapes()
  missing = sorted(set(expected) - set(flat))
  unknown = sorted(set(flat) - set(expected))
  if unknown:
    raise ValueError(f"{source}: unknown weights {_list(unknown)}")
  if missing:
    raise ValueError(f"{source}: missing weights {_list(missing)}")
  for k, shape in expected.items():
    got = tuple(np.shape(flat[k]))
    if got != shape:
      raise ValueError(f"{source}: weight {k!r} has shape {got}, the model expects {shape}")
  return _unflatten({k: jnp.asarray(np.asarray(v, np.float32)) for k, v in flat.items()})


def _torch_layout(flax_key: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
  """Flat flax variable name and shape -> the torchvision state-dict name and shape."""
  if flax_key == "params/fc":
    return "fc.weight", shape[::-1]
  collection, *path, leaf = flax_key.split("/")
  module = ".".join(path)
  if collection == "batch_stats":
    return f"{module}.running_{leaf}", shape
  if leaf == "kernel":
    return f"{module}.weight", (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
  return f"{module}.{'weight' if leaf == 'scale' else 'bias'}", shape


def _list(keys: list[str]) -> str:
  return ", ".join(repr(k) for k in keys[:8]) + (
    f" ... ({len(keys)} in all)" if len(keys) > 8 else ""
  )


def from_torch_state_dict(
  state_dict: Mapping[str, Any], source: str = "state_dict"
) -> dict[str, Any]:
  """Converts a pytorch-fid / torch-fidelity Inception state dict to flax variables.

  Both projects use torchvision's module names (`Conv2d_1a_3x3.conv.weight`,
  `Mixed_6d.branch1x1.bn.running_var`, ..., `fc.weight`, `fc.bias`); torch-fidelity's converter
  writes exactly these, and a state dict saved from a live module adds BatchNorm's
  `num_batches_tracked`. A `module.` prefix (DataParallel) is stripped. `num_batches_tracked` and
  `fc.bias` are dropped: inference BN ignores the first, and `logits` is the unbiased product.

  Args:
    state_dict: name -> array-like (numpy arrays or CPU torch tensors).
    source: what to call the input in error messages (e.g. the file path).

  Returns:
    `{"params": ..., "batch_stats": ...}` as float32 jax arrays.

  Raises:
    ValueError: naming the missing or unknown torch keys, or a key whose shape is wrong.
  """
  expected = dict(_torch_layout(k, s) for k, s in _expected_shapes().items())
  to_flax = {_torch_layout(k, s)[0]: k for k, s in _expected_shapes().items()}
  arrays = {}
  for key, value in state_dict.items():
    name = key[len("module.") :] if key.startswith("module.") else key
    if name.endswith(".num_batches_tracked") or name == "fc.bias":
      continue
    arrays[name] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
  missing = sorted(set(expected) - set(arrays))
  unknown = sorted(set(arrays) - set(expected))
  if unknown:
    raise ValueError(
      f"{source}: unknown weights {_list(unknown)}; expected torchvision Inception-v3 names such "
      "as 'Conv2d_1a_3x3.conv.weight', 'Mixed_5b.branch1x1.bn.running_mean', 'fc.weight'"
    )
  if missing:
    raise ValueError(f"{source}: missing weights {_list(missing)}")
  flat = {}
  for name, a in arrays.items():
    if tuple(a.shape) != expected[name]:
      raise ValueError(
        f"{source}: weight {name!r} has shape {tuple(a.shape)}, the model expects {expected[name]}"
      )
    if a.ndim == 4:
      a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif name == "fc.weight":
      a = a.T  # Linear stores [out, in]
    flat[to_flax[name]] = a
  return _validated(flat, source)


def random_variables(seed: int = 0) -> dict[str, Any]:
  """Seeded random variables of the module's shapes (He-scaled, so activations stay O(1)).

  Not FID weights: for speed measurements and for parity tests against another implementation
  loaded with the same values.
  """
  rs = np.random.RandomState(seed)
  flat = {}
  for key, shape in _expected_shapes().items():
    leaf = key.rsplit("/", 1)[-1]
    if key == "params/fc":
      a = rs.randn(*shape) / np.sqrt(shape[0])
    elif leaf == "kernel":
      a = rs.randn(*shape) * np.sqrt(2.0 / np.prod(shape[:3]))
    elif leaf in ("scale", "var"):
      a = 0.5 + rs.rand(*shape)
    else:  # BatchNorm bias and running mean
      a = 0.1 * rs.randn(*shape)
    flat[key] = a.astype(np.float32)
  return _unflatten(flat)


def save_converted(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes inception variables as a flat `.npz` that `load_weights` reads without torch."""
  flat = {k: np.asarray(v, np.float32) for k, v in _flatten(variables).items()}
  _validated(flat, f"save_converted({os.fspath(path)!r})")
  with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz' to the name
    np.savez(f, __format__=np.array(NPZ_FORMAT), **flat)


def load_weights(path: str | os.PathLike | None) -> dict[str, Any]:
  """Loads FID Inception weights from a user-supplied file.

  Args:
    path: a pytorch-fid `pt_inception-2015-12-05-*.pth` or torch-fidelity
      `weights-inception-2015-12-05-*.pth` state dict (needs torch), or an arvision `.npz` from
      `save_converted`. The format is detected from the content, not the suffix.

  Returns:
    `{"params": ..., "batch_stats": ...}` for `InceptionV3FID.apply`.

  Raises:
    ValueError: no path (with where to get the file), a missing/unknown weight or a wrong shape.
    FileNotFoundError: the path does not exist.
    ImportError: a `.pth` file without torch installed.
  """
  if path is None:
    raise ValueError("weights=None: a weights file is required.\n" + WEIGHTS_HELP)
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights={path!r}: no such file.\n" + WEIGHTS_HELP)
  stat = os.stat(path)
  return _load_cached(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
  del mtime_ns, size  # cache keys only: a rewritten file is read again
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PK\x03\x04":
    # Both .npz and torch's zip format are zip archives; .npz members end in .npy.
    import zipfile

    with zipfile.ZipFile(path) as z:
      names = z.namelist()
    if "__format__.npy" in names:
      with np.load(path, allow_pickle=False) as data:
        fmt = str(data["__format__"])
        if fmt != NPZ_FORMAT:
          raise ValueError(f"weights={path!r}: npz format {fmt!r}, expected {NPZ_FORMAT!r}")
        flat = {k: data[k] for k in data.files if k != "__format__"}
      return _validated(flat, f"weights={path!r}")
    if all(n.endswith(".npy") for n in names):
      raise ValueError(
        f"weights={path!r}: an .npz without arvision's '__format__' entry; write it with "
        "arvision.evaluation.inception.save_converted"
      )
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"weights={path!r} is a PyTorch file; reading it needs torch (pip install torch). "
      "Convert it once with save_converted(load_weights(pth), 'inception.npz') where torch is "
      "available and pass the .npz here."
    ) from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise ValueError(
      f"weights={path!r}: expected a state dict (name -> tensor), got {type(state_dict).__name__}"
    )
  if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
    state_dict = state_dict["state_dict"]
  return from_torch_state_dict(state_dict, source=f"weights={path!r}")


# ------------------------------------------------------------------------------------------------
# Batched feature extraction


@jax.jit
def _preprocess_jit(images_uint8):
  return preprocess(images_uint8)


@jax.jit
def _network_jit(variables, x):
  return InceptionV3FID().apply(variables, x)


def _as_rgb_uint8(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(
      f"images: dtype {images.dtype}, expected uint8 in [0, 255] (convert with "
      "np.clip(np.round(x), 0, 255).astype(np.uint8))"
    )
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images: shape {images.shape}, expected NHWC with C = 3 (RGB) or 1 (gray)")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)  # gray -> RGB, as PIL's convert("RGB") does
  return images


def inception_features(
  images_uint8_NHWC,
  weights: str | os.PathLike | Mapping[str, Any] | None = None,
  batch_size: int = 100,
) -> dict[str, np.ndarray]:
  """FID Inception features of uint8 images, in jitted batches.

  Args:
    images_uint8_NHWC: uint8 [N, H, W, 3] (or [N, H, W, 1], repeated to RGB), any H, W; resized
      to 299x299 inside as the TF graph does.
    weights: a weights file path for `load_weights`, or variables it returned (reuse them to skip
      re-reading the file).
    batch_size: images per device call; the last batch is padded so every call has one shape.

  Returns:
    numpy float32 `{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}`.
  """
  if weights is None or isinstance(weights, (str, os.PathLike)):
    variables = load_weights(weights)
  elif isinstance(weights, Mapping) and {"params", "batch_stats"} <= set(weights):
    variables = weights
  else:
    raise ValueError(
      "weights: expected a file path or the {'params', 'batch_stats'} dict load_weights "
      f"returns, got {type(weights).__name__}"
    )
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
  images = _as_rgb_uint8(images_uint8_NHWC)
  n = images.shape[0]
  outs: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
  for start in range(0, n, batch_size):
    chunk = images[start : start + batch_size]
    m = chunk.shape[0]
    if m < batch_size and n > batch_size:
      # Pad the ragged tail so the network compiles once per batch size.
      chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], np.uint8)])
    feats = _network_jit(variables, _preprocess_jit(chunk))
    for k in outs:
      outs[k].append(np.asarray(feats[k])[:m])
  if n == 0:
    return {
      "pool": np.zeros((0, POOL_DIM), np.float32),
      "spatial": np.zeros((0, SPATIAL_DIM), np.float32),
      "logits": np.zeros((0, NUM_LOGITS), np.float32),
    }
  return {k: np.concatenate(v) for k, v in outs.items()}

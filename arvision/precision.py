"""Mixed precision and rematerialisation: the compute dtype and remat mode of a model's forward.

Three knobs (docs/precision.md):
- `config.model.dtype` (`DTYPES`): the compute dtype of activations and matmuls. Params and
  optimizer state stay float32 (Flax `param_dtype`); every layer built inside `compute(...)`
  takes `dtype=current_dtype()`, so Flax casts its float32 params and inputs to the compute dtype
  at the call. Softmax (`ops.attention`), normalisation statistics, losses, the diffusion/flow
  noise math and vector-quantisation distances stay float32 (each module upcasts there).
- `config.remat` (`REMATS`): `none` keeps every activation for the backward pass; `block`
  checkpoints each transformer block keeping only its matmul outputs
  (`dots_with_no_batch_dims_saveable`: norms, activations and attention scores are recomputed);
  `full` keeps only each block's input (`nothing_saveable`: the whole block is recomputed).
- `config.optim.accum_steps`: microbatches per step (`arvision.train`), checked here.

Why a context and not a module attribute: the setting is read while a family's forward is traced
(like `parallel.use_rules` for sharding constraints), so layers deep in a model need no extra
constructor argument, and a tokenizer called inside a generator's loss enters its own dtype.
Outside any `compute(...)` (init, converters, parity tests) everything is float32 and no block is
rematerialised: the float32 path is the code as it was, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp

from arvision import errors

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMATS = ("none", "block", "full")
# What each remat mode saves inside a block (None: the block is not checkpointed).
_POLICIES = {
  "none": None,
  "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class Policy:
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"


_LOCAL = threading.local()


def current() -> Policy:
  """The policy of the forward being traced (float32, no remat outside any `compute`)."""
  return getattr(_LOCAL, "policy", Policy())


def current_dtype():
  """The compute dtype layers take (`nn.Dense(..., dtype=current_dtype())`)."""
  return current().dtype


@contextlib.contextmanager
def compute(dtype=jnp.float32, remat: str = "none"):
  """Traces the forward inside with compute dtype `dtype` and remat mode `remat`."""
  previous = current()
  _LOCAL.policy = Policy(jnp.dtype(dtype).type, remat)
  try:
    yield _LOCAL.policy
  finally:
    _LOCAL.policy = previous


# --- config fields ------------------------------------------------------------------------------


def dtype_name(config) -> str:
  """`config.model.dtype` checked (absent in configs saved before the field existed: float32)."""
  model = config.get("model") or {}
  name = model.get("dtype", "float32")
  if name not in DTYPES:
    raise errors.UserError(
      f"config.model.dtype={name!r} is not a compute dtype; accepted: {sorted(DTYPES)}"
    )
  return name


def compute_dtype(config):
  """The jnp dtype named by `config.model.dtype`."""
  return DTYPES[dtype_name(config)]


def remat_mode(config) -> str:
  """`config.remat` checked (absent: none)."""
  mode = config.get("remat", "none")
  if mode not in REMATS:
    raise errors.UserError(f"config.remat={mode!r} is unknown; accepted: {list(REMATS)}")
  return mode


def accum_steps(config) -> int:
  """`config.optim.accum_steps` checked: an int >= 1 that divides `config.data.batch_size`."""
  k = config.optim.get("accum_steps", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise errors.UserError(
      f"config.optim.accum_steps={k!r} must be an int >= 1 (microbatches per step)"
    )
  batch = int(config.data.batch_size)
  if batch % k:
    raise errors.UserError(
      f"config.optim.accum_steps={k} does not divide config.data.batch_size={batch}; accepted: "
      f"a divisor of the batch size, e.g. {[d for d in range(1, min(batch, 64) + 1) if batch % d == 0]}"
    )
  return k


def validate(config) -> None:
  """Checks all three knobs (the train step calls this before building anything)."""
  dtype_name(config)
  remat_mode(config)
  accum_steps(config)


def policy_of(config) -> Policy:
  return Policy(compute_dtype(config), remat_mode(config))


# --- model code ---------------------------------------------------------------------------------


def remat_policy():
  """The checkpoint policy of the current remat mode (None: blocks are not checkpointed)."""
  return _POLICIES[current().remat]


def block(module: nn.Module, *args, **kwargs):
  """Calls a transformer block under the current remat mode.

  Keyword arguments (mask specs, flags) are closed over, so only the positional arguments are
  traced through the checkpoint; blocks return their outputs unchanged.
  """
  policy = _POLICIES[current().remat]
  if policy is None:
    return module(*args, **kwargs)
  fn = nn.checkpoint(lambda mdl, *a: mdl(*a, **kwargs), policy=policy)
  return fn(module, *args)


def cast(x, dtype=None):
  """Float arrays to the compute dtype (default: the current one); others unchanged."""
  dtype = current_dtype() if dtype is None else dtype
  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(dtype)
  return x


def float32(x):
  """An fp32 island's input (softmax, norm statistics, losses, noise math)."""
  return x.astype(jnp.float32)

"""Fixtures shared by the tests: config helpers, the registered families at their `:smoke` configs,
the toy classifier family of the loop tests, and a tiny VAR kit (a fake multi-scale tokenizer).

Helpers are handed out as fixtures (tests never import each other). `tests/toy_family.py` is a
family module in its own right (a config file too: `--config tests/toy_family.py`); pytest puts
this directory on `sys.path` for conftest, which is how `config.family = "toy_family"` resolves.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
from typing import Any

# The tests compile far more than they compute: XLA:CPU with LLVM at -O0 compiles much faster,
# and its results stay within every tolerance here. Set before jax creates its CPU client; inherited by the
# processes the tests start; a user's own optimisation level is kept.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  ).strip()

# One CPU device, as before arvision made two by default on a 2-core host (arvision/xla_flags.py):
# the tests compare single-device paths and use batch sizes of 1 and 3. The two-device default is
# the data-parallel mesh the sharding tests run on 4 and 8 devices; test_xla_flags checks it is set.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections as mlc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import toy_family  # noqa: E402

from arvision import config_util, data, families  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Plain asserts in the shared check module report their values as they would in a test file (it
# is imported by the test files, after this conftest).
pytest.register_assert_rewrite("family_contract")

# The persistent compilation cache (on by default in the CLI and `arvision.load`) stays off in the
# tests and in the processes they start: the user's cache is never written, and every test
# compiles what it checks. tests/test_compile_cache.py turns it on in processes of its own.
os.environ["ARVISION_COMPILE_CACHE"] = "0"


# ------------------------------------------------------------------------------------------------
# Config helpers


def set_fields(config: mlc.ConfigDict, **fields) -> mlc.ConfigDict:
  """`config` with dotted fields set (`**{"data.image_size": 16}`), locked.

  An unknown field raises (the config is locked while the fields are set): a typo in a test
  cannot silently add a field.
  """
  config.lock()
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def smoke_config(name: str, **fields) -> mlc.ConfigDict:
  """`configs/<name>.py:smoke` with dotted `fields` set."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"family {name!r} is registered but configs/{name}.py is missing")
  return set_fields(config_util.load_config_file(path + ":smoke"), **fields)


@pytest.fixture(scope="session")
def configs():
  """`configs.set_fields(config, **dotted)` and `configs.smoke(name, **dotted)`."""
  return types.SimpleNamespace(set_fields=set_fields, smoke=smoke_config)


# ------------------------------------------------------------------------------------------------
# Experiment scripts under test


def load_experiment(name: str) -> types.ModuleType:
  """`experiments/<name>.py` as a module (scripts are not a package; nothing joins sys.path)."""
  path = os.path.join(ROOT, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def experiment():
  """`experiment(name)`: loads `experiments/<name>.py` (for the tests of a script's functions)."""
  return load_experiment


# ------------------------------------------------------------------------------------------------
# Registered families at their smoke configs


@dataclasses.dataclass
class Smoke:
  """A registered family at its `:smoke` config with random params (frozen tokenizer included)."""

  name: str
  config: Any
  family: Any
  tokenizer: Any  # the frozen tokenizer family, or None
  params: dict  # trainable params plus the frozen trees under `family.frozen_keys`

  def batch(self, size: int, seed: int = 0) -> dict:
    """A synthetic batch of the config's input shapes: images uniform in [-1, 1], random labels."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, x in data.input_spec(self.config.data, size).items():
      if np.issubdtype(x.dtype, np.integer):
        out[key] = rng.integers(0, int(self.config.data.num_classes), x.shape).astype(x.dtype)
      else:
        out[key] = rng.uniform(-1, 1, x.shape).astype(x.dtype)
    return out

  def trainable(self) -> dict:
    return {k: v for k, v in self.params.items() if k not in self.family.frozen_keys}

  def frozen(self) -> dict:
    return {k: v for k, v in self.params.items() if k in self.family.frozen_keys}


_SMOKE: dict[str, Smoke] = {}
_TOKENIZER_PARAMS: dict[str, dict] = {}


def _tokenizer_params(tokenizer) -> dict:
  """A tokenizer's random params, one init per config (the `tokenizer` family's smoke config is
  also VAR's smoke tokenizer: initialised once, not twice)."""
  key = config_util.to_json(tokenizer.config)
  if key not in _TOKENIZER_PARAMS:
    init = jax.jit(tokenizer.init, static_argnums=1)  # jit: faster than eager init
    _TOKENIZER_PARAMS[key] = init(jax.random.key(1), None)
  return _TOKENIZER_PARAMS[key]


def smoke_family(name: str) -> Smoke:
  """The family registered as `name` at `configs/<name>.py:smoke`; built once per session."""
  if name not in _SMOKE:
    config = smoke_config(name)
    tokenizer = None
    if families.needs_tokenizer(config):
      tokenizer = families.build(config.tokenizer.config)
    family = families.build(config, tokenizer=tokenizer)
    smoke = Smoke(name, config, family, tokenizer, {})
    if family.kind == "tokenizer":
      smoke.params = dict(_tokenizer_params(family))
    else:
      smoke.params = jax.jit(family.init)(jax.random.key(0), smoke.batch(2))
      smoke.params.update(family.init_frozen(jax.random.key(1)))  # e.g. HMAR's stage 1
    if tokenizer is not None:
      smoke.params["tokenizer"] = _tokenizer_params(tokenizer)
    _SMOKE[name] = smoke
  return _SMOKE[name]


@pytest.fixture(scope="session")
def smoke():
  """`smoke(name) -> Smoke`: a registered family at its smoke config, shared by all tests."""
  return smoke_family


# ------------------------------------------------------------------------------------------------
# The toy classifier family (tests/toy_family.py): fast to compile, can be told to NaN.


@pytest.fixture
def toy_config():
  """`toy_config(**dotted) -> config` of the toy classifier family, locked."""
  return lambda **fields: set_fields(toy_family.get_config(), **fields)


@pytest.fixture(scope="session")
def toy_family_path():
  """The toy family's file, usable as `--config` by a subprocess that has tests/ on PYTHONPATH."""
  return toy_family.__file__


# ------------------------------------------------------------------------------------------------
# A tiny multi-scale residual tokenizer with the interface VAR needs (embedding + nearest
# upsampling, integer area downsampling), for VAR tests where the real tokenizer would be slow.


def _area_down(x_BxHxWxC, pn):
  B, H, W, C = x_BxHxWxC.shape
  r = H // pn
  return x_BxHxWxC.reshape(B, pn, r, pn, r, C).mean(axis=(2, 4))


def _nearest_up(x_BxhxwxC, size):
  r = size // x_BxhxwxC.shape[1]
  return jnp.repeat(jnp.repeat(x_BxhxwxC, r, axis=1), r, axis=2)


class FakeMSTokenizer:
  """Residual multi-scale VQ over a 2x-downsampled linear latent; patch_nums must divide P."""

  def __init__(self, patch_nums=(1, 2, 4), vocab_size=16, z_channels=8, image_size=8, channels=1):
    self.config = mlc.ConfigDict(
      dict(model=dict(patch_nums=tuple(patch_nums), vocab_size=vocab_size, z_channels=z_channels))
    )
    self.patch_nums = tuple(patch_nums)
    self.P = self.patch_nums[-1]
    self.image_size, self.channels = image_size, channels
    self.down = image_size // self.P

  def init(self, rng):
    k1, k2, k3 = jax.random.split(rng, 3)
    V, C = self.config.model.vocab_size, self.config.model.z_channels
    return {
      "codebook": jax.random.normal(k1, (V, C)),
      "enc": jax.random.normal(k2, (self.channels, C)),
      "dec": jax.random.normal(k3, (C, self.channels)) / math.sqrt(C),
    }

  def codebook(self, p):
    return p["codebook"]

  def encode_idx(self, p, images):
    f = _area_down(images, self.P) @ p["enc"]
    f_rest, out = f, []
    for pn in self.patch_nums:
      z = _area_down(f_rest, pn).reshape(f.shape[0], pn * pn, -1)
      d = jnp.sum((z[:, :, None, :] - p["codebook"][None, None]) ** 2, axis=-1)
      idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
      out.append(idx)
      h = _nearest_up(p["codebook"][idx].reshape(f.shape[0], pn, pn, -1), self.P)
      f_rest = f_rest - h
    return out

  def next_input(self, p, si, f_hat, h_BxpnxpnxC):
    f_hat = f_hat + _nearest_up(h_BxpnxpnxC, self.P)
    if si == len(self.patch_nums) - 1:
      return f_hat, None
    return f_hat, _area_down(f_hat, self.patch_nums[si + 1])

  def idx_to_var_input(self, p, idx_list):
    B = idx_list[0].shape[0]
    C = self.config.model.z_channels
    f_hat = jnp.zeros((B, self.P, self.P, C))
    outs = []
    for si, (pn, idx) in enumerate(zip(self.patch_nums[:-1], idx_list[:-1], strict=True)):
      f_hat, nxt = self.next_input(p, si, f_hat, p["codebook"][idx].reshape(B, pn, pn, C))
      outs.append(nxt.reshape(B, -1, C))
    return jnp.concatenate(outs, axis=1)

  def decode_fhat(self, p, f_hat):
    return jnp.tanh(_nearest_up(f_hat, self.image_size) @ p["dec"])


class FakeIndependentTokenizer(FakeMSTokenizer):
  """Adds FlexVAR-style independent scales (`model.scales="independent"`): each scale quantizes
  the downsampled latent on its own; the next input is a scale's code map upsampled."""

  def encode_idx_independent(self, p, images):
    f = _area_down(images, self.P) @ p["enc"]
    out = []
    for pn in self.patch_nums:
      z = _area_down(f, pn).reshape(f.shape[0], pn * pn, -1)
      d = jnp.sum((z[:, :, None, :] - p["codebook"][None, None]) ** 2, axis=-1)
      out.append(jnp.argmin(d, axis=-1).astype(jnp.int32))
    return out

  def independent_input(self, p, h_BxpnxpnxC, pn_next):
    return _nearest_up(h_BxpnxpnxC, pn_next)


def var_config(depth=2, width=32, heads=2, num_classes=5, **model_overrides):
  """A small VAR config (no tokenizer section: pair it with `FakeMSTokenizer`)."""
  c = mlc.ConfigDict()
  c.family = "var"
  c.data = mlc.ConfigDict(dict(num_classes=num_classes))
  c.model = mlc.ConfigDict(
    dict(
      depth=depth,
      width=width,
      num_heads=heads,
      mlp_ratio=4.0,
      drop_path_rate=0.0,
      cond_drop_rate=0.1,
      attn_l2_norm=True,
      shared_aln=False,
      aln=0.5,
      alng=1e-3,
      init_head=0.02,
      init_std=-1.0,
      norm_eps=1e-6,
      label_smoothing=0.0,
      attn_impl="xla",
    )
  )
  c.model.update(model_overrides)
  return c


def var_family(tok=None, **kw):
  """`(family, tokenizer)`: VAR over `tok` (default: a `FakeMSTokenizer`)."""
  from arvision.models import var as var_lib  # late: a broken model file fails only its tests

  tok = tok or FakeMSTokenizer()
  return var_lib.build(var_config(**kw), tokenizer=tok), tok


def var_params(family, tok, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = jax.jit(family.init, static_argnums=1)(k1, None)  # jit: far faster than eager init
  params["tokenizer"] = tok.init(k2)
  return params


_VAR_SETUPS: dict = {}


def var_setup(**kw):
  """Cached `(family, tokenizer, params, jitted apply)` per model config (tests share them)."""
  key = tuple(sorted(kw.items()))
  if key not in _VAR_SETUPS:
    fam, tok = var_family(**kw)
    params = var_params(fam, tok)
    _VAR_SETUPS[key] = (fam, tok, params, jax.jit(fam.apply, static_argnames="train"))
  return _VAR_SETUPS[key]


def random_images(seed, B, tok):
  return jax.random.uniform(
    jax.random.key(seed), (B, tok.image_size, tok.image_size, tok.channels), minval=-1, maxval=1
  )


@pytest.fixture(scope="session")
def var_kit():
  """The VAR test kit: `FakeMSTokenizer` (+ `FakeIndependentTokenizer`), `make_config`, `make_family`, `make_params`,
  `setup_var` (cached per config) and `random_images`."""
  return types.SimpleNamespace(
    FakeMSTokenizer=FakeMSTokenizer,
    FakeIndependentTokenizer=FakeIndependentTokenizer,
    make_config=var_config,
    make_family=var_family,
    make_params=var_params,
    setup_var=var_setup,
    random_images=random_images,
  )


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
  """A stand-in Hugging Face Hub on 127.0.0.1 serving tiny official-format VAR checkpoints under
  the real `var-d16` file names (tests/standin_hub.py), with HF_ENDPOINT / HF_HOME /
  ARVISION_CACHE pointing at it and `tmp_path`. Needs torch (it writes .pth files)."""
  import standin_hub  # noqa: PLC0415

  server = standin_hub.start(tmp_path, monkeypatch)
  yield server
  server.close()

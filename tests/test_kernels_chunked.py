"""Chunked attention kernels (interpret mode on CPU) against their pure-jnp references."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from arvision.kernels.chunked import (
  chunk_causal_attention,
  hybrid_chunk_attention,
  hybrid_chunk_attention_reference,
  hybrid_chunk_attention_scan,
)
from arvision.ops import attention, masks

DECAY = (0.8, 1.0)


def _qkv(b, length, h, d, dv=None, seed=0):
  rng = np.random.default_rng(seed)
  dv = dv or d
  shapes = ((b, length, h, d), (b, length, h, d), (b, length, h, dv))
  return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _naive_hybrid(q, k, v, chunk, decay, phi, scale):
  """Per-query float64 loop straight from the definition in reference.py."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, length, h, _ = q.shape
  feat = (lambda x: x) if phi == "identity" else (lambda x: np.where(x > 0, x + 1, np.exp(x)))
  out = np.zeros((b, length, h, v.shape[-1]))
  for t in range(length):
    c = t // chunk
    same = slice(c * chunk, (c + 1) * chunk)
    for hh in range(h):
      logits = scale * np.einsum("bd,bsd->bs", q[:, t, hh], k[:, same, hh])
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      out[:, t, hh] = np.einsum("bs,bsd->bd", p, v[:, same, hh])
      for s in range(c * chunk):
        w = (
          scale * decay[hh] ** (t - s) * np.einsum("bd,bd->b", feat(q[:, t, hh]), feat(k[:, s, hh]))
        )
        out[:, t, hh] += w[:, None] * v[:, s, hh]
  return out


@pytest.mark.parametrize("phi", ["identity", "elu1"])
def test_references_match_definition(phi):
  q, k, v = _qkv(1, 12, 2, 4, dv=3, seed=1)
  want = _naive_hybrid(q, k, v, 4, DECAY, phi, 0.5)
  ref = hybrid_chunk_attention_reference(q, k, v, chunk=4, decay=DECAY, phi=phi, scale=0.5)
  scan = hybrid_chunk_attention_scan(q, k, v, chunk=4, decay=DECAY, phi=phi, scale=0.5)
  np.testing.assert_allclose(ref, want, atol=1e-5)
  np.testing.assert_allclose(scan, want, atol=1e-5)


def _fwd_and_grads(fn, q, k, v, decay):
  def f(q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v, g)
    return out, vjp(jnp.cos(out))

  return jax.jit(f)(q, k, v, decay)


def _check_kernel(lowering, phi, decay):
  q, k, v = _qkv(2, 32, 2, 16, seed=2)
  g = jnp.asarray(decay if decay is not None else (1.0, 1.0), jnp.float32)
  kern = lambda q, k, v, g: hybrid_chunk_attention(
    q, k, v, chunk=8, decay=g, phi=phi, lowering=lowering
  )
  ref = lambda q, k, v, g: hybrid_chunk_attention_reference(q, k, v, chunk=8, decay=g, phi=phi)
  got, g_got = _fwd_and_grads(kern, q, k, v, g)
  want, g_want = _fwd_and_grads(ref, q, k, v, g)
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, atol=1e-5 * scale)
  # Tolerances relative to each gradient's size (d decay sums over every query-key pair).
  for name, a, b, tol in zip(
    ("q", "k", "v", "decay"), g_got, g_want, (1e-5,) * 3 + (1e-4,), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=tol * float(np.abs(b).max()) + 1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("phi,decay", [("identity", None), ("elu1", DECAY)])
def test_hybrid_gpu_style_kernel_matches_reference(phi, decay):
  _check_kernel("gpu", phi, decay)


def test_hybrid_tpu_style_kernel_matches_reference():
  # Scratch state over an "arbitrary" chunk axis: the Mosaic interpreter.
  with pltpu.force_tpu_interpret_mode():
    _check_kernel("tpu", "elu1", DECAY)


def test_hybrid_decay_matters_and_no_decay_is_plain_sum():
  q, k, v = _qkv(1, 16, 2, 8, seed=3)
  a = hybrid_chunk_attention(q, k, v, chunk=4, decay=(0.5, 0.5))
  b = hybrid_chunk_attention(q, k, v, chunk=4)
  assert float(jnp.abs(a - b).max()) > 1e-2
  # The first chunk sees no earlier chunk: pure softmax, equal for any decay.
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)


def test_chunk_causal_softmax_matches_xla():
  q, k, v = _qkv(2, 40, 2, 16, seed=4)
  f = lambda q, k, v: chunk_causal_attention(q, k, v, chunk=6, block_q=16, block_k=16)
  got = jax.jit(f)(q, k, v)
  np.testing.assert_allclose(
    got, attention(q, k, v, mask=masks.chunk_causal(6), impl="xla"), atol=1e-5
  )
  gk = jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(f(q, k, v)))))(k)
  gx = jax.grad(
    lambda k: jnp.sum(jnp.sin(attention(q, k, v, mask=masks.chunk_causal(6), impl="xla")))
  )(k)
  np.testing.assert_allclose(gk, gx, atol=1e-4)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"chunk": 5}, "multiple of chunk"),
    ({"chunk": 4, "phi": "relu"}, "phi must be one of"),
    ({"chunk": 4, "decay": (0.5,)}, r"decay must be None or \[H\]"),
    ({"chunk": 4, "decay": (0.5, 1.5)}, r"in \(0, 1\]"),
    ({"chunk": 4, "lowering": "cuda"}, "lowering must be one of"),
  ],
)
def test_bad_arguments(kwargs, match):
  q, k, v = _qkv(1, 16, 2, 8)
  with pytest.raises(ValueError, match=match):
    hybrid_chunk_attention(q, k, v, **kwargs)


_SHARD_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  from arvision.kernels import shard_attention
  from arvision.kernels.chunked import hybrid_chunk_attention
  from arvision.parallel.mesh import make_mesh
  assert jax.device_count() == 8
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((4, 16, 2, 8)), jnp.float32) for _ in range(3))
  g = jnp.asarray([0.7, 0.95], jnp.float32)
  fn = lambda q, k, v, g: hybrid_chunk_attention(q, k, v, chunk=4, decay=g, phi="elu1")
  sharded = shard_attention(fn, mesh, extra_in_specs=(P("tensor"),))
  out = jax.jit(sharded)(q, k, v, g)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(out, jax.jit(fn)(q, k, v, g), rtol=1e-6, atol=1e-5)
  print("SHARD_OK")
""")


def test_shard_map_on_8_host_devices_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  res = subprocess.run(
    [sys.executable, "-c", _SHARD_SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert res.returncode == 0 and "SHARD_OK" in res.stdout, res.stderr[-3000:]

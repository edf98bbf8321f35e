"""Kernels compiled for their real targets from this (CPU) host.

- TPU: splash attention with our mask specs, forward and backward, inside `shard_map` on a v5p
  slice described by libtpu (`jax.experimental.topologies`), compiled by the TPU compiler (Mosaic).
  Skipped only when libtpu is not installed (the `aot` extra; `make setup` installs it).
- GPU: the Triton scale-wise kernel (forward, backward, decode) lowered for `cuda` through
  `jax.export`, with its Triton compiler params. The CUDA plugin prints driver warnings on every
  `import jax`, so it is not installed into the environment: `make setup` puts it in
  `$VENV/cuda-aot` (`ARVISION_CUDA_AOT` overrides) and the lowering runs in a subprocess with it on
  the path. Skipped only when that directory has no plugin.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arvision.ops import masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (1, 4, 9, 16, 25, 36, 64)  # 155 tokens: padded to 256 inside the kernels
MASKS = {
  "scale_causal": masks.scale_causal(LENGTHS),
  "block_diagonal": masks.block_diagonal(LENGTHS),
  "chunk_causal": masks.chunk_causal(32),
}

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[aot]')",
)


@needs_libtpu
@pytest.mark.parametrize("name", sorted(MASKS))
def test_splash_compiles_for_tpu_inside_shard_map(name):
  from arvision.kernels import shard_attention
  from arvision.kernels.scalewise.kernel_tpu import splash_scalewise_attention
  from arvision.parallel import aot
  from arvision.target import target_backend

  devices = aot.topology_devices("v5p:2x2x1")
  mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"), devices=list(devices))
  fn = functools.partial(splash_scalewise_attention, mask=MASKS[name])
  attend = shard_attention(fn, mesh)

  def fwd_bwd(q, k, v):
    def loss(q, k, v):
      return attend(q, k, v).astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  x = jax.ShapeDtypeStruct((4, sum(LENGTHS), 4, 128), jnp.bfloat16, sharding=sh)
  with target_backend("tpu"):  # Mosaic, not interpret mode
    compiled = jax.jit(fwd_bwd).lower(x, x, x).compile()
  hlo = compiled.as_text()
  # Mosaic kernels are custom calls in the TPU program: the forward, and dq + dkv backward.
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 3, hlo[:2000]
  assert compiled.memory_analysis().temp_size_in_bytes > 0


def _cuda_plugin_dir() -> str | None:
  where = os.environ.get("ARVISION_CUDA_AOT") or os.path.join(sys.prefix, "cuda-aot")
  return where if os.path.isdir(os.path.join(where, "jax_cuda12_plugin")) else None


_LOWER_SCRIPT = textwrap.dedent(
  """
  import functools, json, sys
  import jax, jax.numpy as jnp
  from jax import export
  from arvision.kernels.scalewise import scalewise_attention, scalewise_decode
  from arvision.ops import masks

  lengths = (1, 4, 9, 16, 25, 36, 64)
  specs = dict(
    scale_causal=masks.scale_causal(lengths),
    block_diagonal=masks.block_diagonal(lengths),
    chunk_causal=masks.chunk_causal(32),
  )
  L = sum(lengths)
  q = jax.ShapeDtypeStruct((2, L, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, L, 2, 64), jnp.bfloat16)  # grouped-query: 2 kv heads
  q_step = jax.ShapeDtypeStruct((2, 36, 4, 64), jnp.bfloat16)
  # Triton calls have no export compatibility guarantee: allowed explicitly.
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  out = {}
  for name, mask in specs.items():
    attend = functools.partial(scalewise_attention, mask=mask, interpret=False)
    loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
    decode = functools.partial(
      scalewise_decode, mask=mask, q_offset=sum(lengths[:5]), interpret=False
    )
    for what, fn, args in (
      ("fwd", attend, (q, kv, kv)),
      ("bwd", jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv)),
      ("decode", decode, (q_step, kv, kv)),
    ):
      exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
      text = exp.mlir_module()
      out[f"{name}/{what}"] = dict(
        platforms=list(exp.platforms),
        triton_calls=text.count("__gpu$xla.gpu.triton"),
        num_warps=text.count("num_warps = 4"),
      )
  print("RESULT " + json.dumps(out))
  """
)


@pytest.mark.skipif(_cuda_plugin_dir() is None, reason="no CUDA plugin in $VENV/cuda-aot")
def test_triton_scalewise_kernel_lowers_for_cuda():
  import json

  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([_cuda_plugin_dir(), ROOT, os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
    [sys.executable, "-c", _LOWER_SCRIPT], env=env, capture_output=True, text=True, timeout=600
  )
  lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  result = json.loads(lines[0][len("RESULT ") :])
  assert len(result) == 9
  for key, r in result.items():
    assert r["platforms"] == ["cuda"], key
    # fwd: one kernel; bwd: the forward (residuals) + dq + dkv; decode: one kernel.
    want = 3 if key.endswith("/bwd") else 1
    assert r["triton_calls"] == want, (key, r)
    assert r["num_warps"] == want, (key, r)  # the CompilerParams reached every kernel


# ARFlow's gated hybrid kernel (`kernels/chunked`, the `arflow` family's attention), forward and
# backward (the backward is the scan, in XLA), compiled for both targets.
_HYBRID_GPU_SCRIPT = textwrap.dedent(
  """
  import json
  import jax, jax.numpy as jnp
  from jax import export
  from arvision.kernels.chunked import gated_hybrid_chunk_attention

  def loss(q, k, v, g):
    out = gated_hybrid_chunk_attention(q, k, v, g, chunk=256, lowering="gpu", interpret=False)
    return out.astype(jnp.float32).sum()

  x = jax.ShapeDtypeStruct((2, 1024, 2, 64), jnp.float32)
  g = jax.ShapeDtypeStruct((2, 1024, 2), jnp.float32)
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  exp = export.export(fn, platforms=["cuda"], disabled_checks=checks)(x, x, x, g)
  text = exp.mlir_module()
  print("RESULT " + json.dumps(dict(platforms=list(exp.platforms),
                                    triton_calls=text.count("__gpu$xla.gpu.triton"))))
  """
)


@pytest.mark.slow  # a subprocess with the CUDA plugin (~5 s)
@pytest.mark.skipif(_cuda_plugin_dir() is None, reason="no CUDA plugin in $VENV/cuda-aot")
def test_gated_hybrid_kernel_lowers_for_cuda():
  import json

  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([_cuda_plugin_dir(), ROOT, os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
    [sys.executable, "-c", _HYBRID_GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=600
  )
  lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  result = json.loads(lines[0][len("RESULT ") :])
  assert result == {"platforms": ["cuda"], "triton_calls": 1}, result  # the forward kernel


@pytest.mark.slow  # a Mosaic compile (~10 s on a loaded 2-core CPU)
@needs_libtpu
def test_gated_hybrid_kernel_compiles_for_tpu():
  from arvision.kernels.chunked import gated_hybrid_chunk_attention
  from arvision.parallel import aot
  from arvision.target import target_backend

  devices = aot.topology_devices("v5p:2x2x1")
  mesh = jax.make_mesh((1,), ("data",), devices=list(devices)[:1])

  def fwd_bwd(q, k, v, g):
    def loss(q, k, v, g):
      out = gated_hybrid_chunk_attention(q, k, v, g, chunk=256, lowering="tpu", interpret=False)
      return out.astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, g)

  sh = NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((2, 1024, 2, 64), jnp.float32, sharding=sh)
  g = jax.ShapeDtypeStruct((2, 1024, 2), jnp.float32, sharding=sh)
  with target_backend("tpu"):
    compiled = jax.jit(fwd_bwd).lower(x, x, x, g).compile()
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 1  # the forward

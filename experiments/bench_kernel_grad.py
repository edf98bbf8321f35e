"""A Dense layer's kernel gradient on XLA:CPU, in both operand orders (why `models/common.py`
`_matmul_2d` computes `(g^T x)^T` when K > N).

For `y = x @ w` over M = B * L rows, the kernel gradient is a product over M. XLA:CPU runs it on
its own dot path (not YNNPACK's), and its speed there depends on the operand order. This times,
in alternating rounds, for the `configs/var.py:fmnist` training shapes (M = 64 * 130; fc2, fc1,
the fused qkv):

- `x^T g`: `dot_general(x, g)` contracting M, the order autodiff of `x @ w` gives;
- `(g^T x)^T`: `dot_general(g, x)` behind an optimization barrier, then the small transpose;
- `Dense grad`: the kernel gradient of `arvision.models.common.Dense` as the models run it;
- `torch x.t() @ g`: the same product in PyTorch, when torch is installed (as the official code
  computes it).

    python experiments/bench_kernel_grad.py --out experiments/results/bench_kernel_grad_cpu.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from arvision.models.common import Dense

M = 64 * 130
SHAPES = {"fc2 (K=4C > N=C)": (512, 128), "fc1 (K=C < N=4C)": (128, 512), "qkv": (128, 384)}
CONTRACT_M = (((0,), (0,)), ((), ()))


def variants(k, n):
  x = jax.random.normal(jax.random.key(0), (M, k))
  g = jax.random.normal(jax.random.key(1), (M, n))
  dense = Dense(n, use_bias=False)
  params = dense.init(jax.random.key(2), x[None, :8])

  def dense_grad(p, x, g):
    _, vjp = jax.vjp(lambda p: dense.apply(p, x[None]), p)
    return vjp(g[None])[0]["params"]["kernel"]

  out = {
    "x^T g": (jax.jit(lambda x, g: jax.lax.dot_general(x, g, CONTRACT_M)), (x, g)),
    "(g^T x)^T": (
      jax.jit(lambda x, g: jax.lax.optimization_barrier(jax.lax.dot_general(g, x, CONTRACT_M)).T),
      (x, g),
    ),
    "Dense grad": (jax.jit(dense_grad), (params, x, g)),
  }
  try:
    import torch  # noqa: PLC0415

    tx, tg = torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(g))
    out["torch x.t() @ g"] = (lambda tx, tg: tx.t() @ tg, (tx, tg))
  except ImportError:
    pass
  ref = np.asarray(out["x^T g"][0](x, g))
  for name, (fn, args) in out.items():  # every variant computes the same [K, N] gradient
    got = np.asarray(fn(*args))
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-2, err_msg=name)
  return out


def block(r):
  return r.block_until_ready() if hasattr(r, "block_until_ready") else r


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  try:
    import torch  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  rows = []
  for label, (k, n) in SHAPES.items():
    fns = variants(k, n)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
      for name, (fn, fargs) in fns.items():
        t0 = time.perf_counter()
        block(fn(*fargs))
        times[name].append(time.perf_counter() - t0)
    ms = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
    rows.append(dict(layer=label, M=M, K=k, N=n, median_ms=ms))
    print(f"{label:18s} M={M} K={k} N={n}  " + "  ".join(f"{a}: {b} ms" for a, b in ms.items()))
  jdev = jax.devices()[0]
  doc = dict(
    what="kernel gradient of x @ w over M rows, median ms per call; see "
    "experiments/bench_kernel_grad.py",
    device=f"{jdev.platform}: {jdev.device_kind}",
    host=dict(cpu_count=os.cpu_count(), loadavg_at_start=[round(x, 2) for x in os.getloadavg()]),
    versions=dict(jax=jax.__version__, torch=torch_version, python=platform.python_version()),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    settings=dict(rounds=args.rounds, dtype="float32"),
    command="python experiments/bench_kernel_grad.py " + " ".join(argv or sys.argv[1:]),
    rows=rows,
  )
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(doc, f, indent=2)
    print(f"wrote {args.out}")
  return doc


if __name__ == "__main__":
  main()

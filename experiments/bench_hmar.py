"""HMAR vs VAR training step at the same depth, side by side in one run.

    python experiments/bench_hmar.py --config configs/hmar.py:fmnist --batch 64 \
        --out experiments/results/bench_hmar_cpu.json
    python experiments/bench_hmar.py --config configs/hmar.py:d16 --batch 32 --attn_impl auto \
        --out experiments/results/bench_hmar_gpu.json          # a GPU: pallas / cudnn kernels

Random weights of the config (`configs/hmar.py:<variant>`) and of VAR at the same variant
(`configs/var.py:<variant>`), the same synthetic batch. One jitted step each = the loss
(tokenizer encoding included, as in `arvision train`), its gradient and an AdamW update:
- `var`: VAR, scale-causal mask, every token 1/L;
- `hmar_stage1`: HMAR stage 1, block-diagonal mask, lognormal scale weights;
- `hmar_stage2`: HMAR stage 2, masked prediction; only the mask params train (the stage-1 ones are
  frozen inputs of the step, as in the loop).
Timed calls are interleaved (a load change on a shared CPU hits every row alike); the median of
`--runs` after a warm-up call. `xla_bytes`: the compiled step's argument + output + temp bytes
(XLA memory analysis, any backend). Writes JSON with device, versions, config and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import ml_collections as mlc
import numpy as np
import optax

from arvision import config_util, data, families


def _family(spec: str, attn_impl: str, stage: int | None = None):
  c = mlc.ConfigDict(config_util.load_config_file(spec).to_dict())
  c.model.attn_impl = attn_impl
  if stage is not None:
    c.model.stage = stage
  c.lock()
  tok = families.build(c.tokenizer.config)
  return c, families.build(c, tokenizer=tok)


def _step(fam, tx):
  def step(trainable, frozen, opt, batch, rng):
    def loss_fn(p):
      return fam.loss({**p, **frozen}, batch, rng, True)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt = tx.update(grads, opt, trainable)
    return optax.apply_updates(trainable, updates), opt, loss

  return jax.jit(step, donate_argnums=(0, 2))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/hmar.py:fmnist")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--attn_impl", default="xla", help="ops.attention impl (auto on a GPU)")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  variant = args.config.rpartition(":")[2].removesuffix("_stage1")
  rows = {
    "var": _family(f"configs/var.py:{variant}", args.attn_impl),
    "hmar_stage1": _family(args.config, args.attn_impl, stage=1),
    "hmar_stage2": _family(args.config, args.attn_impl, stage=2),
  }
  config = rows["var"][0]
  tok = rows["var"][1].tokenizer
  tok_params = jax.jit(tok.init, static_argnums=1)(jax.random.key(1), None)
  rng = np.random.default_rng(0)
  spec = data.input_spec(config.data, args.batch)
  batch = {
    k: (
      rng.integers(0, config.data.num_classes, x.shape).astype(x.dtype)
      if np.issubdtype(x.dtype, np.integer)
      else rng.uniform(-1, 1, x.shape).astype(x.dtype)
    )
    for k, x in spec.items()
  }
  tx = optax.adamw(1e-4)
  calls, info = {}, {}
  for name, (_, fam) in rows.items():
    trainable = fam.init(jax.random.key(0), None)
    frozen = {"tokenizer": tok_params, **fam.init_frozen(jax.random.key(0))}
    step = _step(fam, tx)
    state = {"p": trainable, "opt": tx.init(trainable)}
    mem = step.lower(state["p"], frozen, state["opt"], batch, jax.random.key(2)).compile()
    mem = mem.memory_analysis()
    info[name] = dict(
      trainable_params=int(sum(x.size for x in jax.tree.leaves(trainable))),
      xla_bytes=int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes),
      xla_temp_bytes=int(mem.temp_size_in_bytes),
    )

    def call(step=step, state=state, frozen=frozen):
      state["p"], state["opt"], loss = step(
        state["p"], frozen, state["opt"], batch, jax.random.key(2)
      )
      return loss

    calls[name] = call
  first, times = {}, {n: [] for n in calls}
  for name, call in calls.items():
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first[name] = round(time.perf_counter() - t0, 3)
  for _ in range(args.runs):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  out_rows = []
  var_s = statistics.median(times["var"])
  for name in calls:
    med = statistics.median(times[name])
    out_rows.append(
      dict(
        impl=name,
        median_step_s=med,
        runs_s=[round(t, 4) for t in times[name]],
        first_call_s=first[name],
        steps_per_s=1.0 / med,
        speed_over_var=var_s / med,
        xla_bytes_over_var=info[name]["xla_bytes"] / info["var"]["xla_bytes"],
        **info[name],
      )
    )
    r = out_rows[-1]
    print(
      f"{name:>12} {med * 1e3:9.1f} ms/step  x{r['speed_over_var']:.2f} vs VAR  "
      f"{r['xla_bytes'] / 2**20:8.1f} MiB (x{r['xla_bytes_over_var']:.2f})",
      flush=True,
    )
  jdev = jax.devices()[0]
  m = rows["hmar_stage2"][0].model
  result = dict(
    what="training step (loss + grad + AdamW), HMAR vs VAR at the same depth, random weights",
    device=f"{jdev.platform}: {jdev.device_kind}",
    host=dict(cpu_count=os.cpu_count(), loadavg_at_start=[round(x, 2) for x in os.getloadavg()]),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
    config=dict(
      spec=args.config,
      depth=int(m.depth),
      width=int(m.width),
      mask_depth=int(m.mask_depth),
      batch=args.batch,
      image_size=int(config.data.image_size),
      attn_impl=args.attn_impl,
    ),
    command="python experiments/bench_hmar.py " + " ".join(sys.argv[1:] if argv is None else argv),
    rows=out_rows,
  )
  out = args.out or f"experiments/results/bench_hmar_{jdev.platform}.json"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

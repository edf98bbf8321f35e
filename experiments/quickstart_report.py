"""Collects a finished generator run (tokenizer + generator + `arvision eval`) into a results JSON.

    /usr/bin/time -f %e make quickstart   # prints the wall seconds
    python experiments/quickstart_report.py --workdir runs/quickstart --wall_s SECONDS
    python experiments/quickstart_report.py --workdir runs/raster --wall_s S --train_wall_s T \
        --command "arvision train --config configs/raster.py:fmnist ..." \
        --out experiments/results/raster_fmnist_cpu.json

Also records the machine: CPU model, vector extensions and a calibration measured here and now
(fp32 matmul GFLOP/s; the time of one fixed small VAR training step), so job times compare across
machines. `--calibrate_only` prints just that.

Reads the tokenizer's (in-loop: 1,000 test images; and the whole test split when
`arvision eval --num_samples 10000 --out W/tokenizer/eval_full` was run) and VAR's final eval metrics and the real-data floor of the domain metrics
(experiments/results/domain_classifier.json) at the same sample count, and records the ratio.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOKENIZER_KEYS = ("psnr", "ssim", "usage", "perplexity")


VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "neon", "asimd", "sve")  # fmt: skip
# The fixed calibration step: VAR at the quickstart's first recipe size, on codes (no tokenizer).
CALIBRATION = dict(config="configs/var.py:fmnist", depth=4, width=128, heads=4, batch_size=32)


def cpu_info() -> dict:
  model, flags = platform.processor() or platform.machine(), set()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, val = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine()):
          model = val.strip()
        elif key.strip() in ("flags", "Features") and not flags:
          flags = set(val.split())
  return dict(
    model=model,
    cores=os.cpu_count(),
    vector_extensions=[f for f in VECTOR_FLAGS if f in flags],
  )


def _best_time(fn, repeats: int) -> float:
  fn()  # compile / warm
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def calibrate(repeats: int = 5) -> dict:
  """fp32 matmul GFLOP/s (1024^3, best of `repeats`) and one fixed small VAR step's time (ms)."""
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  t_mm = _best_time(lambda: mm(a).block_until_ready(), repeats)

  from arvision import config_util, families, parallel
  from arvision import train as train_lib

  config = config_util.from_json(
    config_util.to_json(config_util.load_config_file(CALIBRATION["config"]))
  )
  with config.unlocked():
    config.model.depth = CALIBRATION["depth"]
    config.model.width = CALIBRATION["width"]
    config.model.num_heads = CALIBRATION["heads"]
    config.data.batch_size = CALIBRATION["batch_size"]
    config.optim.ema_decay = 0.0
    config.tokenizer.checkpoint = ""
  tok_cfg = config_util.from_json(config_util.to_json(config.tokenizer.config))
  tok = families.build(tok_cfg)
  family = families.build(config, tokenizer=tok)
  frozen = {"tokenizer": tok.init(jax.random.key(0))}
  seq = sum(p * p for p in tok.patch_nums)
  rng = np.random.default_rng(0)
  b = CALIBRATION["batch_size"]
  batch = dict(
    tokens=jnp.asarray(rng.integers(0, tok.vocab_size, (b, seq)), jnp.int32),
    label=jnp.asarray(rng.integers(0, 10, (b,)), jnp.int32),
  )
  mesh = parallel.make_mesh(config.mesh)
  setup = train_lib.build(config, family, frozen, mesh, example=batch)
  state = [setup.init(setup.init_rng)]
  gb = parallel.global_batch(batch, mesh)

  def step():
    state[0], m = setup.step(state[0], gb)
    jax.block_until_ready(m)

  t_step = _best_time(step, repeats)
  return dict(
    matmul_fp32_gflops=round(2 * n**3 / t_mm / 1e9, 1),
    matmul_shape=[n, n, n],
    var_step_ms=round(1e3 * t_step, 1),
    var_step=CALIBRATION,
    note="best of %d; on a busy machine both are slower" % repeats,
    load_avg_1min=os.getloadavg()[0],
  )


def machine(calibration: bool = True) -> dict:
  return dict(
    cpu=cpu_info(),
    calibration=calibrate() if calibration else "skipped (--skip_calibration)",
    load_avg_1min=os.getloadavg()[0],
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    device=str(jax.devices()[0]),
    num_devices=jax.device_count(),
  )


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _last_eval(workdir):
  evals = sorted(d for d in os.listdir(os.path.join(workdir, "eval")) if d.startswith("step_"))
  with open(os.path.join(workdir, "eval", evals[-1], "metrics.json")) as f:
    return json.load(f)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/quickstart")
  ap.add_argument("--wall_s", type=float, help="wall time of the whole job (required unless "
                  "--calibrate_only)")  # fmt: skip
  ap.add_argument("--calibrate_only", action="store_true", help="print the machine record only")
  ap.add_argument("--skip_calibration", action="store_true", help="busy machine: record no figure")
  ap.add_argument("--train_wall_s", type=float, help="wall time of `arvision train` alone")
  ap.add_argument("--command", help="what was run (default: the quickstart)")
  ap.add_argument("--out", default="experiments/results/quickstart_cpu.json")
  args = ap.parse_args()
  if args.calibrate_only:
    print(json.dumps(machine(), indent=2))
    return
  if args.wall_s is None:
    ap.error("--wall_s is required")
  with open(os.path.join(args.workdir, "eval", "metrics.json")) as f:
    var_eval = json.load(f)
  with open(os.path.join(args.workdir, "config.json")) as f:
    run_config = json.load(f)
  family = run_config["family"]
  tok_dir = os.path.join(args.workdir, "tokenizer")
  tok_full = None
  if os.path.isdir(tok_dir):  # trained in this job
    tok_eval = _last_eval(tok_dir)
    tokenizer = dict(
      source="trained in this job",
      step=tok_eval["step"],
      **{k: tok_eval["metrics"][k] for k in TOKENIZER_KEYS if k in tok_eval["metrics"]},
    )
    # `arvision eval --workdir W/tokenizer --num_samples 10000 --out W/tokenizer/eval_full`
    full = os.path.join(tok_dir, "eval_full", "metrics.json")
    tok_full = json.load(open(full))["metrics"] if os.path.exists(full) else None
  else:  # the shipped tokenizer (arvision/tokenizers/shipped.py)
    from arvision.tokenizers import shipped

    spec = run_config["tokenizer"]["checkpoint"]
    info = shipped.info(spec)
    tokenizer = dict(source=spec, step=info["step"], command=info["command"], **info["metrics"])
  with open("experiments/results/domain_classifier.json") as f:
    floors = json.load(f)["floor_train_vs_test"]
  n = str(var_eval["num_samples"])
  floor = floors.get(n)
  m = var_eval["metrics"]
  result = dict(
    command=args.command
    or "time make quickstart (fresh clone; var.py:fmnist on the shipped tokenizer; "
    f"arvision eval --num_samples {n})",
    wall_s=args.wall_s,
    train_wall_s=args.train_wall_s,
    tokenizer=tokenizer,
    tokenizer_full_test_split=tok_full
    and {k: tok_full[k] for k in TOKENIZER_KEYS if k in tok_full},
    **{
      family: dict(
        step=var_eval["step"],
        sampling=var_eval["sampling"],
        **{
          k: m[k]
          for k in (
            "class_accuracy",
            "fd_fmnist",
            "precision_fmnist",
            "recall_fmnist",
            "kid_fmnist",
            "is_fmnist",
          )
        },
      )
    },
    floor_same_n=floor,
    fd_over_floor=m["fd_fmnist"] / floor["fd_fmnist"] if floor else None,
    stages=_read_json(os.path.join(args.workdir, "stage_times.json")),
    machine=machine(not args.skip_calibration),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
  )
  print(json.dumps(result, indent=2))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

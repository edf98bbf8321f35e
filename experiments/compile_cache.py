"""First-call time with the persistent compilation cache cold, warm and off, in fresh processes.

    python experiments/compile_cache.py --out experiments/results/compile_cache_cpu.json
    python experiments/compile_cache.py --smoke          # var.py:smoke, one round: checks the script

What a user waits for after a restart (`arvision.compile_cache`, on by default):
- `sample`: `arvision.load(workdir)` then the first `model.sample(labels, rng)` (compile + run) and
  a second call (run only), in a fresh Python process (a notebook restart).
- `train`: the loop's own `arvision.train.build(...)`: sharded init + the first jitted step
  (compile + run) and a second step, in a fresh process, after `compile_cache.enable()` as
  `arvision train` does.
- `cli_sample`: the wall time of a whole `arvision sample --workdir W --out grid.png` process
  (start-up, imports, load, compile, sampling, PNG).

Modes, per round: `off` (ARVISION_COMPILE_CACHE=0), `cold` (an empty cache directory) and `warm`
(the same directory again, right after `cold`). Medians over `--rounds`. The model: random weights
of `--config` (VAR and its tokenizer), written once as a params-only checkpoint that
`arvision.load` reads; no data and no training are involved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUP = """
import sys, jax
from arvision import checkpoint, config_util, families
config = config_util.load_config_file(sys.argv[1])
tok = families.build(config.tokenizer.config)
fam = families.build(config, tokenizer=tok)
k_var, k_tok = jax.random.split(jax.random.key(0))
tok_params = tok.init(k_tok, None)
frozen = {"tokenizer": {"ae": tok_params["ae"]} if "ae" in tok_params else tok_params}
checkpoint.save_export(sys.argv[2], fam.init(k_var, None), frozen, config)
"""

SAMPLE = """
import json, sys, time
t0 = time.perf_counter()
import jax, arvision
model = arvision.load(sys.argv[1])
labels = [i % int(model.config.data.num_classes) for i in range(int(sys.argv[2]))]
t1 = time.perf_counter()
jax.block_until_ready(model.sample(labels, jax.random.key(0)))
t2 = time.perf_counter()
jax.block_until_ready(model.sample(labels, jax.random.key(1)))
t3 = time.perf_counter()
print("RESULT", json.dumps(dict(load_s=t1 - t0, first_call_s=t2 - t1, second_call_s=t3 - t2)))
"""

TRAIN = """
import json, sys, time
t0 = time.perf_counter()
import jax, numpy as np
from arvision import compile_cache, config_util, data, families, parallel, train
compile_cache.enable()  # as `arvision train` does
config = config_util.load_config_file(sys.argv[1])
with config.unlocked():
  config.data.batch_size = int(sys.argv[2])
tok = families.build(config.tokenizer.config)
fam = families.build(config, tokenizer=tok)
tok_params = tok.init(jax.random.key(1), None)
frozen = {"tokenizer": {"ae": tok_params["ae"]} if "ae" in tok_params else tok_params}
setup = train.build(config, fam, jax.tree.map(np.asarray, frozen))
rng = np.random.default_rng(0)
batch = {}
for key, x in data.input_spec(config.data).items():
  if np.issubdtype(x.dtype, np.integer):
    batch[key] = rng.integers(0, int(config.data.num_classes), x.shape).astype(x.dtype)
  else:
    batch[key] = rng.uniform(-1, 1, x.shape).astype(x.dtype)
batch = parallel.global_batch(batch, setup.mesh)
t1 = time.perf_counter()
state = setup.init(setup.init_rng)
state, metrics = setup.step(state, batch)
jax.block_until_ready(metrics)
t2 = time.perf_counter()
state, metrics = setup.step(state, batch)
jax.block_until_ready(metrics)
t3 = time.perf_counter()
print("RESULT", json.dumps(dict(load_s=t1 - t0, first_call_s=t2 - t1, second_call_s=t3 - t2)))
"""


def _env(mode: str, cache_root: str) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["ARVISION_CACHE"] = cache_root
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["ARVISION_COMPILE_CACHE"] = "0" if mode == "off" else "1"
  return env


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
  return wall, proc.stdout


def measure(what: str, mode: str, cache_root: str, workdir: str, args) -> dict:
  env = _env(mode, cache_root)
  if what == "cli_sample":
    out = os.path.join(cache_root, "grid.png")
    cmd = [sys.executable, "-m", "arvision.cli", "sample", "--workdir", workdir, "--out", out]
    cmd += ["--labels", ",".join(str(i) for i in range(args.batch)), "--per_label", "1"]
    wall, _ = _run(cmd, env)
    return dict(wall_s=wall)
  code, arg = (SAMPLE, workdir) if what == "sample" else (TRAIN, args.config)
  wall, stdout = _run([sys.executable, "-c", code, arg, str(args.batch)], env)
  line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
  return dict(json.loads(line[len("RESULT ") :]), wall_s=wall)


def _cache_size(cache_root: str) -> dict:
  root = os.path.join(cache_root, "jax")
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  return dict(entries=len(files), bytes=sum(os.path.getsize(f) for f in files))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/var.py:fmnist", help="a VAR config")
  ap.add_argument("--batch", type=int, default=8, help="labels per sample call; train batch")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--what", default="sample,train,cli_sample")
  ap.add_argument("--smoke", action="store_true", help="var.py:smoke, one round, batch 2")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  if args.smoke:
    args.config, args.rounds, args.batch = "configs/var.py:smoke", 1, 2
  whats = [w for w in args.what.split(",") if w]
  for w in whats:
    if w not in ("sample", "train", "cli_sample"):
      raise SystemExit(f"--what: unknown {w!r}; accepted: sample, train, cli_sample")

  tmp = tempfile.mkdtemp(prefix="arvision_compile_cache_")
  try:
    workdir = os.path.join(tmp, "model")
    env = _env("off", os.path.join(tmp, "setup"))
    _run([sys.executable, "-c", SETUP, args.config, workdir], env)
    rows, sizes = [], []
    for r in range(args.rounds):
      for what in whats:
        root = os.path.join(tmp, f"cache_{what}_{r}")
        for mode in ("off", "cold", "warm"):
          row = dict(what=what, mode=mode, round=r, **measure(what, mode, root, workdir, args))
          print(json.dumps(row), flush=True)
          rows.append(row)
          if mode == "cold":
            sizes.append(dict(what=what, round=r, **_cache_size(root)))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  summary = {}
  for what in whats:
    for mode in ("off", "cold", "warm"):
      sel = [x for x in rows if x["what"] == what and x["mode"] == mode]
      summary[f"{what}/{mode}"] = {
        k: statistics.median(x[k] for x in sel)
        for k in ("first_call_s", "second_call_s", "wall_s")
        if k in sel[0]
      }
  import jax  # noqa: PLC0415 -- the parent only reports the versions

  from arvision import compile_cache  # noqa: PLC0415

  result = dict(
    device=dict(platform=jax.devices()[0].platform, kind=jax.devices()[0].device_kind,
                cpus=os.cpu_count(), host=platform.machine()),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
    config=dict(spec=args.config, batch=args.batch, rounds=args.rounds,
                min_compile_time_secs=compile_cache.MIN_COMPILE_TIME_SECS),
    command="python experiments/compile_cache.py " + " ".join(argv or sys.argv[1:]),
    load_average_end=os.getloadavg(),
    cache_after_cold=sizes,
    summary=summary,
    rows=rows,
  )  # fmt: skip
  print(f"{'what/mode':<18} {'first call s':>12} {'second s':>9} {'process s':>10}")
  for key, v in summary.items():
    first, second = v.get("first_call_s"), v.get("second_call_s")
    print(
      f"{key:<18} {'' if first is None else f'{first:12.2f}':>12} "
      f"{'' if second is None else f'{second:9.2f}':>9} {v['wall_s']:10.2f}"
    )
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()

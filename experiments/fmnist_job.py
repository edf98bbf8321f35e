"""One Fashion-MNIST job of a family, start to finish, into a results JSON.

    python experiments/fmnist_job.py --config configs/hmar.py:fmnist --workdir runs/fm_hmar \
        --set model.stage1_steps=300 --set total_steps=100 --num_samples 1000

runs, timed, in a fresh workdir (refused if it holds a run):
  1. `arvision train --config SPEC --workdir W --config.eval.num_samples=250 [--config.K=V ...]`
     (the family's config trains its tokenizer first under W/tokenizer unless it names a shipped
     or trained one; the in-training eval uses one batch of 250 samples: the `fmnist` configs'
     eval batch, so that step 2 loads the compiled sampler from the persistent cache);
  2. `arvision eval --workdir W --num_samples N --out W/eval`;
then writes `experiments/results/<family>_fmnist_cpu.json`: the commands (relative paths), wall
time per stage (the tokenizer's and HMAR stage 1's share of `train` from their metrics files'
modification times), the generator's and tokenizer's measured steps/s, the tokenizer's metrics,
the generator's metrics at N with the sampling knobs (and those of its in-training evals), the
real-data floor at the same N (experiments/results/domain_classifier.json) and fd/floor, the
device, CPU count and versions.
The JSON fields are those of experiments/quickstart_report.py (whose readers it reuses).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arvision.metrics_writer import read_jsonl  # noqa: E402
from experiments import quickstart_report as qr  # noqa: E402

GEN_KEYS = ("class_accuracy", "fd_fmnist", "precision_fmnist", "recall_fmnist", "kid_fmnist",
            "is_fmnist")  # fmt: skip
FLOOR_JSON = "experiments/results/domain_classifier.json"


def commands(spec: str, workdir: str, sets: list[str], num_samples: int) -> dict:
  """The two stages' argv (relative paths only: they go into a committed JSON)."""
  for p in (spec, workdir):
    if os.path.isabs(p):
      raise SystemExit(f"use a relative path (it is recorded in the results JSON): {p!r}")
  for kv in sets:
    if "=" not in kv:
      raise SystemExit(f"--set takes key=value (a config field), got {kv!r}")
  train = ["arvision", "train", "--config", spec, "--workdir", workdir,
           "--config.eval.num_samples=250"]  # fmt: skip
  train += [f"--config.{kv}" for kv in sets]
  evaluate = ["arvision", "eval", "--workdir", workdir, "--num_samples", str(num_samples),
              "--out", os.path.join(workdir, "eval")]  # fmt: skip
  return dict(train=train, eval=evaluate)


def _mean_steps_per_s(path: str):
  if not os.path.exists(path):
    return None
  rows = [r for r in read_jsonl(path) if "train/steps_per_s" in r]
  rows = rows[1:] or rows  # the first window holds compilation
  return sum(r["train/steps_per_s"] for r in rows) / len(rows) if rows else None


def in_training_evals(workdir: str) -> list:
  """The generator's evals during training (`eval_every`): step, sample count and the domain
  metrics, from its metrics.jsonl; the learning rate has not decayed yet at the midway ones."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = [r for r in read_jsonl(path) if "eval/fd_fmnist" in r] if os.path.exists(path) else []
  keys = ("num_samples", "heldout_loss", *GEN_KEYS)
  return [
    dict(step=r["step"], **{k: r[f"eval/{k}"] for k in keys if f"eval/{k}" in r}) for r in rows
  ]


def substages(workdir: str, train_start: float, train_wall_s: float) -> dict:
  """Where `arvision train`'s time went: nested runs end when their metrics file was last written."""
  out, prev = {}, train_start
  for name in ("tokenizer", "stage1"):
    path = os.path.join(workdir, name, "metrics.jsonl")
    if os.path.exists(path):
      end = os.path.getmtime(path)
      out[f"{name}_s"] = round(end - prev, 1)
      prev = end
  out["generator_s"] = round(train_start + train_wall_s - prev, 1)
  return out


def collect(workdir: str, cmds: dict, stages: dict, num_samples: int) -> dict:
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    gen_eval = json.load(f)
  with open(os.path.join(workdir, "config.json")) as f:
    run_config = json.load(f)
  family = run_config["family"]
  tok_dir = os.path.join(workdir, "tokenizer")
  if os.path.isdir(tok_dir):
    tok_eval = qr._last_eval(tok_dir)
    with open(os.path.join(tok_dir, "config.json")) as f:
      tok_cfg = json.load(f)
    tokenizer = dict(
      source=f"trained in this job ({tok_cfg['variant']})",
      step=tok_eval["step"],
      num_images=tok_eval.get("num_samples"),
      **{k: tok_eval["metrics"][k] for k in qr.TOKENIZER_KEYS if k in tok_eval["metrics"]},
    )
  else:
    from arvision.tokenizers import shipped

    spec = run_config["tokenizer"]["checkpoint"]
    info = shipped.info(spec)
    tokenizer = dict(source=spec, step=info["step"], command=info["command"], **info["metrics"])
  with open(FLOOR_JSON) as f:
    floor = json.load(f)["floor_train_vs_test"].get(str(gen_eval["num_samples"]))
  m = gen_eval["metrics"]
  gen = dict(
    step=gen_eval["step"],
    num_samples=gen_eval["num_samples"],
    sampling=gen_eval["sampling"],
    **{k: m[k] for k in GEN_KEYS if k in m},
  )
  if family == "hmar":
    gen["stage1_steps"] = run_config["model"]["stage1_steps"]
  import jax

  return family, dict(
    command=" && ".join(" ".join(c) for c in cmds.values()),
    commands=cmds,
    config=cmds["train"][3],
    wall_s=round(sum(s for k, s in stages.items() if k in ("train_s", "eval_s")), 1),
    stages=stages,
    steps_per_s=dict(
      tokenizer=_mean_steps_per_s(os.path.join(tok_dir, "metrics.jsonl")),
      stage1=_mean_steps_per_s(os.path.join(workdir, "stage1", "metrics.jsonl")),
      generator=_mean_steps_per_s(os.path.join(workdir, "metrics.jsonl")),
      note="mean of the logged windows after the first (which holds compilation)",
    ),
    tokenizer=tokenizer,
    **{family: gen},
    in_training_evals=in_training_evals(workdir),
    floor_same_n=floor,
    fd_over_floor=m["fd_fmnist"] / floor["fd_fmnist"] if floor else None,
    machine=qr.machine(calibration=False),
    device=str(jax.devices()[0]),
    cpu_count=os.cpu_count(),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True, help="a config spec, e.g. configs/hmar.py:fmnist")
  ap.add_argument("--workdir", required=True, help="a fresh (relative) run directory")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override (--config.KEY=VALUE), repeatable")  # fmt: skip
  ap.add_argument("--num_samples", type=int, default=1000)
  ap.add_argument("--out", help="default experiments/results/<family>_fmnist_cpu.json")
  ap.add_argument("--collect_only", action="store_true", help="the runs are done: write the JSON")
  args = ap.parse_args()
  cmds = commands(args.config, args.workdir, args.set, args.num_samples)
  bin_dir = os.path.dirname(sys.executable)  # the venv's arvision, beside this python
  times = os.path.join(args.workdir, "job_times.json")
  if not args.collect_only:
    if os.path.exists(os.path.join(args.workdir, "config.json")):
      raise SystemExit(f"{args.workdir} holds a run; give a fresh --workdir")
    shutil.rmtree(os.path.join(args.workdir, "eval"), ignore_errors=True)
    os.makedirs(args.workdir, exist_ok=True)
    stages = {}
    for name, argv in cmds.items():
      print("+", " ".join(argv), flush=True)
      t0 = time.time()
      rc = subprocess.call([os.path.join(bin_dir, argv[0]), *argv[1:]])
      stages[f"{name}_s"] = round(time.time() - t0, 1)
      if name == "train":
        stages.update(substages(args.workdir, t0, stages["train_s"]))
      with open(times, "w") as f:
        json.dump(stages, f, indent=1)
      if rc:
        raise SystemExit(f"{name} failed (exit {rc})")
  with open(times) as f:
    stages = json.load(f)
  family, result = collect(args.workdir, cmds, stages, args.num_samples)
  out = args.out or f"experiments/results/{family}_fmnist_cpu.json"
  print(json.dumps(result, indent=2))
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print("wrote", out)


if __name__ == "__main__":
  main()

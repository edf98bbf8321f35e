"""Collects a finished generator run (tokenizer + generator + `arvision eval`) into a results JSON.

    /usr/bin/time -f %e make quickstart   # prints the wall seconds
    python experiments/quickstart_report.py --workdir runs/quickstart --wall_s SECONDS
    python experiments/quickstart_report.py --workdir runs/raster --wall_s S --train_wall_s T \
        --command "arvision train --config configs/raster.py:fmnist ..." \
        --out experiments/results/raster_fmnist_cpu.json

Reads the tokenizer's (in-loop: 1,000 test images; and the whole test split when
`arvision eval --num_samples 10000 --out W/tokenizer/eval_full` was run) and VAR's final eval metrics and the real-data floor of the domain metrics
(experiments/results/domain_classifier.json) at the same sample count, and records the ratio.
"""

import argparse
import json
import os
import platform

import jax

TOKENIZER_KEYS = ("psnr", "ssim", "usage", "perplexity")


def _last_eval(workdir):
  evals = sorted(d for d in os.listdir(os.path.join(workdir, "eval")) if d.startswith("step_"))
  with open(os.path.join(workdir, "eval", evals[-1], "metrics.json")) as f:
    return json.load(f)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/quickstart")
  ap.add_argument("--wall_s", type=float, required=True, help="wall time of the whole job")
  ap.add_argument("--train_wall_s", type=float, help="wall time of `arvision train` alone")
  ap.add_argument("--command", help="what was run (default: the quickstart)")
  ap.add_argument("--out", default="experiments/results/quickstart_cpu.json")
  args = ap.parse_args()
  with open(os.path.join(args.workdir, "eval", "metrics.json")) as f:
    var_eval = json.load(f)
  with open(os.path.join(args.workdir, "config.json")) as f:
    family = json.load(f)["family"]
  tok_eval = _last_eval(os.path.join(args.workdir, "tokenizer"))
  # `arvision eval --workdir W/tokenizer --num_samples 10000 --out W/tokenizer/eval_full`
  full = os.path.join(args.workdir, "tokenizer", "eval_full", "metrics.json")
  tok_full = json.load(open(full))["metrics"] if os.path.exists(full) else None
  with open("experiments/results/domain_classifier.json") as f:
    floors = json.load(f)["floor_train_vs_test"]
  n = str(var_eval["num_samples"])
  floor = floors.get(n)
  m = var_eval["metrics"]
  result = dict(
    command=args.command
    or "make quickstart (fresh workdir; tokenizer fmnist_msvq, then var.py:fmnist; "
    f"arvision eval --num_samples {n})",
    wall_s=args.wall_s,
    train_wall_s=args.train_wall_s,
    tokenizer=dict(
      step=tok_eval["step"],
      **{k: tok_eval["metrics"][k] for k in TOKENIZER_KEYS if k in tok_eval["metrics"]},
    ),
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
    device=str(jax.devices()[0]),
    cpu_count=os.cpu_count(),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
  )
  print(json.dumps(result, indent=2))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

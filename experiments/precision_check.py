"""bfloat16 against float32 training on the Fashion-MNIST recipes: the same seed, batches and
initial state, `--steps` steps each, in `config.model.dtype=float32` and `bfloat16`.

    python experiments/precision_check.py --steps 60 --out experiments/results/precision_fmnist_cpu.json

Recipes: the three tokenizers (`tokenizer.py:fmnist_msvq|fmnist_vq|fmnist_kl`) train themselves,
and the three generators (`var.py|raster.py|mar.py:fmnist`) train on a frozen tokenizer that is
NOT trained: the seeded initial state of their recipe's tokenizer config (as
experiments/recipe_losses.py does; the tokenizer stays float32, so the generator's dtype is the one
thing that changes). Everything else is the recipe as `arvision train` builds it
(`recipe_losses.recipe_losses`: config seed, data pipeline, sharded step).

Reported per recipe: both loss curves, the NaN/Inf count of each, the relative difference of the
final loss (mean of the last `--window` steps, so one noisy step does not decide it) and the
largest relative difference of the windowed curves over the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recipe_losses  # noqa: E402  (a sibling script)

DTYPES = ("float32", "bfloat16")


def compare(losses32: list, losses16: list, window: int) -> dict:
  """NaN counts, the windowed final-loss relative difference and the worst windowed one."""
  a, b = np.asarray(losses32, np.float64), np.asarray(losses16, np.float64)
  nonfinite = {"float32": int(np.sum(~np.isfinite(a))), "bfloat16": int(np.sum(~np.isfinite(b)))}
  k = np.ones(window) / window
  sa, sb = np.convolve(a, k, "valid"), np.convolve(b, k, "valid")
  rel = np.abs(sb - sa) / np.abs(sa)
  return dict(
    nonfinite=nonfinite,
    final_loss=dict(float32=float(sa[-1]), bfloat16=float(sb[-1])),
    final_rel_diff=float(rel[-1]),
    max_windowed_rel_diff=float(np.max(rel)),
    first_loss=dict(float32=float(a[0]), bfloat16=float(b[0])),
  )


def _baseline(paths: str) -> dict:
  """Recipes of the recipe_losses.py JSONs in `paths` (comma-separated; later files win)."""
  out = {}
  for path in filter(None, paths.split(",")):
    if not os.path.exists(path):
      print(f"  baseline {path} does not exist (yet): skipped", flush=True)
      continue
    with open(path) as f:
      recipes = json.load(f)["recipes"]
    out.update({k: dict(v, file=os.path.relpath(path)) for k, v in recipes.items()})
  return out


def _write(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)


def main(argv=None):
  argv = sys.argv if argv is None else argv
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--recipes", default=",".join(recipe_losses.RECIPES))
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--window", type=int, default=10, help="steps averaged for the final loss")
  ap.add_argument(
    "--baseline",
    default="",
    help="comma-separated recipe_losses.py JSONs of the float32 code before config.model.dtype "
    "existed: the float32 runs must reproduce their losses exactly (later files win per recipe)",
  )
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv[1:])
  recipes = args.recipes.split(",")
  unknown = [r for r in recipes if r not in recipe_losses.RECIPES]
  if unknown:
    raise SystemExit(f"--recipes: {unknown} unknown; accepted: {recipe_losses.RECIPES}")

  result = dict(
    what=(
      f"float32 vs bfloat16 (config.model.dtype) training losses, {args.steps} steps per run, "
      "same seed, batches and initial state; generators on their recipe's seeded, untrained, "
      "float32 tokenizer"
    ),
    steps=args.steps,
    window=args.window,
    provenance=recipe_losses._provenance(argv),
    recipes={},
  )
  for spec in recipes:
    runs = {}
    for dtype in DTYPES:
      print(f"{spec} {dtype}: {args.steps} steps", flush=True)
      runs[dtype] = recipe_losses.recipe_losses(spec, args.steps, {"model.dtype": dtype})
    summary = compare(runs["float32"]["losses"], runs["bfloat16"]["losses"], args.window)
    baseline = _baseline(args.baseline)  # read now: a baseline may be written while this runs
    if spec in baseline:  # float32 unchanged: the same losses as before the knob existed
      ref = baseline[spec]["losses"]
      now = runs["float32"]["losses"][: len(ref)]
      summary["float32_vs_baseline"] = dict(
        file=baseline[spec]["file"],
        steps=len(now),
        max_abs_diff=float(np.max(np.abs(np.asarray(now) - np.asarray(ref[: len(now)])))),
      )
      print(f"  float32 vs baseline: {summary['float32_vs_baseline']}", flush=True)
    result["recipes"][spec] = dict(summary, runs=runs)
    _write(args.out, result)  # after every recipe: a long run that is stopped keeps its results
    print(
      f"  final loss fp32 {summary['final_loss']['float32']:.4f} bf16 "
      f"{summary['final_loss']['bfloat16']:.4f} rel diff {summary['final_rel_diff']:.2%}; "
      f"non-finite {summary['nonfinite']}",
      flush=True,
    )
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

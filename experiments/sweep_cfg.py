"""Sampling-settings sweep of a trained generator on the offline domain metrics.

    python experiments/sweep_cfg.py --workdir runs/quickstart --grid cfg=0,1,2,3,4 --num_samples 1000
    python experiments/sweep_cfg.py --workdir runs/raster --grid cfg=2,3,4 --grid top_k=0,100 \
        --out experiments/results/sweep_cfg_raster.json

Every combination of the `--grid` values (any sampling keyword of the family) on top of the
config's sampling defaults, the same class-balanced labels and seed. Prints a table and writes the
JSON.
"""

import argparse
import ast
import itertools
import json
import os
import platform

import jax

from arvision import api
from arvision.evaluation import domain_classifiers, generator


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/quickstart")
  ap.add_argument(
    "--grid", action="append", help="key=v1,v2,... (repeatable); default cfg=0,1,2,3,4"
  )
  ap.add_argument("--num_samples", type=int, default=1000)
  ap.add_argument("--out", default="experiments/results/sweep_cfg_quickstart.json")
  args = ap.parse_args()
  model = api.load(args.workdir)
  dm = domain_classifiers.domain_metrics_for(model.config)
  labels = generator.balanced_labels(args.num_samples, model.config.data.num_classes)
  axes = []
  for item in args.grid or ["cfg=0,1,2,3,4"]:
    key, _, values = item.partition("=")
    axes.append([(key, ast.literal_eval(v)) for v in values.split(",")])
  rows = []
  for combo in itertools.product(*axes):
    kw = dict(model.family.sample_defaults(), **dict(combo))
    images = generator.generate(
      model.family, model.params, labels, model.config.eval.batch_size, seed=0, **kw
    )
    m = dm.evaluate(images, labels)
    rows.append(
      dict(
        sampling=kw,
        **{
          k: float(m[k])
          for k in ("fd_fmnist", "class_accuracy", "precision_fmnist", "recall_fmnist")
        },
      )
    )
    print(
      f"{dict(combo)}  fd_fmnist {m['fd_fmnist']:7.2f}  class_accuracy "
      f"{m['class_accuracy']:.3f}  precision {m['precision_fmnist']:.3f}  "
      f"recall {m['recall_fmnist']:.3f}",
      flush=True,
    )
  workdir = os.path.basename(os.path.normpath(args.workdir))
  grids = " ".join(f"--grid {g}" for g in args.grid or [])
  result = dict(
    command=(  # the workdir by its name only (no machine path in a committed JSON)
      f"python experiments/sweep_cfg.py --workdir runs/{workdir} {grids} "
      f"--num_samples {args.num_samples} --out {args.out}"
    ),
    workdir=workdir,
    step=model.step,
    num_samples=args.num_samples,
    rows=rows,
    device=str(jax.devices()[0]),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
  )
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

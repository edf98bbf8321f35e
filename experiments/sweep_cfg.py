"""Sampling-settings sweep of a trained generator on the offline domain metrics.

    python experiments/sweep_cfg.py --workdir runs/quickstart --cfg 0,1,2,3,4 --num_samples 1000

Prints a table and writes experiments/results/sweep_cfg_<name>.json.
"""

import argparse
import json
import os
import platform

import jax

from arvision import api, evaluator


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/quickstart")
  ap.add_argument("--cfg", default="0,1,2,3,4")
  ap.add_argument("--num_samples", type=int, default=1000)
  ap.add_argument("--out", default="experiments/results/sweep_cfg_quickstart.json")
  args = ap.parse_args()
  model = api.load(args.workdir)
  dm = evaluator.domain_metrics_for(model.config)
  labels = evaluator.balanced_labels(args.num_samples, model.config.data.num_classes)
  rows = []
  for cfg in (float(c) for c in args.cfg.split(",")):
    kw = dict(model.family.sample_defaults(), cfg=cfg)
    images = evaluator.generate(
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
      f"cfg {cfg:4.1f}  fd_fmnist {m['fd_fmnist']:7.2f}  class_accuracy "
      f"{m['class_accuracy']:.3f}  precision {m['precision_fmnist']:.3f}  "
      f"recall {m['recall_fmnist']:.3f}",
      flush=True,
    )
  result = dict(
    workdir=os.path.basename(os.path.normpath(args.workdir)),
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

"""How close can a generator on this tokenizer get? Domain metrics of its reconstructions.

    python experiments/tokenizer_floor.py --workdir runs/raster/tokenizer --num_images 2000 \
        --out experiments/results/tokenizer_floor_fmnist_vq.json

Reconstructs the first N training images (center crop, as evaluation reads them) and scores them
with the offline domain metrics against the test split, next to the real images themselves (the
train-vs-test floor at the same N). A generator that sampled perfect codes would score about the
reconstructions' numbers.
"""

import argparse
import json
import os
import platform

import jax
import numpy as np

from arvision import api, data, visualize
from arvision.data import transforms
from arvision.evaluation import domain_classifiers

KEYS = ("fd_fmnist", "class_accuracy", "precision_fmnist", "recall_fmnist")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True, help="a tokenizer run or export")
  ap.add_argument("--num_images", type=int, default=2000)
  ap.add_argument("--batch", type=int, default=250)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  model = api.load(args.workdir)
  config = model.config
  dm = domain_classifiers.domain_metrics_for(config)
  if dm is None:
    raise SystemExit(f"{args.workdir}: domain metrics exist only for Fashion-MNIST 32px data")
  images, labels = data.load_images(config.data, "train", args.num_images)
  x = transforms.normalize(images)
  rec = jax.jit(model.family.reconstruct)
  recon = np.concatenate(
    [
      visualize.to_uint8(np.clip(np.asarray(rec(model.params, x[i : i + args.batch])[0]), -1, 1))
      for i in range(0, len(x), args.batch)
    ]
  )
  rows = {}
  for name, imgs in (("reconstructions", recon), ("real", images)):
    m = dm.evaluate(imgs, labels)
    rows[name] = {k: float(m[k]) for k in KEYS}
    print(name, {k: round(v, 3) for k, v in rows[name].items()})
  result = dict(
    tokenizer=os.path.basename(os.path.normpath(os.path.dirname(args.workdir)))
    + "/"
    + os.path.basename(os.path.normpath(args.workdir)),
    tokenizer_type=str(config.model.type),
    step=model.step,
    num_images=len(images),
    rows=rows,
    device=str(jax.devices()[0]),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
  )
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

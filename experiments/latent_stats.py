"""Statistics of a KL tokenizer's latents, to choose `model.scale_factor` (MAR's 0.2325 for kl16).

    python experiments/latent_stats.py --workdir runs/mar/tokenizer \
        --out experiments/results/latent_stats_fmnist_kl.json

Encodes the first N training images (posterior samples, as MAR trains on) with the scale factor
removed and reports their std; `scale_factor = 1 / std` gives unit-variance tokens.
"""

import argparse
import json
import os
import platform

import jax
import numpy as np

from arvision import api, data
from arvision.data import transforms


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True, help="a KL tokenizer run or export")
  ap.add_argument("--num_images", type=int, default=2000)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  model = api.load(args.workdir)
  fam = model.family
  images, _ = data.load_images(model.config.data, "train", args.num_images)
  z = np.asarray(
    jax.jit(fam.encode_latent)(model.params, transforms.normalize(images), jax.random.key(0))
  )
  z = z / fam.scale_factor
  result = dict(
    tokenizer=os.path.basename(os.path.normpath(args.workdir)),
    step=model.step,
    num_images=len(images),
    std=float(z.std()),
    mean=float(z.mean()),
    per_channel_std=[float(s) for s in z.reshape(-1, z.shape[-1]).std(0)],
    suggested_scale_factor=float(1.0 / z.std()),
    device=str(jax.devices()[0]),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
  )
  print(json.dumps(result, indent=2))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

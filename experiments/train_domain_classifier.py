"""Trains the Fashion-MNIST domain classifier with the one loop and ships its params with the package.

    python experiments/train_domain_classifier.py [--workdir runs/classifier]

Writes `arvision/evaluation/data/classifier_fmnist.npz` (params + the sha of the config that trained
them; `arvision.evaluation.domain_classifiers.load` uses it only while `configs/classifier.py:fmnist`
is unchanged; evaluation never trains it) and `experiments/results/domain_classifier.json`
(test accuracy and the real-data floor of the domain metrics: train split vs test split).
"""

import argparse
import json
import platform

import jax
import numpy as np

from arvision import checkpoint as ckpt_lib
from arvision import config_util, data, families
from arvision.convert.common import flatten
from arvision.evaluation import classifier as classifier_eval
from arvision.evaluation import domain_classifiers
from arvision.train import train


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/classifier")
  ap.add_argument(
    "--floor_samples",
    default="1000,2000,10000",
    help="sizes of the train subsets scored against the test split (FD is biased at small N)",
  )
  args = ap.parse_args()
  shipped = domain_classifiers.SHIPPED["fmnist"]
  config = config_util.load_config_file(shipped.config)
  metrics = train(config, args.workdir) or {}
  loaded = ckpt_lib.load_params(args.workdir)
  params = loaded.get("ema", loaded["params"])
  np.savez_compressed(
    shipped.weights,
    __config_sha__=domain_classifiers.config_sha(config),
    **{k: np.asarray(v) for k, v in flatten(params).items()},
  )
  family = families.build(config)
  accuracy = classifier_eval.accuracy(family, params, config)

  # The floor: real train images scored against the real test split, as generated samples are.
  from arvision.evaluation.domain import DomainMetrics

  test_x, test_y = data.load_images(config.data, "test")
  train_x, train_y = data.load_images(config.data, "train")
  dm = DomainMetrics(family, params, test_x, test_y)
  floors = {}
  for n in (int(x) for x in args.floor_samples.split(",")):
    pick = np.random.default_rng(0).permutation(len(train_y))[:n]
    floors[str(n)] = {k: float(v) for k, v in dm.floor(train_x[pick], train_y[pick]).items()}
  result = dict(
    config="configs/classifier.py:fmnist",
    test_accuracy=accuracy,
    steps=config.total_steps,
    final_eval=metrics,
    floor_train_vs_test=floors,
    device=str(jax.devices()[0]),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
  )
  print(json.dumps(result, indent=2))
  with open("experiments/results/domain_classifier.json", "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

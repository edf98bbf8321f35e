"""The classifier evaluator: accuracy on the whole eval split (no images, no Inception metrics)."""

from __future__ import annotations

import jax
import numpy as np

from arvision import data


def accuracy(family, params, config) -> float:
  """Fraction of the eval split of `config.data` that `family` labels correctly."""
  feats = jax.jit(family.features)
  correct = total = 0
  for batch in data.make_eval_iter(config.data, batch_size=config.data.eval_batch_size):
    _, logits = feats(params, batch["image"])
    mask = np.asarray(batch["mask"])
    correct += int(np.sum((np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"])) & mask))
    total += int(mask.sum())
  return correct / max(total, 1)


class Evaluator:
  """Scores a `kind="classifier"` family by its eval-split accuracy."""

  def __init__(self, family, config, **unused):
    del unused  # sampling and Inception settings do not apply to classifiers
    self.family, self.config = family, config

  def run(self, params, out_dir: str) -> tuple[dict, dict]:
    del out_dir  # writes no files
    return dict(accuracy=accuracy(self.family, params, self.config)), {}

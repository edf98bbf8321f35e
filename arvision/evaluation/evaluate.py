"""`arvision eval` and the loop's periodic evals: pick the evaluator, run it, write `metrics.json`.

Every evaluation computes the held-out loss; then the evaluator that `config.eval.evaluator` names
(default: the one of the family's kind, `EVALUATORS[family.kind]`) adds its metrics and files:
- `generator` (`arvision.evaluation.generator`): `samples.npz`, `samples.png`, domain and Inception
  metrics of the samples;
- `tokenizer` (`arvision.evaluation.tokenizer`): reconstruction PSNR / SSIM / codebook usage,
  `reconstructions.png`, `rfid`;
- `classifier` (`arvision.evaluation.classifier`): eval-split accuracy.

An evaluator module defines `Evaluator(family, config, *, num_samples, sample_kw, inception_weights,
reference)` whose `run(params, out_dir)` returns `(metrics, record)`; `record` (the settings that
decide the numbers) goes into `metrics.json` next to the metrics.
"""

from __future__ import annotations

import importlib
import json
import os

import jax
import numpy as np
from absl import logging

from arvision import data

EVALUATORS = {
  "generator": "arvision.evaluation.generator",
  "tokenizer": "arvision.evaluation.tokenizer",
  "classifier": "arvision.evaluation.classifier",
}


def evaluator_module(family, config):
  """The module of the evaluator that `config.eval.evaluator` names, or the family kind's."""
  name = str(config.eval.get("evaluator", "")) or family.kind  # runs saved before the field
  path = EVALUATORS.get(name, name)
  try:
    module = importlib.import_module(path)
  except ModuleNotFoundError as e:
    if name in EVALUATORS or e.name != path:
      raise
    raise ValueError(
      f"config.eval.evaluator={name!r} is unknown; accepted: '' (by family kind), "
      f"{sorted(EVALUATORS)} or an importable module path with an `Evaluator`"
    ) from None
  if not hasattr(module, "Evaluator"):
    raise ValueError(f"config.eval.evaluator={name!r}: module {path} defines no `Evaluator`")
  return module


def heldout_loss(family, params, config) -> dict:
  """Mean of the family's loss metrics over `eval.num_batches` full eval batches."""
  loss_fn = jax.jit(lambda p, b, r: family.loss(p, b, r, False))
  rows = []
  it = data.make_eval_iter(config.data, batch_size=config.data.eval_batch_size)
  for i, batch in enumerate(it):
    if i >= config.eval.num_batches or not np.all(batch["mask"]):
      break
    batch = {k: v for k, v in batch.items() if k != "mask"}
    loss, m = loss_fn(params, batch, jax.random.key(i))
    rows.append(jax.device_get(dict(m, loss=loss)))
  if not rows:
    return {}
  return {f"heldout_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]}


def run(
  family,
  params,
  config,
  workdir: str,
  *,
  step: int,
  writer=None,
  out_dir: str | None = None,
  num_samples: int | None = None,
  sample_kw: dict | None = None,
  inception_weights: str | None = None,
  reference: str | None = None,
) -> dict:
  """Evaluates `params`; writes `metrics.json` to `out_dir` (default WORKDIR/eval/step_N).

  Args:
    num_samples: generated samples (generators) / reconstructed images (tokenizers); None takes
      `config.eval.num_samples`.
    sample_kw: sampling settings over the family's defaults (generators).
    inception_weights: FID Inception weights file; None takes `config.eval.inception_weights`
      ("" = no Inception metrics).
    reference: ADM reference batch `.npz`; None takes `config.eval.reference` ("" = statistics of
      the eval split of `config.data`, cached).
  """
  out_dir = out_dir or os.path.join(workdir, "eval", f"step_{step:08d}")
  os.makedirs(out_dir, exist_ok=True)
  num_samples = num_samples or config.eval.num_samples
  evaluator = evaluator_module(family, config).Evaluator(
    family,
    config,
    num_samples=num_samples,
    sample_kw=sample_kw,
    inception_weights=inception_weights,
    reference=reference,
  )
  metrics = heldout_loss(family, params, config)
  found, settings = evaluator.run(params, out_dir)
  metrics.update(found)
  metrics = {k: float(v) for k, v in metrics.items()}
  record = dict(step=step, metrics=metrics, num_samples=num_samples, sampling={})
  record.update(settings)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
  if writer is not None:
    writer.write(step, metrics, prefix="eval/")
  logging.info("eval at step %d: %s", step, metrics)
  return metrics

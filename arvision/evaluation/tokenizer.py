"""The tokenizer evaluator: reconstructions of the eval split.

PSNR / SSIM / codebook usage over `num_samples` eval images, a grid of originals (odd rows) over
reconstructions (even rows) in `reconstructions.png`, and with FID Inception weights `rfid`
(reconstructions against their originals).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from arvision import data, visualize
from arvision.evaluation import fid
from arvision.evaluation import metrics as em
from arvision.tokenizers import metrics as tm


class Evaluator(fid.ImageEvaluator):
  """Reconstructs `num_samples` eval images and scores the reconstructions (`sample_kw` is
  accepted and unused: tokenizers do not sample)."""

  def run(self, params, out_dir: str) -> tuple[dict, dict]:
    """`(metrics, record)`: `record` holds the Inception settings of `rfid`, if any."""
    family, config, num_samples, inc = self.family, self.config, self.num_samples, self.inc
    recon_fn = jax.jit(family.reconstruct)
    psnr, ssim, codes = [], [], []
    grid_rows = []
    originals, recons = [], []  # uint8, kept only for rFID
    for batch in data.make_eval_iter(
      config.data, batch_size=config.eval.batch_size, num_examples=num_samples
    ):
      mask = np.asarray(batch["mask"])
      x = batch["image"]
      recon, c = recon_fn(params, x)
      recon = np.asarray(jnp.clip(recon, -1, 1))
      x = np.asarray(x)
      psnr.append(np.asarray(tm.psnr(x, recon))[mask])
      ssim.append(np.asarray(tm.ssim(x, recon))[mask])
      if c is not None:
        codes.append(np.asarray(c)[mask])
      if inc is not None:
        originals.append(visualize.to_uint8(x[mask]))
        recons.append(visualize.to_uint8(recon[mask]))
      if not grid_rows:
        k = min(8, int(mask.sum()))
        grid_rows = [visualize.to_uint8(x[:k]), visualize.to_uint8(recon[:k])]
    metrics = dict(
      psnr=float(np.mean(np.concatenate(psnr))), ssim=float(np.mean(np.concatenate(ssim)))
    )
    if codes and getattr(family, "type", None) == "bsq":  # bits [N, L, d]: no codebook to count
      from arvision.tokenizers.bsq import bit_stats

      metrics.update({k: float(v) for k, v in bit_stats([np.concatenate(codes)]).items()})
    elif codes:
      metrics.update(tm.codebook_usage(np.concatenate(codes), family.vocab_size))
    record = {}
    if inc is not None:
      originals, recons = np.concatenate(originals), np.concatenate(recons)
      if len(originals) < 2:
        raise ValueError(
          f"rFID needs >= 2 eval images; num_samples={num_samples} gave {len(originals)}"
        )
      bs = config.eval.batch_size
      f_real = inc.features(originals, bs)["pool"]
      f_recon = inc.features(recons, bs)["pool"]
      metrics["rfid"] = em.frechet_distance_to_stats(f_recon, *em.feature_stats(f_real))
      record["inception"] = dict(
        inc.base_record(recons),
        reference=(
          f"the {len(originals)} originals of config.data split {config.data.eval_split!r}"
        ),
      )
    if jax.process_index() == 0 and grid_rows:
      visualize.save_grid(
        os.path.join(out_dir, "reconstructions.png"),
        np.concatenate(grid_rows),
        nrow=len(grid_rows[0]),
        scale=2,
      )
    return metrics, record

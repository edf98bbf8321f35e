"""Inception metrics against a reference: FID / sFID / IS / precision-recall (rFID for tokenizers).

`InceptionSetup` holds the FID Inception weights (loaded once) and the reference they are compared
against: an ADM reference batch `.npz` (`mu`/`sigma`[/`mu_s`/`sigma_s`/`arr_0`]) or, without one,
statistics of the eval split of `config.data`, computed once and cached under
`$ARVISION_CACHE/stats`. `record` gives the settings that decide the numbers, for `metrics.json`.
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import logging

from arvision import data
from arvision.evaluation import inception, npz
from arvision.evaluation import metrics as em

REFERENCE_MAX_IMAGES = 50_000  # eval-split reference statistics use at most this many images
IS_SPLIT_SIZE = 5_000  # ADM: one Inception Score split per 5,000 samples
PR_K = 3  # ADM: k-th nearest neighbour radius for the precision/recall manifolds


def stats_dir() -> str:
  return os.path.join(npz.cache_dir(), "stats")


class InceptionSetup:
  """The FID Inception weights (loaded once) and the reference they are compared against."""

  def __init__(self, weights_path: str, reference_path: str = ""):
    self.weights_path = os.fspath(weights_path)
    self.reference_path = os.fspath(reference_path)
    if self.reference_path:
      # Read (and key-check) the reference before any sampling, so a bad file fails fast.
      self._reference = npz.load_reference_stats(self.reference_path, required=("mu", "sigma"))
      self._check_dims(self._reference, self.reference_path)
      with np.load(self.reference_path) as f:
        self._reference_has_images = "arr_0" in f.files
    self.variables = inception.load_weights(self.weights_path)
    self.fingerprint = npz.fingerprint(self.variables)
    self._reference_info = {}

  @classmethod
  def from_config(
    cls, config, inception_weights: str | None = None, reference: str | None = None
  ) -> "InceptionSetup | None":
    """None when no weights are configured (no Inception metrics); explicit args override config."""
    weights = inception_weights
    if weights is None:
      weights = config.eval.get("inception_weights", "")
    reference = config.eval.get("reference", "") if reference is None else reference
    if not weights:
      if reference:
        raise ValueError(
          f"reference={reference!r} is set but no Inception weights are: FID/sFID/IS need "
          "--inception_weights (config.eval.inception_weights).\n" + inception.WEIGHTS_HELP
        )
      return None
    return cls(weights, reference)

  @staticmethod
  def _check_dims(stats: dict, source: str) -> None:
    want = dict(mu=inception.POOL_DIM, mu_s=inception.SPATIAL_DIM)
    for key, dim in want.items():
      if key in stats and stats[key].shape != (dim,):
        raise ValueError(
          f"{source}: reference {key!r} has shape {stats[key].shape}; the FID Inception gives "
          f"({dim},) (pool3 for 'mu', mixed_6/conv[..., :7] for 'mu_s')"
        )

  def features(self, images_uint8, batch_size: int) -> dict:
    return inception.inception_features(images_uint8, self.variables, batch_size=int(batch_size))

  def _extractor(self) -> str:
    return f"fid-inception-2015-12-05@{self.fingerprint}"

  def reference_stats(self, config) -> dict:
    """`mu`, `sigma` [, `mu_s`, `sigma_s`] [, `pool`: real pool3 features for precision/recall]."""
    bs = config.eval.batch_size

    def stats_of(images):
      f = self.features(images, bs)
      mu, sigma = em.feature_stats(f["pool"])
      mu_s, sigma_s = em.feature_stats(f["spatial"])
      return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=f["pool"])

    if self.reference_path:
      ref = dict(self._reference)
      self._reference_info = dict(reference=os.path.abspath(self.reference_path))
      if self._reference_has_images:
        # ADM computes the arr_0 features on every run; they depend only on the file and weights.
        st = os.stat(self.reference_path)
        path = npz.stats_cache_path(
          stats_dir(),
          "ref-" + os.path.basename(self.reference_path),
          f"arr_0-{st.st_size}-{st.st_mtime_ns}",
          self._extractor(),
          0,
        )

        def real_features():
          arr_0 = npz.load_reference_stats(self.reference_path, (), load_images=True)["arr_0"]
          return dict(pool=self.features(arr_0, bs)["pool"])

        real = npz.cached_stats(path, real_features)
        ref["pool"] = real["pool"]
        self._reference_info.update(
          reference_features_cache=path, reference_images=int(len(real["pool"]))
        )
      return ref
    dc = data.image_data_config(config.data)
    split = dc.eval_split
    n = min(data.num_examples(dc, split), REFERENCE_MAX_IMAGES)
    dataset = f"{dc.source}-{dc.image_size}px-{dc.channels}ch-r{dc.resize_ratio}"
    path = npz.stats_cache_path(stats_dir(), dataset, split, self._extractor(), n)
    ref = npz.cached_stats(path, lambda: stats_of(data.load_images(dc, split, n)[0]))
    self._check_dims(ref, path)
    self._reference_info = dict(
      reference=f"computed: {n} images of config.data {dataset} split {split!r}",
      reference_cache=path,
      reference_images=n,
    )
    return ref

  def base_record(self, images) -> dict:
    h, w, c = np.shape(images)[1:]
    return dict(
      weights=os.path.basename(self.weights_path),
      weights_fingerprint=self.fingerprint,
      num_images=int(len(images)),
      resize=f"uint8 {h}x{w}x{c} -> TF1 bilinear (align_corners=False) 299x299x3"
      + (" (gray repeated to RGB)" if c == 1 else ""),
      features="pool3 [2048] (FID, P/R), mixed_6/conv[..., :7] [2023] (sFID), logits [1008] (IS)",
    )

  def record(self, images, ref) -> dict:
    """The settings that decide the Inception numbers, for metrics.json."""
    n = len(images)
    out = dict(
      self.base_record(images),
      **self._reference_info,
      is_splits=max(1, math.ceil(n / IS_SPLIT_SIZE)),
    )
    if "pool" in ref:
      out["precision_recall"] = dict(k=PR_K, real_images=int(len(ref["pool"])), dtype="float32")
    return out


def inception_metrics(images_uint8, inc: InceptionSetup, ref: dict, batch_size: int) -> dict:
  """FID, sFID (if `ref` has `mu_s`), IS, precision/recall (if `ref` has real `pool` features)."""
  n = len(images_uint8)
  if n < 2:
    raise ValueError(f"Inception metrics need >= 2 samples; num_samples={n}")
  f = inc.features(images_uint8, batch_size)
  is_mean, is_std = em.inception_score(f["logits"], splits=max(1, math.ceil(n / IS_SPLIT_SIZE)))
  out = {"is": is_mean, "is_std": is_std}
  out["fid"] = em.frechet_distance_to_stats(f["pool"], ref["mu"], ref["sigma"])
  if "mu_s" in ref:
    out["sfid"] = em.frechet_distance_to_stats(f["spatial"], ref["mu_s"], ref["sigma_s"])
  if "pool" in ref:
    if min(n, len(ref["pool"])) <= PR_K:
      logging.warning(
        "precision/recall skipped: k=%d needs > %d samples and real images (have %d and %d)",
        PR_K,
        PR_K,
        n,
        len(ref["pool"]),
      )
    else:
      out["precision"], out["recall"] = em.precision_recall(ref["pool"], f["pool"], k=PR_K)
  return out


class ImageEvaluator:
  """The constructor the image evaluators share (`generator`, `tokenizer`): the settings, and the
  Inception setup loaded (its reference checked) before anything runs, so a bad file fails fast."""

  def __init__(
    self,
    family,
    config,
    *,
    num_samples: int,
    sample_kw: dict | None = None,
    inception_weights: str | None = None,
    reference: str | None = None,
  ):
    self.family, self.config, self.num_samples = family, config, num_samples
    self.sample_kw = sample_kw or {}
    self.inc = InceptionSetup.from_config(config, inception_weights, reference)

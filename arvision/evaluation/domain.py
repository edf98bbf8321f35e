"""Offline domain metrics in a trained classifier's feature space (no Inception weights needed).

Names carry the extractor (`fd_fmnist`, not `fid`) so that nobody mistakes them for Inception FID:
- `fd_<name>`: Frechet distance of the classifier's penultimate features,
- `precision_<name>` / `recall_<name>`: k-NN manifold precision/recall (k=3) in that space,
- `kid_<name>` (+ `kid_<name>_std`): polynomial-kernel MMD^2 in that space,
- `is_<name>`: Inception-Score-like exp(E KL) of the classifier's softmax,
- `class_accuracy`: fraction of class-conditional samples the classifier labels as their class.

The classifier comes in as a family and its params; which trained classifier scores which data is
`arvision.evaluation.domain_classifiers`' business (evaluation never trains one).
"""

from __future__ import annotations

import numpy as np

from arvision.evaluation import metrics


def uint8_to_model(images_uint8) -> np.ndarray:
  """uint8 NHWC [0, 255] -> float32 NHWC [-1, 1], the range every model takes."""
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
      f"images have dtype {images.dtype} and shape {images.shape}; accepted: uint8 [N, H, W, C]"
    )
  return images.astype(np.float32) / 127.5 - 1.0


class DomainMetrics:
  """Holds the real-set features once; `evaluate` scores generated images against them.

  Args:
    classifier_family: a `kind="classifier"` family with `features(params, images)`.
    classifier_params: its trained params.
    real_images_uint8: `[N, H, W, C]` uint8 real images (e.g. the test split).
    real_labels: `[N]` int labels of the real images, or None.
    name: metric-name suffix naming the extractor's domain.
    k: neighbourhood size of precision/recall.
    kid_subsets, kid_subset_size: KID subsets (subset size clipped to the set sizes).
    batch_size: images per classifier call (the last batch is padded, so one compilation).
    seed: KID subset sampling seed.
  """

  def __init__(
    self,
    classifier_family,
    classifier_params,
    real_images_uint8,
    real_labels=None,
    *,
    name: str = "fmnist",
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    batch_size: int = 500,
    seed: int = 0,
  ):
    if getattr(classifier_family, "kind", None) != "classifier":
      raise ValueError(
        f"classifier_family has kind {getattr(classifier_family, 'kind', None)!r}; accepted: a "
        "'classifier' family (configs/classifier.py)"
      )
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}; accepted: an int >= 1")
    self.family, self.params = classifier_family, classifier_params
    self.name, self.k, self.seed = name, k, seed
    self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
    self.batch_size = batch_size
    self.real_feats, self.real_logits = self.features(real_images_uint8)
    self.real_labels = self._check_labels(real_labels, len(self.real_feats), "real_labels")
    self.real_mu, self.real_sigma = metrics.feature_stats(self.real_feats)
    self._real_radii = metrics.knn_radii(self.real_feats, k)

  @staticmethod
  def _check_labels(labels, n, what):
    if labels is None:
      return None
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
        f"{what} have dtype {labels.dtype} and shape {labels.shape}; accepted: int [N] with N={n}"
      )
    return labels

  def features(self, images_uint8) -> tuple[np.ndarray, np.ndarray]:
    """Classifier `(features [N, D], logits [N, K])` of uint8 NHWC images, as float32 numpy."""
    x = uint8_to_model(images_uint8)
    n, b = x.shape[0], self.batch_size
    if n == 0:
      raise ValueError("images are empty; accepted: at least one image")
    feats, logits = [], []
    for i in range(0, n, b):
      chunk = x[i : i + b]
      pad = b - chunk.shape[0] if n > b else 0
      if pad:  # pad to a fixed shape so the jitted classifier compiles once
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      f, lg = self.family.features(self.params, chunk)
      feats.append(np.asarray(f)[: b - pad])
      logits.append(np.asarray(lg)[: b - pad])
    return np.concatenate(feats).astype(np.float32), np.concatenate(logits).astype(np.float32)

  def evaluate(self, images_uint8, labels=None) -> dict:
    """Metrics of `images_uint8` against the real set; `class_accuracy` only when `labels` given."""
    feats, logits = self.features(images_uint8)
    labels = self._check_labels(labels, len(feats), "labels")
    return self._scores(feats, logits, labels)

  def floor(self, other_real_images_uint8, labels=None) -> dict:
    """The same metrics for another real set (e.g. train vs test): what a perfect model scores."""
    return self.evaluate(other_real_images_uint8, labels)

  def _scores(self, feats, logits, labels) -> dict:
    n = self.name
    mu, sigma = metrics.feature_stats(feats)
    out = {f"fd_{n}": metrics.frechet_distance(mu, sigma, self.real_mu, self.real_sigma)}
    precision, recall = metrics.precision_recall(
      self.real_feats, feats, k=self.k, real_radii=self._real_radii
    )
    out[f"precision_{n}"], out[f"recall_{n}"] = precision, recall
    kid_mean, kid_std = metrics.kid(
      self.real_feats, feats, self.kid_subsets, self.kid_subset_size, seed=self.seed
    )
    out[f"kid_{n}"], out[f"kid_{n}_std"] = kid_mean, kid_std
    out[f"is_{n}"] = metrics.inception_score(logits, splits=1)[0]
    if labels is not None:
      out["class_accuracy"] = float((np.argmax(logits, -1) == labels).mean())
    out["num_samples"] = int(len(feats))
    return out

"""Evaluation: metrics from features (FD/FID, sFID, IS, precision/recall, KID), ADM `.npz` I/O and
statistics caching, and the offline domain metrics built on a small trained classifier.

The evaluators by kind (`generator`, `tokenizer`, `classifier`), Inception metrics (`fid`) and the
shipped domain classifiers (`domain_classifiers`) are submodules, imported where used:
`from arvision.evaluation import evaluate; evaluate.run(...)` is what `arvision eval` runs."""

from arvision.evaluation.domain import DomainMetrics, uint8_to_model
from arvision.evaluation.metrics import (
  feature_stats,
  frechet_distance,
  frechet_distance_from_features,
  frechet_distance_to_stats,
  inception_score,
  kid,
  knn_radii,
  precision_recall,
  spatial_stats,
)
from arvision.evaluation.npz import (
  cached_stats,
  fingerprint,
  load_reference_stats,
  load_samples,
  save_reference_stats,
  save_samples,
  stats_cache_path,
  stats_key,
)

__all__ = [
  "DomainMetrics",
  "cached_stats",
  "feature_stats",
  "fingerprint",
  "frechet_distance",
  "frechet_distance_from_features",
  "frechet_distance_to_stats",
  "inception_score",
  "kid",
  "knn_radii",
  "load_reference_stats",
  "load_samples",
  "precision_recall",
  "save_reference_stats",
  "save_samples",
  "spatial_stats",
  "stats_cache_path",
  "stats_key",
  "uint8_to_model",
]

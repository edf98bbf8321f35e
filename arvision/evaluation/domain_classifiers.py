"""The shipped domain classifiers behind the offline domain metrics, and which data each scores.

`config.data.domain_metrics` declares the domain metrics of a data config:
- `"auto"` (the default): the shipped classifier trained on this data's source at this image size
  and channel count, if there is one (Fashion-MNIST 32x32x1 -> `"fmnist"`), else none;
- a name in `SHIPPED` (e.g. `"fmnist"`): that classifier; the data must be what it was trained on;
- `""`: no domain metrics.

A classifier's weights are the `.npz` shipped with the package while its config is unchanged, else
a run of its config in `$ARVISION_CACHE/<name>_<config sha>`. Evaluation never trains one: when
neither fits, `load` raises and names the `arvision train` command that writes the run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np

from arvision import config_util, data
from arvision.evaluation import npz
from arvision.evaluation.domain import DomainMetrics

_DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


@dataclasses.dataclass(frozen=True)
class ShippedClassifier:
  """A domain classifier: its config (`configs/<file>:<variant>`) and its packaged weights."""

  config: str
  weights: str


SHIPPED = {
  "fmnist": ShippedClassifier(
    config="classifier.py:fmnist", weights=os.path.join(_DATA_DIR, "classifier_fmnist.npz")
  ),
}
AUTO = "auto"

# `data` fields added after the packaged weights were trained that cannot change them (which
# metrics to compute; how a `folder:` source treats undecodable files). Leaving them out of the
# sha keeps the packaged weights valid; a field that does change training belongs in the sha (and
# then the weights must be retrained: tests/test_evaluator.py checks that the packaged ones load).
_DATA_KEYS_NOT_IN_SHA = ("domain_metrics", "on_bad_image")


class DomainClassifierMissingError(FileNotFoundError):
  """No trained weights fit a shipped domain classifier's config; the message says how to train."""


# Fields added to every config after the packaged weights were trained, at the values that train
# exactly as before (float32 compute, no gradient accumulation): left out of the sha at these values.
_ADDED_LATER_AT = {("model", "dtype"): "float32", ("optim", "accum_steps"): 1}


def config_sha(config) -> str:
  """Identifies what determines trained weights (not logging, eval or checkpoint settings)."""
  d = json.loads(config_util.to_json(config))
  keep = {k: d.get(k) for k in ("family", "seed", "total_steps", "model", "data", "optim")}
  if isinstance(keep["data"], dict):
    keep["data"] = {k: v for k, v in keep["data"].items() if k not in _DATA_KEYS_NOT_IN_SHA}
  for (section, field), value in _ADDED_LATER_AT.items():
    if isinstance(keep.get(section), dict) and keep[section].get(field, value) == value:
      keep[section] = {k: v for k, v in keep[section].items() if k != field}
  return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _shipped(name: str) -> ShippedClassifier:
  if name not in SHIPPED:
    raise ValueError(
      f"config.data.domain_metrics={name!r} is unknown; accepted: {AUTO!r}, '' (none) or one of "
      f"{sorted(SHIPPED)}"
    )
  return SHIPPED[name]


@functools.lru_cache(maxsize=None)
def classifier_config(name: str):
  """The (locked) config the classifier `name` is trained with."""
  return config_util.load_config_file(_shipped(name).config)


def run_dir(name: str) -> str:
  """The workdir `arvision train` writes the classifier `name` to when the shipped weights are stale."""
  return os.path.join(npz.cache_dir(), f"classifier_{name}_{config_sha(classifier_config(name))}")


def load(name: str):
  """`(family, params, config)` of the shipped classifier `name`.

  Raises:
    DomainClassifierMissingError: neither the packaged weights nor a finished run in `run_dir(name)`
      fit its config; the message names the command that trains it.
  """
  from arvision import checkpoint as ckpt_lib
  from arvision import families
  from arvision.convert.common import unflatten

  spec = _shipped(name)
  config = classifier_config(name)
  family = families.build(config)
  sha = config_sha(config)
  if os.path.exists(spec.weights):
    with np.load(spec.weights) as f:
      if str(f["__config_sha__"]) == sha:
        return family, unflatten({k: f[k] for k in f.files if k != "__config_sha__"}), config
  workdir = run_dir(name)
  # (Checkpointer creates its directory: look first, so a failed lookup leaves nothing behind.)
  if os.path.isdir(workdir) and ckpt_lib.Checkpointer(workdir).latest_step() == config.total_steps:
    loaded = ckpt_lib.load_params(workdir)
    return family, loaded.get("ema", loaded["params"]), config
  raise DomainClassifierMissingError(
    f"the domain classifier {name!r} (configs/{spec.config}, config sha {sha}) has no trained "
    f"weights: {spec.weights} was made with another config and {workdir} holds no finished run. "
    f"Evaluation does not train; train it with\n"
    f"  arvision train --config configs/{spec.config} --workdir {workdir}\n"
    f"(or refresh the packaged weights with `python experiments/train_domain_classifier.py`), "
    f"or set --config.data.domain_metrics='' to evaluate without domain metrics."
  )


def _fits(data_config, classifier_data) -> bool:
  keys = ("source", "image_size", "channels")
  return all(str(data_config[k]) == str(classifier_data[k]) for k in keys)


def resolve(data_config) -> str | None:
  """The name of the shipped classifier that `data_config.domain_metrics` declares, or None."""
  declared = str(data_config.get("domain_metrics", AUTO))  # runs saved before the field: "auto"
  if not declared:
    return None
  if declared == AUTO:
    fits = [n for n in SHIPPED if _fits(data_config, classifier_config(n).data)]
    return fits[0] if fits else None
  cdata = classifier_config(declared).data
  if not _fits(data_config, cdata):
    raise ValueError(
      f"config.data.domain_metrics={declared!r} scores source {cdata.source!r} images of "
      f"{cdata.image_size}x{cdata.image_size}x{cdata.channels}; this data is "
      f"{data_config.source!r} at {data_config.image_size}x{data_config.image_size}x"
      f"{data_config.channels}. Accepted: {AUTO!r} or '' (none) for this data"
    )
  return declared


@functools.lru_cache(maxsize=2)
def _domain_metrics_cached(name: str, data_json: str) -> DomainMetrics:
  data_config = config_util.from_json(data_json)
  family, params, _ = load(name)
  real, real_labels = data.load_images(data_config, data_config.eval_split)
  return DomainMetrics(family, params, real, real_labels, name=name)


def domain_metrics_for(config) -> DomainMetrics | None:
  """DomainMetrics against the eval split of `config.data`, or None when it declares none."""
  data_config = data.image_data_config(config.data)
  name = resolve(data_config)
  if name is None:
    return None
  return _domain_metrics_cached(name, config_util.to_json(data_config))

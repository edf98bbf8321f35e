"""The generator evaluator: class-balanced samples, their images, and the metrics of the samples.

`eval.num_samples` class-balanced samples -> `samples.npz` (ADM layout: `arr_0` uint8 NHWC +
`labels`) and `samples.png` (one row per class); the domain metrics that `config.data` declares
(`fd_fmnist`, `class_accuracy`, ...; NOT Inception FID); with FID Inception weights, `fid`, `sfid`,
`is`/`is_std`, `precision`/`recall` against the reference (`arvision.evaluation.fid`).
"""

from __future__ import annotations

import functools
import math
import os
import sys

import jax
import numpy as np

from arvision import parallel, visualize
from arvision.evaluation import domain_classifiers, fid, npz
from arvision.parallel.mesh import BATCH_AXES


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
  """n labels, class-balanced (as the ADM protocol: 50 per class for 50k on ImageNet)."""
  return (np.arange(n) % num_classes).astype(np.int32)


def _on_mesh(tree, mesh):
  """Replicates leaves over `mesh` unless they already live on exactly its devices (the loop's)."""
  devices = set(mesh.devices.flat)
  rep = parallel.replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, rep)

  return jax.tree.map(put, tree)


def _gather(x) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.lru_cache(maxsize=8)
def _sampler(family, kw_items: tuple, out_sharding):
  """One jitted sampler per (family, settings, sharding): periodic evals compile once."""
  return jax.jit(functools.partial(family.sample, **dict(kw_items)), out_shardings=out_sharding)


def generate(
  family, params, labels: np.ndarray, batch_size: int, seed: int = 0, mesh=None, **kw
) -> np.ndarray:
  """Samples uint8 images for `labels` in fixed-size batches (one compilation), sharded over `mesh`.

  The batch axis is split over the mesh's batch axes ("data", "fsdp"); `batch_size` is rounded up to
  a multiple of their size. Batch `i` (starting at label index `i`) uses `jax.random.key(seed + i)`,
  and JAX's partitionable threefry draws the same bits whatever the sharding, so the images do not
  depend on the number of devices. Every process gets all images.

  Args:
    mesh: a `jax.sharding.Mesh` with `parallel.AXES`; None = all devices on the "data" axis.
  """
  from tqdm import tqdm

  if mesh is None:
    mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  batch_size = -(-int(batch_size) // shards) * shards
  batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  kw_items = tuple(sorted(kw.items()))
  try:
    hash(kw_items)
    sample = _sampler(family, kw_items, batch_sh)
  except TypeError:  # unhashable settings (e.g. a list): compile without the cache
    sample = _sampler.__wrapped__(family, kw_items, batch_sh)
  params = _on_mesh(params, mesh)
  out = []
  labels = np.asarray(labels, np.int32)
  n = len(labels)
  pad = (-n) % batch_size
  padded = np.resize(labels, n + pad)  # the tail repeats labels from the start
  for i in tqdm(
    range(0, len(padded), batch_size),
    desc="sampling",
    unit="batch",
    disable=jax.process_index() != 0,
    mininterval=0.5 if sys.stderr.isatty() else 30,
  ):
    chunk = padded[i : i + batch_size]
    cond = jax.make_array_from_callback(chunk.shape, batch_sh, lambda idx, c=chunk: c[idx])
    imgs = sample(params, cond, jax.device_put(jax.random.key(seed + i), rep))
    out.append(_gather(imgs))
  return np.concatenate(out)[:n]


def _jsonable(d: dict) -> dict:
  return {
    k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()
  }


class Evaluator(fid.ImageEvaluator):
  """Samples `num_samples` images with `sample_kw` (default: the family's) and scores them."""

  def run(self, params, out_dir: str) -> tuple[dict, dict]:
    """`(metrics, record)`: `record` holds the sampling, sharding and Inception settings."""
    family, config, num_samples = self.family, self.config, self.num_samples
    num_classes = config.data.num_classes
    kw = dict(family.sample_defaults(), **self.sample_kw)
    labels = balanced_labels(num_samples, num_classes)
    mesh = parallel.make_mesh(config.mesh)
    images = generate(
      family, params, labels, config.eval.batch_size, seed=config.seed, mesh=mesh, **kw
    )
    record = dict(
      sampling=_jsonable(self.sample_kw or family.sample_defaults()),
      sharding=dict(
        mesh={a: int(mesh.shape[a]) for a in parallel.AXES},
        num_devices=int(mesh.size),
        seed=int(config.seed),
      ),
    )
    if jax.process_index() == 0:
      npz.save_samples(os.path.join(out_dir, "samples.npz"), images, labels)
      per_class = min(10, num_samples // num_classes)
      rows = [images[labels == c][:per_class] for c in range(num_classes)]
      if per_class:
        visualize.save_grid(
          os.path.join(out_dir, "samples.png"), np.concatenate(rows), nrow=per_class, scale=2
        )
    metrics = {}
    domain = domain_classifiers.domain_metrics_for(config)
    if domain is not None:
      metrics.update(domain.evaluate(images, labels))
    if self.inc is not None:
      ref = self.inc.reference_stats(config)
      metrics.update(fid.inception_metrics(images, self.inc, ref, config.eval.batch_size))
      record["inception"] = self.inc.record(images, ref)
    return metrics, record

"""Evaluation shared by the loop (`config.eval_every`) and `arvision eval`.

What runs depends on the family's kind:
- generator: held-out loss; `eval.num_samples` class-balanced samples -> `samples.npz` (ADM layout:
  `arr_0` uint8 NHWC + `labels`), `samples.png` (one row per class), and the offline domain
  metrics when the data is Fashion-MNIST (`fd_fmnist`, `class_accuracy`, ...; NOT Inception FID).
- tokenizer: held-out loss; reconstruction PSNR / SSIM / codebook usage on the eval split and a
  grid of originals (odd rows) over reconstructions (even rows).
- classifier: held-out loss and accuracy on the whole eval split.

With FID Inception weights (`config.eval.inception_weights` / `--inception_weights`) generators also
get Inception metrics against a reference (`config.eval.reference` / `--reference`, an ADM batch
`.npz`; without one, statistics of the eval split computed once and cached): `fid`, `sfid` (when the
reference has `mu_s`/`sigma_s`), `is`/`is_std`, `precision`/`recall` (when real features exist), and
tokenizers get `rfid` (reconstructions vs their originals). The settings that decide these numbers
are recorded under `inception` in `metrics.json`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from arvision import config_util, data, parallel, visualize
from arvision.parallel.mesh import BATCH_AXES


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
    inception_weights: FID Inception weights file; None takes `config.eval.inception_weights`
      ("" = no Inception metrics).
    reference: ADM reference batch `.npz`; None takes `config.eval.reference` ("" = statistics of
      the eval split of `config.data`, cached).
  """
  out_dir = out_dir or os.path.join(workdir, "eval", f"step_{step:08d}")
  os.makedirs(out_dir, exist_ok=True)
  num_samples = num_samples or config.eval.num_samples
  inc = None  # classifiers are scored by accuracy only
  if family.kind != "classifier":
    inc = InceptionSetup.from_config(config, inception_weights, reference)
  settings = {}
  metrics = heldout_loss(family, params, config)
  if family.kind == "generator":
    metrics.update(
      eval_generator(
        family, params, config, out_dir, num_samples, sample_kw or {}, inc=inc, settings=settings
      )
    )
  elif family.kind == "tokenizer":
    metrics.update(
      eval_tokenizer(family, params, config, out_dir, num_samples, inc=inc, settings=settings)
    )
  elif family.kind == "classifier":
    metrics.update(eval_classifier(family, params, config))
  metrics = {k: float(v) for k, v in metrics.items()}
  record = dict(
    step=step,
    metrics=metrics,
    num_samples=num_samples,
    sampling=_jsonable(sample_kw or family.sample_defaults()) if family.kind == "generator" else {},
  )
  record.update(settings)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
  if writer is not None:
    writer.write(step, metrics, prefix="eval/")
  logging.info("eval at step %d: %s", step, metrics)
  return metrics


def _jsonable(d: dict) -> dict:
  return {
    k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()
  }


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


# --- generators -------------------------------------------------------------------------------------
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


def eval_generator(
  family, params, config, out_dir, num_samples, sample_kw, inc=None, settings=None
) -> dict:
  from arvision.evaluation import npz

  num_classes = config.data.num_classes
  kw = dict(family.sample_defaults(), **sample_kw)
  labels = balanced_labels(num_samples, num_classes)
  mesh = parallel.make_mesh(config.mesh)
  images = generate(
    family, params, labels, config.eval.batch_size, seed=config.seed, mesh=mesh, **kw
  )
  if settings is not None:
    settings["sharding"] = dict(
      mesh={a: int(mesh.shape[a]) for a in parallel.AXES},
      num_devices=int(mesh.size),
      seed=int(config.seed),
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
  domain = domain_metrics_for(config)
  if domain is not None:
    metrics.update(domain.evaluate(images, labels))
  if inc is not None:
    ref = inc.reference_stats(config)
    metrics.update(inception_metrics(images, inc, ref, config.eval.batch_size))
    if settings is not None:
      settings["inception"] = inc.record(images, ref)
  return metrics


# --- tokenizers -------------------------------------------------------------------------------------
def eval_tokenizer(family, params, config, out_dir, num_samples, inc=None, settings=None) -> dict:
  from arvision.evaluation import metrics as em
  from arvision.tokenizers import metrics as tm

  recon_fn = jax.jit(family.reconstruct)
  psnr, ssim, codes, seen = [], [], [], 0
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
    seen += int(mask.sum())
  metrics = dict(
    psnr=float(np.mean(np.concatenate(psnr))), ssim=float(np.mean(np.concatenate(ssim)))
  )
  if codes:
    usage = tm.codebook_usage(np.concatenate(codes), family.vocab_size)
    metrics.update(usage)
  if inc is not None:
    originals, recons = np.concatenate(originals), np.concatenate(recons)
    if len(originals) < 2:
      raise ValueError(
        f"rFID needs >= 2 eval images; num_samples={num_samples} gave {len(originals)}"
      )
    bs = config.eval.batch_size
    f_real = inc.features(originals, bs)["pool"]
    f_recon = inc.features(recons, bs)["pool"]
    metrics["rfid"] = frechet_distance_to_stats(f_recon, *em.feature_stats(f_real))
    if settings is not None:
      settings["inception"] = dict(
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
  return metrics


# --- classifiers ------------------------------------------------------------------------------------
def eval_classifier(family, params, config) -> dict:
  feats = jax.jit(family.features)
  correct = total = 0
  for batch in data.make_eval_iter(config.data, batch_size=config.data.eval_batch_size):
    _, logits = feats(params, batch["image"])
    mask = np.asarray(batch["mask"])
    correct += int(np.sum((np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"])) & mask))
    total += int(mask.sum())
  return dict(accuracy=correct / max(total, 1))


# --- offline domain metrics (Fashion-MNIST) ---------------------------------------------------------
DOMAIN_CLASSIFIER = "classifier.py:fmnist"


def _is_fashion_mnist(data_config) -> bool:
  return (
    data_config.source == "fashion_mnist"
    and data_config.image_size == 32
    and data_config.channels == 1
  )


def cache_dir() -> str:
  return os.environ.get(
    "ARVISION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "arvision")
  )


PACKAGED_CLASSIFIER = os.path.join(
  os.path.dirname(__file__), "evaluation", "data", "classifier_fmnist.npz"
)


def config_sha(config) -> str:
  """Identifies what determines trained weights (not logging, eval or checkpoint settings)."""
  d = json.loads(config_util.to_json(config))
  keep = {k: d.get(k) for k in ("family", "seed", "total_steps", "model", "data", "optim")}
  return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def domain_classifier():
  """The Fashion-MNIST domain classifier (`configs/classifier.py:fmnist`).

  Uses the params shipped with the package (trained by the one loop with that config, see
  `experiments/train_domain_classifier.py`) while the config is unchanged; otherwise trains it once
  with the loop and caches it under `$ARVISION_CACHE` (default ~/.cache/arvision).
  """
  from arvision import checkpoint as ckpt_lib
  from arvision import families
  from arvision.convert.common import unflatten
  from arvision.train import train

  config = config_util.load_config_file(DOMAIN_CLASSIFIER)
  family = families.build(config)
  sha = config_sha(config)
  if os.path.exists(PACKAGED_CLASSIFIER):
    with np.load(PACKAGED_CLASSIFIER) as f:
      if str(f["__config_sha__"]) == sha:
        return family, unflatten({k: f[k] for k in f.files if k != "__config_sha__"}), config
  workdir = os.path.join(cache_dir(), f"classifier_fmnist_{sha}")
  if ckpt_lib.Checkpointer(workdir).latest_step() != config.total_steps:
    logging.info("training the Fashion-MNIST domain classifier once into %s", workdir)
    train(config, workdir)
  loaded = ckpt_lib.load_params(workdir)
  return family, loaded.get("ema", loaded["params"]), config


@functools.lru_cache(maxsize=2)
def _domain_metrics_cached(data_json: str):
  from arvision.evaluation.domain import DomainMetrics

  data_config = config_util.from_json(data_json)
  fam, params, _ = domain_classifier()
  real, real_labels = data.load_images(data_config, data_config.eval_split)
  return DomainMetrics(fam, params, real, real_labels)


def domain_metrics_for(config):
  """DomainMetrics against the eval split, or None when the data has no domain classifier."""
  data_config = data.image_data_config(config.data)
  if not _is_fashion_mnist(data_config):
    return None
  return _domain_metrics_cached(config_util.to_json(data_config))


# --- Inception metrics (FID / sFID / IS / precision-recall; rFID) ---------------------------------
REFERENCE_MAX_IMAGES = 50_000  # eval-split reference statistics use at most this many images
IS_SPLIT_SIZE = 5_000  # ADM: one Inception Score split per 5,000 samples
PR_K = 3  # ADM: k-th nearest neighbour radius for the precision/recall manifolds


def stats_dir() -> str:
  return os.path.join(cache_dir(), "stats")


class InceptionSetup:
  """The FID Inception weights (loaded once) and the reference they are compared against."""

  def __init__(self, weights_path: str, reference_path: str = ""):
    from arvision.evaluation import inception, npz

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
    from arvision.evaluation import inception

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
    from arvision.evaluation import inception

    want = dict(mu=inception.POOL_DIM, mu_s=inception.SPATIAL_DIM)
    for key, dim in want.items():
      if key in stats and stats[key].shape != (dim,):
        raise ValueError(
          f"{source}: reference {key!r} has shape {stats[key].shape}; the FID Inception gives "
          f"({dim},) (pool3 for 'mu', mixed_6/conv[..., :7] for 'mu_s')"
        )

  def features(self, images_uint8, batch_size: int) -> dict:
    from arvision.evaluation import inception

    return inception.inception_features(images_uint8, self.variables, batch_size=int(batch_size))

  def _extractor(self) -> str:
    return f"fid-inception-2015-12-05@{self.fingerprint}"

  def reference_stats(self, config) -> dict:
    """`mu`, `sigma` [, `mu_s`, `sigma_s`] [, `pool`: real pool3 features for precision/recall]."""
    from arvision.evaluation import metrics as em
    from arvision.evaluation import npz

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


def frechet_distance_to_stats(feats, mu, sigma) -> float:
  """`metrics.frechet_distance(*feature_stats(feats), mu, sigma)`, fast when N <= D.

  With `S1 = Xc^T Xc / (N-1)` (`Xc` the centered `[N, D]` features), the non-zero eigenvalues of
  `S1 S2` (whose square roots sum to the trace term) are those of the `[N, N]` matrix
  `Xc S2 Xc^T / (N-1)`. So evaluations with fewer samples than feature dimensions (the loop's
  periodic evals, rFID on small splits) need one small eigendecomposition instead of two `D x D`
  ones (seconds each for D = 2048 on a CPU). The result is the same up to float64 rounding.
  """
  from arvision.evaluation import metrics as em

  x = np.asarray(feats, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"feats have shape {x.shape}; accepted: [N, D] with N >= 2")
  n, d = x.shape
  mu2, s2 = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if n > d:
    return em.frechet_distance(*em.feature_stats(x), mu2, s2)
  if mu2.shape != (d,) or s2.shape != (d, d):
    raise ValueError(f"mu {mu2.shape} / sigma {s2.shape}; accepted: [{d}] and [{d}, {d}]")
  if not (np.all(np.isfinite(mu2)) and np.all(np.isfinite(s2))):
    raise ValueError("reference mu/sigma have non-finite values; accepted: finite statistics")
  s2 = (s2 + s2.T) / 2
  mu1 = x.mean(0)
  xc = x - mu1
  m = xc @ s2 @ xc.T / (n - 1)
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(xc * xc) / (n - 1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_metrics(images_uint8, inc: InceptionSetup, ref: dict, batch_size: int) -> dict:
  """FID, sFID (if `ref` has `mu_s`), IS, precision/recall (if `ref` has real `pool` features)."""
  from arvision.evaluation import metrics as em

  n = len(images_uint8)
  if n < 2:
    raise ValueError(f"Inception metrics need >= 2 samples; num_samples={n}")
  f = inc.features(images_uint8, batch_size)
  is_mean, is_std = em.inception_score(f["logits"], splits=max(1, math.ceil(n / IS_SPLIT_SIZE)))
  out = {"is": is_mean, "is_std": is_std}
  out["fid"] = frechet_distance_to_stats(f["pool"], ref["mu"], ref["sigma"])
  if "mu_s" in ref:
    out["sfid"] = frechet_distance_to_stats(f["spatial"], ref["mu_s"], ref["sigma_s"])
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

"""Evaluation shared by the loop (`config.eval_every`) and `arvision eval`.

What runs depends on the family's kind:
- generator: held-out loss; `eval.num_samples` class-balanced samples -> `samples.npz` (ADM layout:
  `arr_0` uint8 NHWC + `labels`), `samples.png` (one row per class), and the offline domain
  metrics when the data is Fashion-MNIST (`fd_fmnist`, `class_accuracy`, ...; NOT Inception FID).
- tokenizer: held-out loss; reconstruction PSNR / SSIM / codebook usage on the eval split and a
  grid of originals (odd rows) over reconstructions (even rows).
- classifier: held-out loss and accuracy on the whole eval split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from arvision import config_util, data, visualize


def run(family, params, config, workdir: str, *, step: int, writer=None, out_dir: str | None = None,
        num_samples: int | None = None, sample_kw: dict | None = None) -> dict:
  """Evaluates `params`; writes `metrics.json` (+ samples) to `out_dir` (default WORKDIR/eval/step_N)."""
  out_dir = out_dir or os.path.join(workdir, "eval", f"step_{step:08d}")
  os.makedirs(out_dir, exist_ok=True)
  num_samples = num_samples or config.eval.num_samples
  metrics = heldout_loss(family, params, config)
  if family.kind == "generator":
    metrics.update(eval_generator(family, params, config, out_dir, num_samples, sample_kw or {}))
  elif family.kind == "tokenizer":
    metrics.update(eval_tokenizer(family, params, config, out_dir, num_samples))
  elif family.kind == "classifier":
    metrics.update(eval_classifier(family, params, config))
  metrics = {k: float(v) for k, v in metrics.items()}
  record = dict(step=step, metrics=metrics, num_samples=num_samples,
                sampling=_jsonable(sample_kw or family.sample_defaults()) if family.kind == "generator" else {})
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
  if writer is not None:
    writer.write(step, metrics, prefix="eval/")
  logging.info("eval at step %d: %s", step, metrics)
  return metrics


def _jsonable(d: dict) -> dict:
  return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}


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


def generate(family, params, labels: np.ndarray, batch_size: int, seed: int = 0, **kw) -> np.ndarray:
  """Samples uint8 images for `labels` in fixed-size batches (one compilation)."""
  from tqdm import tqdm

  sample = jax.jit(functools.partial(family.sample, **kw))
  out = []
  n = len(labels)
  pad = (-n) % batch_size
  padded = np.concatenate([labels, labels[:pad]]) if pad else labels
  for i in tqdm(range(0, len(padded), batch_size), desc="sampling", unit="batch",
                disable=jax.process_index() != 0, mininterval=0.5 if sys.stderr.isatty() else 30):
    imgs = sample(params, jnp.asarray(padded[i:i + batch_size]), jax.random.key(seed + i))
    out.append(np.asarray(jax.device_get(imgs)))
  return np.concatenate(out)[:n]


def eval_generator(family, params, config, out_dir, num_samples, sample_kw) -> dict:
  from arvision.evaluation import npz

  num_classes = config.data.num_classes
  kw = dict(family.sample_defaults(), **sample_kw)
  labels = balanced_labels(num_samples, num_classes)
  images = generate(family, params, labels, config.eval.batch_size, seed=config.seed, **kw)
  if jax.process_index() == 0:
    npz.save_samples(os.path.join(out_dir, "samples.npz"), images, labels)
    per_class = min(10, num_samples // num_classes)
    rows = [images[labels == c][:per_class] for c in range(num_classes)]
    if per_class:
      visualize.save_grid(os.path.join(out_dir, "samples.png"), np.concatenate(rows), nrow=per_class,
                          scale=2)
  metrics = {}
  domain = domain_metrics_for(config)
  if domain is not None:
    metrics.update(domain.evaluate(images, labels))
  return metrics


# --- tokenizers -------------------------------------------------------------------------------------
def eval_tokenizer(family, params, config, out_dir, num_samples) -> dict:
  from arvision.tokenizers import metrics as tm

  recon_fn = jax.jit(family.reconstruct)
  psnr, ssim, codes, seen = [], [], [], 0
  grid_rows = []
  for batch in data.make_eval_iter(config.data, batch_size=config.eval.batch_size,
                                   num_examples=num_samples):
    mask = np.asarray(batch["mask"])
    x = batch["image"]
    recon, c = recon_fn(params, x)
    recon = np.asarray(jnp.clip(recon, -1, 1))
    x = np.asarray(x)
    psnr.append(np.asarray(tm.psnr(x, recon))[mask])
    ssim.append(np.asarray(tm.ssim(x, recon))[mask])
    if c is not None:
      codes.append(np.asarray(c)[mask])
    if not grid_rows:
      k = min(8, int(mask.sum()))
      grid_rows = [visualize.to_uint8(x[:k]), visualize.to_uint8(recon[:k])]
    seen += int(mask.sum())
  metrics = dict(psnr=float(np.mean(np.concatenate(psnr))), ssim=float(np.mean(np.concatenate(ssim))))
  if codes:
    usage = tm.codebook_usage(np.concatenate(codes), family.vocab_size)
    metrics.update(usage)
  if jax.process_index() == 0 and grid_rows:
    visualize.save_grid(os.path.join(out_dir, "reconstructions.png"), np.concatenate(grid_rows),
                        nrow=len(grid_rows[0]), scale=2)
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
  return (data_config.source == "fashion_mnist" and data_config.image_size == 32
          and data_config.channels == 1)


def cache_dir() -> str:
  return os.environ.get("ARVISION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "arvision"))


PACKAGED_CLASSIFIER = os.path.join(os.path.dirname(__file__), "evaluation", "data",
                                   "classifier_fmnist.npz")


def config_sha(config) -> str:
  return hashlib.sha1(config_util.to_json(config).encode()).hexdigest()[:12]


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
  if not _is_fashion_mnist(config.data):
    return None
  return _domain_metrics_cached(config_util.to_json(config.data))

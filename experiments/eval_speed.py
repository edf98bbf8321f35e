"""Throughput of the evaluation pipeline on the current device: samples/s, features/s.

    python experiments/eval_speed.py                                  # var.py:smoke, small N (CPU)
    python experiments/eval_speed.py --config var.py:d16 --num_samples 1000 --inception_images 2000

Rows (each timed after a warm-up call that compiles, so compile time is reported separately):
- `sampling`: `arvision.evaluation.generator.generate` (the batch axis sharded over all local
  devices, as `arvision eval` runs it) with the config's default sampling settings, params randomly
  initialised: sampling cost does not depend on the weights' values.
- `inception`: `arvision.evaluation.inception.inception_features` (TF-1 resize to 299 + the FID
  Inception-v3) on uint8 images of the config's shape. The Inception weights are RANDOM, built from
  the module's shapes (the real file cannot be downloaded here): SPEED ONLY, no metric values.
- `domain`: the Fashion-MNIST domain classifier's features (`fd_fmnist` & co.) on 32x32x1 images.
- `fid_2048`: one Frechet distance of 2048-d Inception statistics from N samples, the full
  `D x D` path (`metrics.frechet_distance`) and the small-N path
  (`metrics.frechet_distance_to_stats`).

Results: a printed table and `experiments/results/eval_speed_<device>.json` with device/versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arvision import config_util, data, families, parallel  # noqa: E402
from arvision.evaluation import domain_classifiers, generator  # noqa: E402
from arvision.evaluation import inception as inc  # noqa: E402
from arvision.evaluation import metrics as em  # noqa: E402
from arvision.evaluation.domain import DomainMetrics  # noqa: E402


def build_generator(config):
  """The config's generator (and tokenizer) with randomly initialised params."""
  tokenizer, frozen = None, {}
  if families.needs_tokenizer(config):
    tok_config = config.tokenizer.config
    tokenizer = families.build(tok_config)
    frozen["tokenizer"] = tokenizer.init(jax.random.key(1), data.input_spec(tok_config.data, 2))
  family = families.build(config, tokenizer=tokenizer)
  if family.kind != "generator":
    raise ValueError(f"--config {config.family!r} is a {family.kind}; accepted: a generator config")
  params = family.init(jax.random.key(0), data.input_spec(config.data, 2))
  return family, {**params, **frozen}


def timed(fn, *args, **kw):
  t = time.perf_counter()
  out = fn(*args, **kw)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t


def device_name() -> str:
  if jax.default_backend() == "cpu":
    return "cpu"
  kind = getattr(jax.devices()[0], "device_kind", jax.default_backend())
  return re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_").lower()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="var.py:smoke", help="generator config[:variant]")
  parser.add_argument("--num_samples", type=int, default=64, help="timed samples")
  parser.add_argument("--batch_size", type=int, default=0, help="sampling batch (0: config.eval)")
  parser.add_argument("--inception_images", type=int, default=64, help="timed Inception images")
  parser.add_argument("--inception_batch", type=int, default=32)
  parser.add_argument("--domain_images", type=int, default=2000)
  parser.add_argument("--out", default=None, help="JSON path (default experiments/results/...)")
  args = parser.parse_args()

  config = config_util.load_config_file(args.config)
  dc = config.data
  batch = args.batch_size or config.eval.batch_size
  rows = []

  # Sampling, sharded over all local devices.
  family, params = build_generator(config)
  mesh = parallel.make_mesh(config.mesh)
  kw = family.sample_defaults()
  labels = generator.balanced_labels(args.num_samples, dc.num_classes)
  _, t_first = timed(generator.generate, family, params, labels[:batch], batch, mesh=mesh, **kw)
  images, t = timed(generator.generate, family, params, labels, batch, seed=1, mesh=mesh, **kw)
  rows.append(
    dict(
      stage="sampling",
      items=len(labels),
      seconds=t,
      per_second=len(labels) / t,
      first_call_seconds=t_first,
      batch_size=batch,
      shape=list(images.shape[1:]),
      devices=int(mesh.size),
      sample_kw={k: str(v) for k, v in kw.items()},
    )
  )

  # Inception features (random weights: speed only).
  variables = jax.device_put(inc.random_variables())
  rs = np.random.RandomState(0)
  imgs = rs.randint(
    0, 256, (args.inception_images, dc.image_size, dc.image_size, dc.channels), dtype=np.uint8
  )
  ib = args.inception_batch
  _, t_first = timed(inc.inception_features, imgs[:ib], variables, batch_size=ib)
  feats, t = timed(inc.inception_features, imgs, variables, batch_size=ib)
  rows.append(
    dict(
      stage="inception",
      items=len(imgs),
      seconds=t,
      per_second=len(imgs) / t,
      first_call_seconds=t_first,
      batch_size=ib,
      shape=list(imgs.shape[1:]),
      weights="random (speed only)",
    )
  )

  # Domain classifier features (Fashion-MNIST shape).
  cls_family, cls_params, _ = domain_classifiers.load("fmnist")
  dom = rs.randint(0, 256, (args.domain_images, 32, 32, 1), dtype=np.uint8)
  t0 = time.perf_counter()
  dm = DomainMetrics(cls_family, cls_params, dom[:500])  # compiles; real set = 500 random images
  t_first = time.perf_counter() - t0
  _, t = timed(dm.features, dom)
  rows.append(
    dict(
      stage="domain",
      items=len(dom),
      seconds=t,
      per_second=len(dom) / t,
      first_call_seconds=t_first,
      batch_size=dm.batch_size,
      shape=[32, 32, 1],
    )
  )

  # Frechet distance of 2048-d statistics from N samples: full D x D path vs the small-N path.
  pool = rs.randn(args.num_samples, inc.POOL_DIM)
  ref = em.feature_stats(rs.randn(args.num_samples + 7, inc.POOL_DIM))
  full, t_full = timed(lambda: em.frechet_distance(*em.feature_stats(pool), *ref))
  fast, t_fast = timed(em.frechet_distance_to_stats, pool, *ref)
  rows.append(
    dict(
      stage="fid_2048",
      items=1,
      seconds=t_full,
      per_second=1 / t_full,
      small_n_path_seconds=t_fast,
      n=args.num_samples,
      abs_difference=abs(full - fast),
    )
  )

  print(f"device: {jax.devices()[0]} x{jax.device_count()}  config: {args.config}")
  print("Inception weights are random: the inception row measures speed only.")
  print(f"{'stage':<10} {'items':>6} {'seconds':>9} {'items/s':>9} {'compile+1st (s)':>16}")
  for r in rows:
    print(
      f"{r['stage']:<10} {r['items']:>6} {r['seconds']:>9.2f} {r['per_second']:>9.2f} "
      f"{r.get('first_call_seconds', float('nan')):>16.2f}"
    )
  fid = rows[-1]
  print(
    f"fid_2048 small-N path: {fid['small_n_path_seconds']:.3f} s "
    f"(|difference| {fid['abs_difference']:.2e})"
  )

  import flax

  meta = dict(
    device=str(jax.devices()[0]),
    device_kind=getattr(jax.devices()[0], "device_kind", None),
    device_count=jax.device_count(),
    backend=jax.default_backend(),
    config=args.config,
    jax=jax.__version__,
    jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
    flax=flax.__version__,
    numpy=np.__version__,
    python=platform.python_version(),
    platform=platform.platform(),
    cpu_count=os.cpu_count(),
    note="inception weights are random (speed only); generator params are randomly initialised",
    time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  )
  out = args.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", f"eval_speed_{device_name()}.json"
  )
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

"""The classifier family (configs/classifier.py) and the offline domain metrics built on it."""

import gzip
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arvision import families, optim
from arvision.config_util import load_config_file
from arvision.evaluation import domain
from arvision.models import classifier

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _smoke_config():
  return load_config_file("classifier.py:smoke")


def _toy_data(rng, n, num_classes=4, size=32):
  """Class k: a bright horizontal band at row block k plus noise, as float [-1, 1] NHWC."""
  labels = rng.integers(0, num_classes, size=n)
  x = rng.normal(0.0, 0.3, size=(n, size, size, 1)) - 0.5
  band = size // num_classes
  for i, k in enumerate(labels):
    x[i, k * band : (k + 1) * band] += 1.2
  return np.clip(x, -1, 1).astype(np.float32), labels.astype(np.int32)


def _train(fam, params, tx, images, labels, steps, batch_size, seed=0):
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, rng):
    (loss, m), g = jax.value_and_grad(lambda p: fam.loss(p, batch, rng, True), has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss, m

  rs = np.random.RandomState(seed)
  losses = []
  for s in range(steps):
    idx = rs.randint(0, len(images), batch_size)
    batch = {"image": images[idx], "label": labels[idx]}
    params, opt, loss, _ = step(params, opt, batch, jax.random.key(s))
    losses.append(float(loss))
  return params, losses


@pytest.fixture(scope="module")
def trained_toy():
  config = _smoke_config()
  fam = families.build(config)
  rng = np.random.default_rng(0)
  images, labels = _toy_data(rng, 256)
  params = fam.init(jax.random.key(0), {"image": images[:2], "label": labels[:2]})
  tx = optax.adam(3e-3)
  params0 = params
  params, losses = _train(fam, params, tx, images, labels, steps=60, batch_size=32)
  return fam, params0, params, losses


def test_build_and_shapes():
  config = _smoke_config()
  fam = families.build(config)
  assert isinstance(fam, classifier.Classifier) and fam.kind == "classifier"
  x = jnp.zeros((3, 32, 32, 1))
  params = fam.init(jax.random.key(0), {"image": x, "label": jnp.zeros(3, jnp.int32)})
  feats, logits = fam.features(params, x)
  assert feats.shape == (3, config.model.features) and logits.shape == (3, 10)
  loss, metrics = fam.loss(
    params, {"image": x, "label": jnp.zeros(3, jnp.int32)}, jax.random.key(1), train=True
  )
  assert loss.shape == () and set(metrics) == {"ce", "accuracy"}
  # Untrained logits are near uniform: the loss is about log(10).
  assert abs(float(loss) - np.log(10)) < 1.0
  with pytest.raises(ValueError, match="image"):
    fam.features(params, jnp.zeros((2, 28, 28, 1)))


def test_config_variants_and_errors():
  full = load_config_file("classifier.py:fmnist")
  assert full.family == "classifier" and full.data.random_crop and full.model.features == 256
  with pytest.raises(ValueError, match="variant"):
    load_config_file("classifier.py:nope")
  config = _smoke_config().copy_and_resolve_references()
  with config.unlocked():
    config.data.image_size = 30
  with pytest.raises(ValueError, match="image_size"):
    classifier.build(config)


def test_dropout_only_in_train():
  config = load_config_file("classifier.py:fmnist").copy_and_resolve_references()
  with config.unlocked():
    config.model.widths = (4, 8)
    config.model.features = 16
    config.model.dropout = 0.5
  fam = classifier.build(config)
  x = jnp.asarray(_toy_data(np.random.default_rng(1), 4)[0])
  params = fam.init(jax.random.key(0), {"image": x})
  a = fam.apply(params, x, jax.random.key(1), train=True)[1]
  b = fam.apply(params, x, jax.random.key(2), train=True)[1]
  c = fam.apply(params, x, jax.random.key(1), train=False)[1]
  d = fam.apply(params, x, jax.random.key(2), train=False)[1]
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(c, d)


def test_short_train_learns_toy_classes(trained_toy):
  fam, _, params, losses = trained_toy
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
  images, labels = _toy_data(np.random.default_rng(123), 200)
  _, logits = fam.features(params, jnp.asarray(images))
  acc = float((np.argmax(logits, -1) == labels).mean())
  assert acc > 0.8  # chance is 0.25


def _to_uint8(x):
  return np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)


def test_domain_metrics(trained_toy):
  fam, _, params, _ = trained_toy
  rng = np.random.default_rng(5)
  real, real_labels = _toy_data(rng, 200)
  other, other_labels = _toy_data(rng, 200)
  dm = domain.DomainMetrics(
    fam, params, _to_uint8(real), real_labels, kid_subsets=5, kid_subset_size=100, batch_size=64
  )
  same = dm.evaluate(_to_uint8(real), real_labels)
  assert abs(same["fd_fmnist"]) < 1e-3
  assert same["precision_fmnist"] == 1.0 and same["recall_fmnist"] == 1.0
  assert same["class_accuracy"] > 0.8
  floor = dm.floor(_to_uint8(other), other_labels)
  # A collapsed "generator": one image repeated, labelled as if it were class-conditional samples.
  bad_images = np.repeat(other[:1], 200, axis=0)
  bad = dm.evaluate(_to_uint8(bad_images), np.arange(200) % 4)
  assert bad["fd_fmnist"] > 10 * max(floor["fd_fmnist"], 1e-6)
  assert bad["kid_fmnist"] > floor["kid_fmnist"]
  assert bad["recall_fmnist"] < floor["recall_fmnist"]
  assert bad["class_accuracy"] < 0.5 < floor["class_accuracy"]
  assert "class_accuracy" not in dm.evaluate(_to_uint8(other))
  with pytest.raises(ValueError, match="uint8"):
    dm.evaluate(real, real_labels)
  with pytest.raises(ValueError, match="labels"):
    dm.evaluate(_to_uint8(other), other_labels[:5])


def _load_fmnist():
  rd = lambda f, off: np.frombuffer(gzip.open(f"{FMNIST_DIR}/{f}").read(), np.uint8, offset=off)
  x_tr = rd("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
  y_tr = rd("train-labels-idx1-ubyte.gz", 8).astype(np.int32)
  x_te = rd("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
  y_te = rd("t10k-labels-idx1-ubyte.gz", 8).astype(np.int32)

  def to36(x):  # the data pipeline's resize to 1.125 * 32 before cropping
    out = [
      np.asarray(
        jax.image.resize(
          jnp.asarray(x[i : i + 5000], jnp.float32)[..., None],
          (len(x[i : i + 5000]), 36, 36, 1),
          "bicubic",
        )
      )
      for i in range(0, len(x), 5000)
    ]
    return (np.clip(np.concatenate(out), 0, 255) / 127.5 - 1).astype(np.float32)

  return to36(x_tr), y_tr, to36(x_te)[:, 2:34, 2:34], y_te


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="needs apt dataset-fashion-mnist")
def test_fmnist_variant_reaches_90_percent():
  config = load_config_file("classifier.py:fmnist")
  fam = families.build(config)
  x_tr36, y_tr, x_te, y_te = _load_fmnist()
  b, steps = config.data.batch_size, config.total_steps
  tx, _ = optim.make(config.optim, steps, b)
  params = fam.init(jax.random.key(config.seed), {"image": x_te[:1]})
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, rng):
    g, _ = jax.grad(lambda p: fam.loss(p, batch, rng, True), has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt

  rs = np.random.RandomState(0)
  t0 = time.time()
  for s in range(steps):
    idx = rs.randint(0, len(x_tr36), b)
    oy, ox = rs.randint(0, 5, (2, b))  # per-image random 32x32 crops of the 36x36 images
    rows = (oy[:, None] + np.arange(32))[:, :, None]
    cols = (ox[:, None] + np.arange(32))[:, None, :]
    batch = {"image": x_tr36[idx[:, None, None], rows, cols], "label": y_tr[idx]}
    params, opt = step(params, opt, batch, jax.random.key(s))
  print(f"fmnist classifier: {steps} steps in {time.time() - t0:.0f}s")
  preds = np.concatenate(
    [
      np.argmax(np.asarray(fam.features(params, x_te[i : i + 1000])[1]), -1)
      for i in range(0, len(x_te), 1000)
    ]
  )
  assert (preds == y_te).mean() >= 0.90

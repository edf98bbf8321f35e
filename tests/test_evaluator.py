"""`arvision eval`'s function (`evaluation.evaluate.run`) with Inception metrics, and sharded sampling.

The FID Inception weights cannot be downloaded here: the tests use random weights of the right
shapes saved with `inception.save_converted`, so the numbers check the plumbing (which features are
compared with which statistics), not real FID values.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision import config_util, data, parallel
from arvision.evaluation import domain_classifiers, evaluate, fid, npz
from arvision.evaluation import generator as gen_eval
from arvision.evaluation import inception as inc
from arvision.evaluation import metrics as em
from arvision.family import Family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- fakes ---------------------------------------------------------------------------------------
class ToyGenerator(Family):
  """Per-class mean image plus seeded noise: cheap to compile, deterministic for a seed."""

  kind = "generator"

  def init(self, rng, batch):
    c = self.config.data
    shape = (c.num_classes, c.image_size, c.image_size, c.channels)
    return {"means": jax.random.uniform(rng, shape, minval=-1.0, maxval=1.0)}

  def loss(self, params, batch, rng, train):
    err = jnp.mean((batch["image"] - params["means"][batch["label"]]) ** 2)
    return err, {"mse": err}

  def sample(self, params, cond, rng, noise=0.5):
    mean = params["means"][cond]
    x = mean + noise * jax.random.normal(rng, mean.shape)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class ToyTokenizer(Family):
  """Reconstructs `gain * x` (gain 1: perfect reconstructions); no codes."""

  kind = "tokenizer"

  def init(self, rng, batch):
    return {"gain": jnp.ones(())}

  def loss(self, params, batch, rng, train):
    err = jnp.mean((batch["image"] * (params["gain"] - 1.0)) ** 2)
    return err, {"mse": err}

  def reconstruct(self, params, x):
    return x * params["gain"], None


def _config(**overrides):
  c = config_util.base_config("toy")
  c.data.source = "synthetic"
  c.data.image_size, c.data.channels, c.data.num_classes = 8, 1, 4
  c.data.eval_batch_size = 8
  c.eval.num_batches, c.eval.num_samples, c.eval.batch_size = 1, 8, 8
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  c.lock()
  return c


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "inception-random.npz")
  inc.save_converted(inc.random_variables(0), path)
  return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("ARVISION_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def generator():
  config = _config()
  family = ToyGenerator(config)
  return family, family.init(jax.random.key(0), None), config


def _samples(family, params, config):
  """What `run` generates for `config` (same labels, seed and mesh)."""
  labels = gen_eval.balanced_labels(config.eval.num_samples, config.data.num_classes)
  return gen_eval.generate(
    family,
    params,
    labels,
    config.eval.batch_size,
    seed=config.seed,
    mesh=parallel.make_mesh(config.mesh),
  )


def _read(out_dir):
  with open(os.path.join(out_dir, "metrics.json")) as f:
    return json.load(f)


# --- generators ----------------------------------------------------------------------------------
def test_fid_sfid_is_pr_against_adm_reference(generator, weights_path, tmp_path):
  family, params, config = generator
  images = _samples(family, params, config)
  feats = inc.inception_features(images, weights_path, batch_size=8)
  # Reference = the very samples the eval generates: FID and sFID ~ 0, P = R = 1.
  same = str(tmp_path / "same.npz")
  npz.save_reference_stats(
    same, *em.feature_stats(feats["pool"]), *em.feature_stats(feats["spatial"]), arr_0=images
  )
  out = str(tmp_path / "eval_same")
  m = evaluate.run(
    family,
    params,
    config,
    str(tmp_path),
    step=3,
    out_dir=out,
    inception_weights=weights_path,
    reference=same,
  )
  record = _read(out)
  for k in ("fid", "sfid", "is", "is_std", "precision", "recall"):
    assert k in record["metrics"] and np.isfinite(record["metrics"][k]), k
  scale = np.trace(em.feature_stats(feats["pool"])[1])
  assert abs(m["fid"]) < 1e-4 * scale, (m["fid"], scale)
  assert abs(m["sfid"]) < 1e-4 * np.trace(em.feature_stats(feats["spatial"])[1])
  assert m["precision"] == 1.0 and m["recall"] == 1.0
  is_mean, _ = em.inception_score(feats["logits"], splits=1)
  assert m["is"] == pytest.approx(is_mean, rel=1e-6) and m["is"] >= 1.0
  # Samples files stay as before; the settings that decide the numbers are recorded.
  saved, labels = npz.load_samples(os.path.join(out, "samples.npz"))
  np.testing.assert_array_equal(saved, images)
  assert os.path.exists(os.path.join(out, "samples.png"))
  rec = record["inception"]
  assert rec["weights"] == "inception-random.npz" and rec["num_images"] == 8
  assert rec["reference"] == os.path.abspath(same) and rec["reference_images"] == 8
  assert "8x8x1" in rec["resize"] and "299x299" in rec["resize"] and rec["is_splits"] == 1
  assert record["sharding"]["num_devices"] == jax.device_count()

  # A different reference (inverted images, without spatial stats): FID clearly > 0, no sFID.
  other_imgs = 255 - images
  f2 = inc.inception_features(other_imgs, weights_path, batch_size=8)
  other = str(tmp_path / "other.npz")
  npz.save_reference_stats(other, *em.feature_stats(f2["pool"]), arr_0=other_imgs)
  m2 = evaluate.run(
    family,
    params,
    config,
    str(tmp_path),
    step=3,
    out_dir=str(tmp_path / "e2"),
    inception_weights=weights_path,
    reference=other,
  )
  assert m2["fid"] == pytest.approx(
    em.frechet_distance_to_stats(feats["pool"], *em.feature_stats(f2["pool"])), rel=1e-6
  )
  assert m2["fid"] > 100 * max(abs(m["fid"]), 1e-3)
  p, r = em.precision_recall(f2["pool"], feats["pool"], k=3)
  assert "sfid" not in m2 and (m2["precision"], m2["recall"]) == (p, r)


@pytest.mark.parametrize("n", [2, 8, 40, 64, 90])
def test_frechet_distance_to_stats_matches_metrics(n):
  rs = np.random.RandomState(n)
  d = 64
  x = rs.randn(n, d) @ rs.randn(d, d) * 0.3 + 1.0
  y = rs.randn(70, d) * 2.0 + rs.randn(d)
  want = em.frechet_distance(*em.feature_stats(x), *em.feature_stats(y))
  got = em.frechet_distance_to_stats(x, *em.feature_stats(y))
  assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
  assert abs(em.frechet_distance_to_stats(x, *em.feature_stats(x))) < 1e-8 * np.sum(x * x)
  with pytest.raises(ValueError, match=r"accepted: \[64\] and \[64, 64\]"):
    em.frechet_distance_to_stats(x[:8], np.zeros(3), np.eye(3))


def test_missing_reference_keys_fail_before_sampling(generator, weights_path, tmp_path):
  family, params, config = generator
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, mu=np.zeros(inc.POOL_DIM))
  out = str(tmp_path / "eval")
  with pytest.raises(KeyError, match=r"missing reference key\(s\) \['sigma'\]"):
    evaluate.run(
      family,
      params,
      config,
      str(tmp_path),
      step=0,
      out_dir=out,
      inception_weights=weights_path,
      reference=bad,
    )
  assert not os.path.exists(os.path.join(out, "samples.npz"))
  wrong = str(tmp_path / "wrong.npz")
  npz.save_reference_stats(wrong, np.zeros(64), np.eye(64))
  with pytest.raises(ValueError, match=r"'mu' has shape \(64,\)"):
    evaluate.run(
      family,
      params,
      config,
      str(tmp_path),
      step=0,
      out_dir=out,
      inception_weights=weights_path,
      reference=wrong,
    )


def test_weights_errors_and_no_weights(generator, tmp_path):
  family, params, config = generator
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    evaluate.run(
      family,
      params,
      config,
      str(tmp_path),
      step=0,
      out_dir=str(tmp_path / "a"),
      inception_weights=str(tmp_path / "nope.pth"),
    )
  ref = str(tmp_path / "ref.npz")
  npz.save_reference_stats(ref, np.zeros(inc.POOL_DIM), np.eye(inc.POOL_DIM))
  with pytest.raises(ValueError, match="inception_weights"):
    evaluate.run(
      family, params, config, str(tmp_path), step=0, out_dir=str(tmp_path / "b"), reference=ref
    )
  # No weights (the config default ""): no Inception metrics and no error.
  out = str(tmp_path / "c")
  m = evaluate.run(family, params, config, str(tmp_path), step=0, out_dir=out)
  assert not {"fid", "sfid", "is", "precision"} & set(m) and "heldout_mse" in m
  assert "inception" not in _read(out) and os.path.exists(os.path.join(out, "samples.npz"))


@pytest.mark.slow  # ~40 s on 2 cores (Inception over the reference twice)
def test_eval_split_reference_is_computed_once_and_cached(
  generator, weights_path, tmp_path, monkeypatch
):
  family, params, _ = generator
  monkeypatch.setattr(fid, "REFERENCE_MAX_IMAGES", 12)
  config = _config(**{"eval.inception_weights": weights_path})  # the config field works too
  m = evaluate.run(family, params, config, str(tmp_path), step=0, out_dir=str(tmp_path / "a"))
  rec = _read(str(tmp_path / "a"))["inception"]
  assert rec["reference_images"] == 12 and os.path.exists(rec["reference_cache"])
  assert rec["reference_cache"].startswith(str(tmp_path / "cache"))
  real = data.load_images(config.data, config.data.eval_split, 12)[0]
  f_real = inc.inception_features(real, weights_path, batch_size=8)
  f_fake = inc.inception_features(_samples(family, params, config), weights_path, batch_size=8)
  assert m["fid"] == pytest.approx(
    em.frechet_distance_to_stats(f_fake["pool"], *em.feature_stats(f_real["pool"])), rel=1e-6
  )
  assert m["sfid"] == pytest.approx(
    em.frechet_distance_to_stats(f_fake["spatial"], *em.feature_stats(f_real["spatial"])),
    rel=1e-6,
  )
  p, r = em.precision_recall(f_real["pool"], f_fake["pool"], k=3)
  assert (m["precision"], m["recall"]) == (p, r)

  def no_reload(*a, **k):
    raise AssertionError("the cached reference statistics were recomputed")

  monkeypatch.setattr(data, "load_images", no_reload)
  m2 = evaluate.run(family, params, config, str(tmp_path), step=0, out_dir=str(tmp_path / "b"))
  assert m2["fid"] == m["fid"]
  # Other weights -> another fingerprint -> another cache entry (stale stats are never reused).
  inc.save_converted(inc.random_variables(1), str(tmp_path / "w1.npz"))
  monkeypatch.undo()
  monkeypatch.setattr(fid, "REFERENCE_MAX_IMAGES", 12)
  evaluate.run(
    family,
    params,
    config,
    str(tmp_path),
    step=0,
    out_dir=str(tmp_path / "c"),
    inception_weights=str(tmp_path / "w1.npz"),
  )
  assert _read(str(tmp_path / "c"))["inception"]["reference_cache"] != rec["reference_cache"]


# --- tokenizers ----------------------------------------------------------------------------------
def test_tokenizer_rfid(weights_path, tmp_path):
  config = _config(**{"data.image_size": 16})  # SSIM's window is 11 pixels
  family = ToyTokenizer(config)
  perfect = family.init(None, None)
  m = evaluate.run(
    family,
    perfect,
    config,
    str(tmp_path),
    step=0,
    out_dir=str(tmp_path / "a"),
    inception_weights=weights_path,
  )
  assert abs(m["rfid"]) < 1e-2 and m["psnr"] > 60
  m2 = evaluate.run(
    family,
    {"gain": jnp.asarray(0.3)},
    config,
    str(tmp_path),
    step=0,
    out_dir=str(tmp_path / "b"),
    inception_weights=weights_path,
  )
  assert m2["rfid"] > 1.0 and m2["rfid"] > 100 * abs(m["rfid"])
  real = data.load_images(config.data, config.data.eval_split, 8)[0]
  f_real = inc.inception_features(real, weights_path, batch_size=8)["pool"]
  recon = np.clip(np.round((real / 127.5 - 1.0) * 0.3 * 127.5 + 127.5), 0, 255).astype(np.uint8)
  f_recon = inc.inception_features(recon, weights_path, batch_size=8)["pool"]
  assert m2["rfid"] == pytest.approx(
    em.frechet_distance_to_stats(f_recon, *em.feature_stats(f_real)), rel=1e-3
  )
  rec = _read(str(tmp_path / "b"))["inception"]
  assert rec["num_images"] == 8 and "originals" in rec["reference"]


# --- choosing the evaluator ----------------------------------------------------------------------
def test_evaluator_by_kind_or_named_in_config(tmp_path):
  config = _config(**{"data.image_size": 16})
  family = ToyTokenizer(config)
  params = family.init(None, None)
  by_kind = evaluate.run(family, params, config, str(tmp_path), step=0, out_dir=str(tmp_path / "a"))
  assert by_kind["psnr"] > 60 and os.path.exists(tmp_path / "a" / "reconstructions.png")
  named = _config(**{"data.image_size": 16, "eval.evaluator": "arvision.evaluation.tokenizer"})
  assert evaluate.run(family, params, named, str(tmp_path), step=0) == by_kind
  # A generator evaluated as a classifier: the named evaluator runs, not the kind's.
  gen = ToyGenerator(_config(**{"eval.evaluator": "classifier"}))
  with pytest.raises(AttributeError, match="features"):
    evaluate.run(gen, gen.init(jax.random.key(0), None), gen.config, str(tmp_path), step=0)
  for name, match in (("nope", "accepted"), ("arvision.evaluation.metrics", "no `Evaluator`")):
    with pytest.raises(ValueError, match=match):
      evaluate.run(family, params, _config(**{"eval.evaluator": name}), str(tmp_path), step=0)


# --- domain metrics --------------------------------------------------------------------------------
def test_domain_metrics_are_declared_by_the_data_config():
  fmnist = config_util.base_config("toy").data  # the defaults: fashion_mnist 32x32x1, "auto"
  assert fmnist.domain_metrics == "auto" and domain_classifiers.resolve(fmnist) == "fmnist"
  other = _config(**{"data.source": "fashion_mnist", "data.image_size": 28}).data
  assert domain_classifiers.resolve(other) is None  # no shipped classifier sees 28x28 images
  off = _config(
    **{"data.source": "fashion_mnist", "data.image_size": 32}
  ).data.copy_and_resolve_references()
  off.domain_metrics = ""
  assert domain_classifiers.resolve(off) is None
  with pytest.raises(ValueError, match=r"domain_metrics='fmnist' scores source 'fashion_mnist'"):
    domain_classifiers.resolve(_config(**{"data.domain_metrics": "fmnist"}).data)
  with pytest.raises(ValueError, match="accepted"):
    domain_classifiers.resolve(_config(**{"data.domain_metrics": "imagenet"}).data)
  # Runs saved before the field existed resolve as "auto".
  old = config_util.from_json(json.dumps({k: v for k, v in fmnist.to_dict().items()
                                          if k != "domain_metrics"}))  # fmt: skip
  assert domain_classifiers.resolve(old) == "fmnist"


def test_shipped_domain_classifier_loads_and_eval_never_trains(tmp_path, monkeypatch):
  family, params, config = domain_classifiers.load("fmnist")  # the packaged weights still fit
  assert family.kind == "classifier" and config.family == "classifier"
  x = np.zeros((2, 32, 32, 1), np.float32)
  assert family.features(params, x)[1].shape == (2, 10)
  stale = dict(domain_classifiers.SHIPPED)
  stale["fmnist"] = domain_classifiers.ShippedClassifier(
    config="classifier.py:fmnist", weights=str(tmp_path / "absent.npz")
  )
  monkeypatch.setattr(domain_classifiers, "SHIPPED", stale)
  workdir = domain_classifiers.run_dir("fmnist")
  assert workdir.startswith(str(tmp_path / "cache"))  # $ARVISION_CACHE
  with pytest.raises(domain_classifiers.DomainClassifierMissingError) as e:
    domain_classifiers.load("fmnist")
  assert f"arvision train --config configs/classifier.py:fmnist --workdir {workdir}" in str(e.value)
  assert not os.path.exists(workdir)  # nothing was trained


# --- sharded sampling ----------------------------------------------------------------------------
_SHARDED = textwrap.dedent("""
  import jax, numpy as np
  from arvision import config_util, data, families, parallel
  from arvision.evaluation import generator as gen_eval
  assert jax.device_count() == 4, jax.devices()
  c = config_util.load_config_file("var.py:smoke")
  tok = families.build(c.tokenizer.config)
  tok_params = tok.init(jax.random.key(0), data.input_spec(c.tokenizer.config.data, 4))
  fam = families.build(c, tokenizer=tok)
  params = {**fam.init(jax.random.key(1), None), "tokenizer": tok_params}
  labels = gen_eval.balanced_labels(10, c.data.num_classes)  # 2 batches of 8, the last padded
  kw = fam.sample_defaults()
  mesh4 = parallel.make_mesh(c.mesh)
  assert mesh4.shape["data"] == 4
  a = gen_eval.generate(fam, params, labels, 8, seed=5, mesh=mesh4, **kw)
  b = gen_eval.generate(fam, params, labels, 8, seed=5,
                         mesh=parallel.make_mesh(c.mesh, jax.devices()[:1]), **kw)
  c2 = gen_eval.generate(fam, params, labels, 8, seed=6, mesh=mesh4, **kw)
  np.savez(__import__("sys").argv[1], a=a, b=b, c=c2)
""")


@pytest.mark.slow  # 42 s; sharded training agreement stays in test_sharding
def test_sharded_sampling_matches_one_device(tmp_path):
  out = str(tmp_path / "imgs.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDED, out],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as f:
    a, b, c = f["a"], f["b"], f["c"]
  assert a.shape == (10, 16, 16, 1) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)  # 4 shards == 1 device, same seed
  assert (a != c).mean() > 0.1  # and the seed matters (the comparison can fail)
  assert a.std() > 1.0

"""Tests for the FID Inception-v3 port (`arvision.evaluation.inception`).

The parity tests build torch-fidelity's `FeatureExtractorInceptionV3` with seeded random weights
(its package `__init__` imports torchvision, so the package module is stubbed and the download is
disabled, see docs in shared/reference/offline-data-and-eval.md §2) and compare against it. They
skip without torch / torch-fidelity (`pip install --no-deps torch-fidelity==0.4.0`).
"""

import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.evaluation import inception as inc


def _random_variables(seed=0):
  return jax.tree.map(jnp.asarray, inc.random_variables(seed))


def _to_torch_layout(variables):
  """The inverse map, written independently of the module: flax tree -> torchvision names."""
  out = {}
  for key, a in inc._flatten(variables).items():
    a = np.asarray(a)
    collection, *path, leaf = key.split("/")
    if key == "params/fc":
      out["fc.weight"] = a.T
      continue
    mod = ".".join(path)
    if leaf == "kernel":
      out[f"{mod}.weight"] = a.transpose(3, 2, 0, 1)
    elif leaf == "scale":
      out[f"{mod}.weight"] = a
    elif leaf == "bias":
      out[f"{mod}.bias"] = a
    else:
      out[f"{mod}.running_{leaf}"] = a
  return out


def _assert_trees_equal(a, b):
  fa, fb = inc._flatten(a), inc._flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope="module")
def variables():
  return _random_variables(0)


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(1).randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Without torch


def test_expected_variables_match_the_torch_module_size():
  shapes = inc._expected_shapes()
  # torch-fidelity: 94 conv weights + 94 x 4 BN tensors + fc.weight (+ fc.bias, 94 counters).
  assert len(shapes) == 94 + 94 * 4 + 1
  assert shapes["params/fc"] == (2048, 1008)
  assert shapes["params/Mixed_6d/branch1x1/conv/kernel"] == (1, 1, 768, 192)
  assert shapes["params/Mixed_7c/branch3x3dbl_3b/conv/kernel"] == (3, 1, 384, 384)


def test_output_shapes_batching_and_gray(variables, images):
  f3 = inc.inception_features(images, weights=variables, batch_size=2)  # tail padded 1 -> 2
  assert {k: v.shape for k, v in f3.items()} == {
    "pool": (3, 2048),
    "spatial": (3, 2023),
    "logits": (3, 1008),
  }
  for k, v in f3.items():
    assert v.dtype == np.float32 and np.all(np.isfinite(v)), k
  # Post-ReLU features: non-negative, and not all zero.
  assert f3["pool"].min() >= 0 and f3["spatial"].min() >= 0 and f3["pool"].max() > 0
  np.testing.assert_allclose(
    f3["logits"], f3["pool"] @ np.asarray(variables["params"]["fc"]), rtol=1e-4, atol=1e-4
  )
  # The padded tail neither leaks into nor reorders the results.
  f2 = inc.inception_features(images[1:], weights=variables, batch_size=2)
  for k in f3:
    np.testing.assert_allclose(f3[k][1:], f2[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert not np.allclose(f3["pool"][0], f3["pool"][1])
  # A gray image is its RGB repeat.
  gray = images[:2, :, :, :1]
  fg = inc.inception_features(gray, weights=variables, batch_size=2)
  fr = inc.inception_features(np.repeat(gray, 3, axis=-1), weights=variables, batch_size=2)
  np.testing.assert_array_equal(fg["pool"], fr["pool"])


def test_bad_inputs_name_the_field(variables, images):
  with pytest.raises(ValueError, match="uint8"):
    inc.inception_features(images.astype(np.float32), weights=variables)
  with pytest.raises(ValueError, match="NHWC"):
    inc.inception_features(images[..., :2], weights=variables)
  with pytest.raises(ValueError, match="batch_size"):
    inc.inception_features(images, weights=variables, batch_size=0)


def test_missing_weights_error_says_where_to_get_them(images, tmp_path):
  with pytest.raises(ValueError) as e:
    inc.inception_features(images, weights=None)
  msg = str(e.value)
  assert "weights=None" in msg
  assert "pt_inception-2015-12-05-6726825d.pth" in msg
  assert "weights-inception-2015-12-05-6726825d.pth" in msg
  assert "offline" in msg
  with pytest.raises(FileNotFoundError, match="pt_inception"):
    inc.load_weights(tmp_path / "nope.pth")


def test_npz_round_trip_and_validation(variables, tmp_path):
  path = tmp_path / "inception.npz"
  inc.save_converted(variables, path)
  _assert_trees_equal(inc.load_weights(path), variables)
  # A tampered file: missing key, wrong shape, foreign npz.
  with np.load(path) as data:
    flat = {k: data[k] for k in data.files}
  key = "params/Mixed_6d/branch1x1/conv/kernel"
  broken = dict(flat)
  del broken[key]
  np.savez(tmp_path / "missing.npz", **broken)
  with pytest.raises(ValueError, match="Mixed_6d/branch1x1/conv/kernel"):
    inc.load_weights(tmp_path / "missing.npz")
  broken = dict(flat)
  broken[key] = flat[key][..., :7]
  np.savez(tmp_path / "shape.npz", **broken)
  with pytest.raises(ValueError, match=r"Mixed_6d/branch1x1/conv/kernel.*\(1, 1, 768, 7\)"):
    inc.load_weights(tmp_path / "shape.npz")
  np.savez(tmp_path / "foreign.npz", w=np.zeros(3))
  with pytest.raises(ValueError, match="__format__"):
    inc.load_weights(tmp_path / "foreign.npz")


def test_from_torch_state_dict_layouts_and_errors(variables):
  sd = _to_torch_layout(variables)
  assert len(sd) == 471
  # As pytorch-fid's / a live module's state dict: counters, the fc bias, a DataParallel prefix.
  full = {f"module.{k}": v for k, v in sd.items()}
  full["module.fc.bias"] = np.zeros(1008, np.float32)
  full["module.Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
  _assert_trees_equal(inc.from_torch_state_dict(full), variables)
  _assert_trees_equal(inc.from_torch_state_dict(sd), variables)

  missing = dict(sd)
  del missing["Mixed_6e.branch7x7dbl_3.bn.running_var"]
  with pytest.raises(ValueError, match=r"missing.*Mixed_6e\.branch7x7dbl_3\.bn\.running_var"):
    inc.from_torch_state_dict(missing)
  unknown = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(ValueError, match=r"unknown.*AuxLogits\.fc\.weight"):
    inc.from_torch_state_dict(unknown)
  bad = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(1000, 2048\).*\(1008, 2048\)"):
    inc.from_torch_state_dict(bad)


def test_resize_tf1_known_values():
  # TF1 align_corners=False: source = dest * in / out, no half-pixel shift, edge clamped.
  x = jnp.asarray([[0.0, 10.0], [20.0, 30.0]]).reshape(1, 2, 2, 1)
  y = np.asarray(inc.resize_bilinear_tf1(x, (4, 4)))[0, :, :, 0]
  np.testing.assert_allclose(y[0], [0, 5, 10, 10])
  np.testing.assert_allclose(y[:, 0], [0, 10, 20, 20])
  np.testing.assert_allclose(y[1, 1], 15.0)
  # Downsampling 4 -> 2 picks source rows/cols 0 and 2 exactly.
  z = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(
    np.asarray(inc.resize_bilinear_tf1(z, (2, 2)))[0, :, :, 0], [[0, 2], [8, 10]]
  )
  # Preprocessing maps 0 -> -1 and 255 -> 127/128, at 299x299.
  p = np.asarray(inc.preprocess(jnp.asarray([[[[0, 255, 128]]]], jnp.uint8)))
  assert p.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(p[0, 0, 0], [-1.0, 127 / 128, 0.0])


# ------------------------------------------------------------------------------------------------
# Against torch-fidelity (CI installs torch)


def _torch_fidelity_modules():
  pytest.importorskip("torch")
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity not installed (pip install --no-deps torch-fidelity==0.4.0)")
  stubbed = "torch_fidelity" not in sys.modules
  if stubbed:
    # The package __init__ imports torchvision; only the extractor file is needed.
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
  try:
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    import torch_fidelity.interpolate_compat_tensorflow as ic
  finally:
    if stubbed:
      for name in [
        n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")
      ]:
        del sys.modules[name]
  return fe, ic


@pytest.fixture(scope="module")
def torch_ref(tmp_path_factory):
  """torch-fidelity's extractor with seeded random weights, saved as a .pth state dict."""
  fe, _ = _torch_fidelity_modules()
  import torch

  fe.load_state_dict_from_url = lambda *a, **k: None  # no download: keep the random init
  orig = torch.nn.Module.load_state_dict
  torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None
  try:
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
  finally:
    torch.nn.Module.load_state_dict = orig
  net.eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    # He-scaled convs and non-trivial BN statistics so every BN term matters.
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g) / 2048**0.5)
    net.fc.bias.copy_(torch.randn(1008, generator=g))
  captured = {}
  # TF mixed_6/conv = Mixed_6d.branch1x1 (ReLU output); torch-fidelity does not expose it.
  net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("s", o))
  path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
  torch.save(net.state_dict(), path)

  def run(images_uint8_NHWC):
    with torch.no_grad():
      pool, logits = net(torch.from_numpy(images_uint8_NHWC).permute(0, 3, 1, 2).contiguous())
    n = images_uint8_NHWC.shape[0]
    spatial = captured["s"].permute(0, 2, 3, 1)[..., :7].reshape(n, -1)
    return {"pool": pool.numpy(), "logits": logits.numpy(), "spatial": spatial.numpy()}

  return path, run, net


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 64, 48), (2, 300, 420)])
def test_resize_matches_torch_fidelity(shape):
  _, ic = _torch_fidelity_modules()
  import torch

  x = np.random.RandomState(2).randint(0, 256, shape + (3,)).astype(np.float32)
  ref = ic.interpolate_bilinear_2d_like_tensorflow1x(
    torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False
  )
  ours = np.asarray(inc.resize_bilinear_tf1(jnp.asarray(x), (299, 299)))
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("hw", [(32, 32), (64, 48)])
def test_parity_with_torch_fidelity(torch_ref, hw):
  path, run, _ = torch_ref
  imgs = np.random.RandomState(hw[0]).randint(0, 256, (2,) + hw + (3,)).astype(np.uint8)
  ours = inc.inception_features(imgs, weights=path, batch_size=2)  # the .pth loader path
  ref = run(imgs)
  for k in ("pool", "logits", "spatial"):
    scale = np.abs(ref[k]).max()
    assert scale > 1.0, k  # the random net is not degenerate
    err = np.abs(ours[k] - ref[k]).max()
    # fp32 through ~95 layers; observed ~1e-6 of the largest value.
    assert err <= 1e-4 * scale, (k, err, scale)


def test_pth_variants_load_the_same(torch_ref, tmp_path):
  import torch

  path, _, net = torch_ref
  base = inc.load_weights(path)
  sd = net.state_dict()
  # torch-fidelity's converter output: no num_batches_tracked; and a DataParallel-wrapped save.
  converter_like = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  torch.save(converter_like, tmp_path / "a.pth")
  torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "b.pth")
  _assert_trees_equal(inc.load_weights(tmp_path / "a.pth"), base)
  _assert_trees_equal(inc.load_weights(tmp_path / "b.pth"), base)
  # Converted once, the .npz loads without torch and equals the .pth.
  inc.save_converted(base, tmp_path / "c.npz")
  _assert_trees_equal(inc.load_weights(tmp_path / "c.npz"), base)

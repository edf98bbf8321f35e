"""Tokenizer autoencoder, losses, metrics, the tokenizer Family and configs/tokenizer.py."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.config_util import load_config_file
from arvision.tokenizers import autoencoder as A
from arvision.tokenizers import losses as L
from arvision.tokenizers import metrics as M
from arvision.tokenizers.family import build

CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tokenizer.py"
)


def _config(variant, **model):
  c = load_config_file(f"{CONFIG}:{variant}")
  with c.unlocked():
    for k, v in model.items():
      c.model[k] = v
  return c


def _paths(tree):
  return {"/".join(k) for k in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))}


def _images(b=4, s=16, c=1, seed=0):
  return jax.random.uniform(jax.random.key(seed), (b, s, s, c), minval=-1.0, maxval=1.0)


def _np_params(fam, seed=0, abstract=None):
  """Torch-default-like random params drawn in numpy: a jitted `init` costs ~20 s of compile here."""
  rng = np.random.RandomState(seed)
  abstract = fam.abstract_params() if abstract is None else abstract

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(s.shape, s.dtype)
    if "bias" in name:
      return np.zeros(s.shape, s.dtype)
    if "embedding" in name:
      return rng.normal(0, 1, s.shape).astype(s.dtype)
    lim = 1 / np.sqrt(np.prod(s.shape[:-1]))
    return rng.uniform(-lim, lim, s.shape).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _module_params(module, *args, seed=0):
  return _np_params(
    None, seed, flax.linen.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
  )


# ----- autoencoder -----------------------------------------------------------------------------------


def test_encoder_decoder_shapes_and_names():
  enc = A.Encoder(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, using_sa=True, fused_qkv=True
  )
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  ve = flax.linen.unbox(jax.eval_shape(enc.init, jax.random.key(0), x))
  assert jax.eval_shape(enc.apply, ve, x).shape == (2, 8, 8, 4)
  pe = _paths(ve["params"])
  for name in (
    "conv_in/kernel",
    "down_0/block_0/norm1/scale",
    "down_0/block_0/conv1/kernel",
    "down_0/downsample/conv/kernel",
    "down_1/block_0/nin_shortcut/kernel",  # 8 -> 16 channels
    "down_1/attn_0/qkv/kernel",  # VAR rule: attention at the last level only
    "mid/block_1/conv2/bias",
    "mid/attn_1/proj_out/kernel",
    "mid/block_2/norm2/bias",
    "norm_out/scale",
    "conv_out/kernel",
  ):
    assert name in pe, name
  assert not any(p.startswith("down_0/attn") or "down_0/block_0/nin_shortcut" in p for p in pe)
  assert not any(p.startswith("down_1/downsample") for p in pe)
  assert ve["params"]["down_1"]["attn_0"]["qkv"]["kernel"].shape == (1, 1, 16, 48)

  dec = A.Decoder(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, out_channels=3, using_sa=False, fused_qkv=False
  )
  z = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  vd = flax.linen.unbox(jax.eval_shape(dec.init, jax.random.key(0), z))
  assert jax.eval_shape(dec.apply, vd, z).shape == (2, 16, 16, 3)
  pd = _paths(vd["params"])
  assert {
    "up_1/block_0/conv1/kernel",
    "up_1/block_1/conv1/kernel",
    "up_1/upsample/conv/kernel",
  } <= pd
  assert {"up_0/block_0/nin_shortcut/kernel", "mid/attn_1/q/kernel", "mid/attn_1/k/kernel"} <= pd
  assert not any("/attn_0/" in p or p.startswith("up_0/upsample") for p in pd)


def test_attn_resolutions_rule():
  # LDM rule: attention where the side is 8 (level 1 of a 16px input), none elsewhere.
  enc = A.Encoder(
    ch=8,
    ch_mult=(1, 1, 1),
    num_res_blocks=1,
    z_channels=4,
    using_sa=False,
    attn_resolutions=(8,),
    mid_attn=False,
    fused_qkv=False,
  )
  p = _paths(
    jax.eval_shape(enc.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32))[
      "params"
    ]
  )
  assert "down_1/attn_0/q/kernel" in p
  assert not any(s.startswith(("down_0/attn", "down_2/attn", "mid/attn")) for s in p)


def test_groupnorm_groups():
  assert A.num_groups(160) == 32 and A.num_groups(16) == 16
  with pytest.raises(ValueError, match="channels=48"):
    A.num_groups(48)


def test_downsample_and_attention_match_torch_formulas():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = _images(2, 6, 8, seed=3)
  xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())

  def w(p):  # HWIO -> OIHW
    return torch.tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()), torch.tensor(
      np.asarray(p["bias"])
    )

  ds = A.Downsample()
  v = {"params": _module_params(ds, x)}
  want = F.conv2d(F.pad(xt, (0, 1, 0, 1)), *w(v["params"]["conv"]), stride=2)
  np.testing.assert_allclose(
    np.asarray(ds.apply(v, x)), want.numpy().transpose(0, 2, 3, 1), atol=1e-5
  )

  attn = A.AttnBlock(fused_qkv=True)
  p = _module_params(attn, x, seed=1)
  # Give the norm non-trivial affine params so the test sees them.
  p = dict(p, norm=dict(scale=p["norm"]["scale"] * 1.5, bias=p["norm"]["bias"] + 0.1))
  h = F.group_norm(
    xt,
    8,
    torch.tensor(np.asarray(p["norm"]["scale"])),
    torch.tensor(np.asarray(p["norm"]["bias"])),
    1e-6,
  )
  B, Cc, H, W = xt.shape
  q, k, vv = F.conv2d(h, *w(p["qkv"])).reshape(B, 3, Cc, H, W).unbind(1)
  att = torch.softmax(
    torch.bmm(q.reshape(B, Cc, -1).permute(0, 2, 1), k.reshape(B, Cc, -1)) * Cc**-0.5, dim=2
  )
  o = torch.bmm(vv.reshape(B, Cc, -1), att.permute(0, 2, 1)).reshape(B, Cc, H, W)
  want = xt + F.conv2d(o, *w(p["proj_out"]))
  got = attn.apply({"params": p}, x)
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_var_vae_has_official_param_count():
  fam = build(_config("var_vae"))
  shapes = fam.abstract_params()["ae"]

  def count(t):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))

  # Counted from FoundationVision/VAR's VQVAE(vocab 4096, z 32, ch 160, share_quant_resi 4).
  assert count(shapes) == 108_948_355
  assert count(shapes["encoder"]) == 44_107_872
  assert count(shapes["decoder"]) == 64_653_923
  assert count(shapes["quantize"]) == 168_064
  assert count(shapes["quant_conv"]) == count(shapes["post_quant_conv"]) == 9_248
  assert shapes["quantize"]["embedding"].shape == (4096, 32)
  assert shapes["decoder"]["up_4"]["attn_2"]["qkv"]["kernel"].shape == (1, 1, 640, 1920)


def test_official_variants_build():
  llama = build(_config("llamagen_vq16")).abstract_params()["ae"]
  assert llama["quantize"]["embedding"].shape == (16384, 8)
  assert llama["quant_conv"]["kernel"].shape == (1, 1, 256, 8)
  assert "q" in llama["encoder"]["mid"]["attn_1"]
  mar = build(_config("mar_kl16"))
  assert mar.scale_factor == pytest.approx(0.2325)
  p = mar.abstract_params()["ae"]
  assert p["quant_conv"]["kernel"].shape == (1, 1, 32, 32)
  assert p["post_quant_conv"]["kernel"].shape == (1, 1, 16, 16)
  assert "attn_0" in p["encoder"]["down_4"] and not any(
    k.startswith("attn") for k in p["decoder"]["up_4"]
  )


# ----- metrics ---------------------------------------------------------------------------------------


def test_psnr_known_mse():
  x = jnp.zeros((2, 8, 8, 1)) - 1.0  # 0 in [0, 1]
  y = x + 2 * jnp.array([0.1, 0.01]).reshape(2, 1, 1, 1)  # [0, 1] errors 0.1 and 0.01
  np.testing.assert_allclose(np.asarray(M.psnr(x, y)), [20.0, 40.0], rtol=1e-5)
  assert float(M.psnr(x, x)[0]) == pytest.approx(100.0)


def _ssim_numpy(x, y):
  """Independent SSIM: explicit 2-D Gaussian window over sliding views, per channel."""
  g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
  w2 = np.outer(g, g) / np.outer(g, g).sum()
  x, y = (x + 1) / 2, (y + 1) / 2
  out = []
  for b in range(x.shape[0]):
    vals = []
    for c in range(x.shape[-1]):
      xv = np.lib.stride_tricks.sliding_window_view(x[b, :, :, c], (11, 11))
      yv = np.lib.stride_tricks.sliding_window_view(y[b, :, :, c], (11, 11))
      mx, my = (xv * w2).sum((-1, -2)), (yv * w2).sum((-1, -2))
      vx = (xv * xv * w2).sum((-1, -2)) - mx**2
      vy = (yv * yv * w2).sum((-1, -2)) - my**2
      cxy = (xv * yv * w2).sum((-1, -2)) - mx * my
      c1, c2 = 0.01**2, 0.03**2
      vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    out.append(np.mean(vals))
  return np.array(out)


def test_ssim():
  x = np.asarray(_images(2, 20, 2, seed=1)) * 0.5
  np.testing.assert_allclose(np.asarray(M.ssim(x, x)), 1.0, atol=1e-5)
  rng = np.random.RandomState(0)
  noisy = [np.clip(x + s * rng.randn(*x.shape), -1, 1) for s in (0.05, 0.2, 0.5)]
  vals = [float(np.mean(M.ssim(x, n))) for n in noisy]
  assert vals[0] > vals[1] > vals[2]
  np.testing.assert_allclose(
    np.asarray(M.ssim(x, noisy[1])), _ssim_numpy(x.astype(np.float64), noisy[1]), atol=1e-4
  )
  try:
    from skimage.metrics import structural_similarity
  except ImportError:
    return
  xs, ns = (x[0] + 1) / 2, (noisy[1][0] + 1) / 2
  want = structural_similarity(
    xs,
    ns,
    channel_axis=-1,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=1.0,
  )
  assert float(M.ssim(x[:1], noisy[1][:1])[0]) == pytest.approx(want, abs=2e-2)


# ----- losses ----------------------------------------------------------------------------------------


def test_gan_terms_route_gradients():
  disc = L.NLayerDiscriminator(ndf=8, n_layers=2)
  real = _images(2, 16, 1, seed=1)
  fake0 = _images(2, 16, 1, seed=2)
  dp = _module_params(disc, real)

  def parts(dp, fake, step):
    return L.gan_losses(disc, dp, real, fake, step, disc_start=5, gan_weight=0.3, disc_weight=1.0)

  @jax.jit
  def grads(dp, fake0):
    g_dp, g_fake = jax.grad(lambda d, f: parts(d, f, 10)[0], argnums=(0, 1))(dp, fake0)
    # The discriminator only sees its hinge loss; the generator only -0.3*mean D(fake).
    d_loss = lambda d: L.hinge_d_loss(
      disc.apply({"params": d}, real), disc.apply({"params": d}, fake0)
    )  # noqa: E731
    want_dp = jax.grad(d_loss)(dp)
    want_fake = jax.grad(lambda f: -0.3 * jnp.mean(disc.apply({"params": dp}, f)))(fake0)
    total3, m3 = parts(dp, fake0, 3)
    g0 = jax.grad(lambda d: parts(d, fake0, 3)[0])(dp)
    return g_dp, g_fake, want_dp, want_fake, total3, m3["gan_on"], g0

  g_dp, g_fake, want_dp, want_fake, total, gan_on, g0 = grads(dp, fake0)
  for a, b in zip(jax.tree.leaves(g_dp), jax.tree.leaves(want_dp), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_fake), np.asarray(want_fake), atol=1e-6)
  # Before disc_start nothing trains.
  assert float(total) == 0.0 and float(gan_on) == 0.0
  assert all(float(jnp.abs(t).max()) == 0.0 for t in jax.tree.leaves(g0))


def test_hinge_and_reconstruction_losses():
  assert float(L.hinge_d_loss(jnp.array([2.0, 0.0]), jnp.array([-2.0, 0.5]))) == pytest.approx(
    0.5 * (0.5 + 0.75)
  )
  tot, m = L.reconstruction_loss(jnp.ones((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)), 0.5, 2.0)
  assert float(tot) == pytest.approx(2.5) and float(m["l1"]) == 1.0


def test_perceptual_slot():
  c = _config("smoke")
  with c.unlocked():
    c.loss.perceptual_weight = 1.0
  with pytest.raises(ValueError, match="perceptual_weight"):
    build(c)
  fam = build(c, perceptual_fn=lambda a, b: jnp.mean(jnp.abs(a - b)) * 0 + 7.0)
  x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
  p = jax.eval_shape(fam.init, jax.random.key(0), {"image": x})
  _, m = jax.eval_shape(lambda p, x: fam.loss(p, {"image": x}, jax.random.key(1), True), p, x)
  assert "perceptual_loss" in m
  assert (
    float(L.perceptual_loss(lambda a, b: jnp.sum(a - b), 0.5, jnp.ones(3), jnp.zeros(3))) == 1.5
  )
  assert L.perceptual_loss(None, 0.0, None, None) is None


# ----- family ----------------------------------------------------------------------------------------
# One jitted function per family computes everything a test looks at: XLA compile time on a shared
# 2-core CPU dominates these tests.


def _everything(fam, p, x):
  recon, codes = fam.reconstruct(p, x)
  out = dict(recon=recon, codes=codes)
  if fam.type != "vq":  # the loss compiles slowly; vq's differs from msvq's only in the quantizer
    out["loss"], out["metrics"] = fam.loss(p, {"image": x, "step": 0}, jax.random.key(1), True)
  if fam.type != "kl":
    idx = fam.encode_idx(p, x)
    out.update(idx=idx, decoded=fam.decode_idx(p, idx))
  else:
    z = fam.encode_latent(p, x)
    out.update(
      mean=jnp.split(fam.encode_f(p, x), 2, axis=-1)[0],
      z=z,
      z_sampled=fam.encode_latent(p, x, jax.random.key(3)),
      decoded=fam.decode_latent(p, z),
    )
  return out


def test_family_api_msvq():
  fam = build(_config("smoke"))
  assert fam.kind == "tokenizer" and fam.patch_nums == (1, 2, 4, 8)
  x = _images(3, 16, 1)
  p = _np_params(fam)
  assert set(p) == {"ae"}
  o = jax.jit(lambda p, x: _everything(fam, p, x))(p, x)
  assert np.isfinite(float(o["loss"]))
  assert {"rec_loss", "quant_loss", "psnr", "usage", "perplexity"} <= set(o["metrics"])
  recon, codes = o["recon"], o["codes"]
  assert recon.shape == x.shape and float(jnp.max(jnp.abs(recon))) <= 1.0
  assert codes.shape == (3, 1 + 4 + 16 + 64) and codes.dtype == jnp.int32
  idx = o["idx"]
  assert [i.shape for i in idx] == [(3, 1), (3, 4), (3, 16), (3, 64)]
  np.testing.assert_array_equal(np.concatenate([np.asarray(i) for i in idx], 1), np.asarray(codes))
  np.testing.assert_allclose(np.asarray(o["decoded"]), np.asarray(recon), atol=1e-5)
  assert jax.eval_shape(fam.idx_to_var_input, p, idx).shape == (3, 84, 8)
  assert fam.codebook(p).shape == (32, 8)
  f_hat, nxt = jax.eval_shape(
    lambda p, f, h: fam.next_input(p, 0, f, h), p, jnp.zeros((3, 8, 8, 8)), jnp.zeros((3, 1, 1, 8))
  )
  assert f_hat.shape == (3, 8, 8, 8) and nxt.shape == (3, 2, 2, 8)
  with pytest.raises(ValueError, match="encode_latent"):
    fam.encode_latent(p, x)


def _small(variant, **model):
  c = _config(variant, ch=8, ch_mult=(1, 2), **model)
  with c.unlocked():
    c.data.image_size = 16
  return c


def test_family_api_vq():
  x = _images(2, 16, 1)
  vq = build(_small("fmnist_vq"))
  p = _np_params(vq)
  o = jax.jit(lambda p, x: _everything(vq, p, x))(p, x)
  assert o["codes"].shape == (2, 64)
  np.testing.assert_array_equal(np.asarray(o["idx"]), np.asarray(o["codes"]))
  np.testing.assert_allclose(np.asarray(o["decoded"]), np.asarray(o["recon"]), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(vq.codebook(p)), axis=-1), 1.0, atol=1e-5)


def test_family_api_kl():
  x = _images(2, 16, 1)
  kl = build(_small("fmnist_kl", scale_factor=0.5))
  p = _np_params(kl)
  o = jax.jit(lambda p, x: _everything(kl, p, x))(p, x)
  assert o["codes"] is None and o["recon"].shape == x.shape
  assert o["z"].shape == (2, 8, 8, 4)
  np.testing.assert_allclose(np.asarray(o["z"]), 0.5 * np.asarray(o["mean"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(o["decoded"]), np.asarray(o["recon"]), atol=1e-5)
  assert not np.allclose(np.asarray(o["z_sampled"]), np.asarray(o["z"]))
  assert float(o["metrics"]["kl"]) >= 0 and "usage" not in o["metrics"]


def test_family_with_gan_params_layout():
  c = _config("smoke")
  with c.unlocked():
    c.loss.gan_weight = 0.1
    c.loss.disc_start = 2
  fam = build(c)
  x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
  p = jax.eval_shape(fam.init, jax.random.key(0), {"image": x})
  assert set(p) == {"ae", "disc"} and "conv_out" in p["disc"]
  _, m = jax.eval_shape(
    lambda p, x: fam.loss(p, {"image": x, "step": 0}, jax.random.key(1), True), p, x
  )
  assert {"g_loss", "d_loss", "gan_on"} <= set(m)


def test_bad_configs():
  with pytest.raises(ValueError, match="model.type"):
    build(_config("smoke", type="rvq"))
  with pytest.raises(ValueError, match="patch_nums"):
    build(_config("smoke", patch_nums=(1, 2, 4)))
  with pytest.raises(ValueError, match="z_channels"):
    build(_config("smoke", z_channels=4))
  with pytest.raises(ValueError, match="variant"):
    load_config_file(f"{CONFIG}:nope")


def test_all_variants_load():
  for v in (
    "fmnist_msvq",
    "fmnist_vq",
    "fmnist_kl",
    "smoke",
    "var_vae",
    "llamagen_vq16",
    "mar_kl16",
  ):
    c = load_config_file(f"{CONFIG}:{v}")
    assert c.family == "tokenizer" and c.model.type in ("msvq", "vq", "kl")
    with pytest.raises(AttributeError):
      c.model.typo = 1  # locked

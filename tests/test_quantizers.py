"""Quantizers: VQ / l2-VQ, VAR's multi-scale residual VQ (with torch parity), the KL Gaussian."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.tokenizers import quantizers as Q
from arvision.tokenizers.metrics import codebook_usage

PN = (1, 2, 3, 5, 8)
C = 4
V = 64


def _msvq(**kw):
  return Q.MultiScaleVQ(
    V, C, patch_nums=PN, share_quant_resi=kw.pop("share_quant_resi", 2), eini=0.0, **kw
  )


def _f(seed=0, b=2):
  return jax.random.normal(jax.random.key(seed), (b, PN[-1], PN[-1], C), jnp.float32)


@pytest.fixture(scope="module")
def msvq():
  m = _msvq()
  params = nn.unbox(m.init(jax.random.key(1), _f())["params"])
  return m, {"params": params}


def test_phi_index_table_matches_official():
  assert Q.phi_index_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3) == Q.VAR_PHI_TABLE
  assert Q.phi_index_table(10, 1) == (0,) * 10
  assert Q.phi_index_table(10, 0) == tuple(range(10))  # non-shared: one phi per scale
  assert Q.phi_index_table(6, 4) == (0, 0, 1, 2, 3, 3)  # by hand: si/5 vs ticks 1/12 + 5k/18
  with pytest.raises(ValueError, match="at least 2 scales"):
    Q.phi_index_table(1, 4)
  with pytest.raises(ValueError, match="share_quant_resi"):
    Q.phi_index_table(10, -1)


def test_phi_param_layout():
  for share, n in ((0, len(PN)), (1, 1), (3, 3)):
    p = nn.unbox(jax.eval_shape(_msvq(share_quant_resi=share).init, jax.random.key(0), _f()))[
      "params"
    ]
    assert sorted(k for k in p if k.startswith("quant_resi_")) == [
      f"quant_resi_{k}" for k in range(n)
    ]
    assert p["quant_resi_0"]["kernel"].shape == (3, 3, C, C)
    assert p["embedding"].shape == (V, C)
  p = jax.eval_shape(_msvq(quant_resi=0.0).init, jax.random.key(0), _f())["params"]
  assert list(p) == ["embedding"]  # phi is the identity: no params


def test_nearest_code_is_l2_argmin():
  z = np.random.RandomState(0).randn(50, 6).astype(np.float32)
  e = np.random.RandomState(1).randn(20, 6).astype(np.float32)
  want = np.argmin(((z[:, None] - e[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(Q.nearest_code(z, e)), want)


def test_residual_error_falls_with_scales(msvq):
  m, v = msvq
  f = _f(3)
  fhats = m.apply(v, f, method="f_to_fhat")
  errs = [float(jnp.mean((fh - f) ** 2)) for fh in fhats]
  assert errs[-1] < 0.5 * errs[0], errs
  assert all(b <= a * 1.05 for a, b in zip(errs, errs[1:], strict=False)), errs
  # The error with all scales is far below the error with no code at all (f_hat = 0).
  assert errs[-1] < 0.5 * float(jnp.mean(f**2))


def test_straight_through_gradient_is_identity(msvq):
  m, v = msvq
  f = _f(4)
  w = jax.random.normal(jax.random.key(5), f.shape)
  g = jax.grad(lambda f: jnp.sum(m.apply(v, f)[0] * w))(f)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6)
  vq = Q.VectorQuantizer(V, C, eini=0.0)
  vv = nn.unbox(vq.init(jax.random.key(0), f))
  g = jax.grad(lambda f: jnp.sum(vq.apply(vv, f)[0] * w))(f)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6)


def test_msvq_output_value_is_fhat_and_loss_formula(msvq):
  m, v = msvq
  f = _f(6)
  out, aux = m.apply(v, f)
  fhats = m.apply(v, f, method="f_to_fhat")
  np.testing.assert_allclose(np.asarray(out), np.asarray(fhats[-1]), atol=1e-5)
  want = np.mean([1.25 * float(jnp.mean((fh - f) ** 2)) for fh in fhats])  # (beta + 1) * MSE
  np.testing.assert_allclose(float(aux["loss"]), want, rtol=1e-5)
  assert aux["codes"].shape == (2, sum(p * p for p in PN)) and aux["codes"].dtype == jnp.int32


def test_msvq_loss_gradients_reach_codebook_and_phi(msvq):
  m, v = msvq
  g = jax.grad(lambda p: m.apply({"params": p}, _f(7))[1]["loss"])(v["params"])
  assert float(jnp.abs(g["embedding"]).sum()) > 0
  assert float(jnp.abs(g["quant_resi_0"]["kernel"]).sum()) > 0


def test_f_to_idx_then_idx_to_fhat_equals_fhat(msvq):
  m, v = msvq
  f = _f(8)
  idx = m.apply(v, f, method="f_to_idx")
  assert [i.shape for i in idx] == [(2, p * p) for p in PN]
  assert all(i.dtype == jnp.int32 for i in idx)
  _, aux = m.apply(v, f)
  np.testing.assert_allclose(
    np.asarray(m.apply(v, idx, method="idx_to_fhat")), np.asarray(aux["f_hat"]), atol=1e-5
  )
  np.testing.assert_array_equal(
    np.concatenate([np.asarray(i) for i in idx], 1), np.asarray(aux["codes"])
  )


def test_idx_to_var_input_matches_step_by_step(msvq):
  m, v = msvq
  f = _f(9)
  idx = m.apply(v, f, method="f_to_idx")
  teacher = m.apply(v, idx, method="idx_to_var_input")
  total = sum(p * p for p in PN)
  assert teacher.shape == (2, total - PN[0] ** 2, C) and teacher.dtype == jnp.float32
  # Only the first SN-1 scales matter.
  np.testing.assert_array_equal(
    np.asarray(m.apply(v, idx[:-1], method="idx_to_var_input")), np.asarray(teacher)
  )
  f_hat = jnp.zeros_like(f)
  outs = []
  for si, pn in enumerate(PN):
    h = m.apply(v, idx[si], method="embed").reshape(2, pn, pn, C)
    f_hat, nxt = m.apply(v, si, f_hat, h, method="next_input")
    if si < len(PN) - 1:
      assert nxt.shape == (2, PN[si + 1], PN[si + 1], C)
      outs.append(nxt.reshape(2, -1, C))
    else:
      assert nxt is None
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(teacher), atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(f_hat), np.asarray(m.apply(v, idx, method="idx_to_fhat")), atol=1e-5
  )


def test_msvq_bad_inputs(msvq):
  m, v = msvq
  with pytest.raises(ValueError, match="patch_nums"):
    m.apply(v, jnp.zeros((1, 6, 6, C)))
  with pytest.raises(ValueError, match="channels"):
    m.apply(v, jnp.zeros((1, 8, 8, C + 1)))
  idx = m.apply(v, _f(), method="f_to_idx")
  with pytest.raises(ValueError, match="scales"):
    m.apply(v, idx[:2], method="idx_to_fhat")


def test_vector_quantizer_plain_and_l2():
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) * 3.0
  vq = Q.VectorQuantizer(32, 8, beta=0.25, eini=0.0)
  v = nn.unbox(vq.init(jax.random.key(1), z))
  zq, aux = vq.apply(v, z)
  e = np.asarray(v["params"]["embedding"])
  zn = np.asarray(z).reshape(-1, 8)
  want_idx = np.argmin(((zn[:, None] - e[None]) ** 2).sum(-1), 1)
  np.testing.assert_array_equal(np.asarray(aux["codes"]).reshape(-1), want_idx)
  np.testing.assert_allclose(np.asarray(zq).reshape(-1, 8), e[want_idx], atol=1e-5)
  mse = np.mean((e[want_idx] - zn) ** 2)
  np.testing.assert_allclose(float(aux["loss"]), 1.25 * mse, rtol=1e-5)
  np.testing.assert_allclose(float(aux["usage"]), len(np.unique(want_idx)) / 32, rtol=1e-6)

  vq2 = Q.VectorQuantizer(32, 8, l2_norm=True)
  v2 = nn.unbox(vq2.init(jax.random.key(1), z))
  zq2, aux2 = vq2.apply(v2, z)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(zq2), axis=-1), 1.0, atol=1e-5)
  en = np.asarray(v2["params"]["embedding"])
  en = en / np.linalg.norm(en, axis=-1, keepdims=True)
  want2 = np.argmax((zn / np.linalg.norm(zn, axis=-1, keepdims=True)) @ en.T, 1)  # cosine lookup
  np.testing.assert_array_equal(np.asarray(aux2["codes"]).reshape(-1), want2)
  np.testing.assert_allclose(np.asarray(vq2.apply(v2, method="codebook")), en, atol=1e-6)
  back = vq2.apply(v2, aux2["codes"], method="idx_to_f")
  np.testing.assert_allclose(np.asarray(back), np.asarray(zq2), atol=1e-5)


def test_codebook_usage_counts():
  out = codebook_usage(jnp.array([[0, 0], [1, 2]]), 8)
  assert float(out["usage"]) == pytest.approx(3 / 8)
  p = np.array([0.5, 0.25, 0.25])
  assert float(out["perplexity"]) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
  out = codebook_usage(jnp.arange(16) % 4, 4)
  assert float(out["usage"]) == 1.0 and float(out["perplexity"]) == pytest.approx(4.0, rel=1e-5)


def test_diagonal_gaussian():
  mom = jax.random.normal(jax.random.key(0), (3, 4, 4, 6))
  dg = Q.DiagonalGaussian()
  z, aux = dg.apply({}, mom, train=True, rngs={"sample": jax.random.key(1)})
  mean, logvar = Q.gaussian_moments(mom)
  assert z.shape == mean.shape == (3, 4, 4, 3)
  assert not np.allclose(np.asarray(z), np.asarray(mean))
  z_eval, _ = dg.apply({}, mom, train=False)
  np.testing.assert_array_equal(np.asarray(z_eval), np.asarray(mean))
  kl = Q.gaussian_kl(mean, logvar)
  assert kl.shape == (3,) and bool(jnp.all(kl >= 0))
  assert float(aux["kl"]) == pytest.approx(float(jnp.mean(kl)), rel=1e-6)
  assert (
    float(jnp.max(jnp.abs(Q.gaussian_kl(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))))) == 0.0
  )
  _, lv = Q.gaussian_moments(
    jnp.concatenate([jnp.zeros((1, 1, 1, 2)), jnp.array([[[[-99.0, 99.0]]]])], -1)
  )
  np.testing.assert_array_equal(np.asarray(lv).reshape(-1), [-30.0, 20.0])


# ----- parity with a torch re-implementation of VAR's formulas ---------------------------------------


def _torch_msvq(f_BCHW, emb, phis, table, patch_nums):
  """VAR's f_to_idxBl_or_fhat / idxBl_to_var_input written from the official formulas, in torch."""
  import torch
  import torch.nn.functional as F

  def phi(si, h):
    w, b = phis[table[si]]
    return h * 0.5 + F.conv2d(h, w, b, padding=1) * 0.5

  B, Cc, H, W = f_BCHW.shape
  SN = len(patch_nums)
  f_rest = f_BCHW.clone()
  f_hat = torch.zeros_like(f_rest)
  idx_list = []
  for si, pn in enumerate(patch_nums):
    z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
    z = z.permute(0, 2, 3, 1).reshape(-1, Cc)
    d = (z * z).sum(1, keepdim=True) + (emb * emb).sum(1)
    d = torch.addmm(d, z, emb.T, alpha=-2, beta=1)
    idx = d.argmin(1)
    h = emb[idx].view(B, pn, pn, Cc).permute(0, 3, 1, 2)
    if si != SN - 1:
      h = F.interpolate(h, size=(H, W), mode="bicubic")
    h = phi(si, h)
    f_hat = f_hat + h
    f_rest = f_rest - h
    idx_list.append(idx.view(B, pn * pn))
  # teacher forcing
  f_hat2 = torch.zeros_like(f_BCHW)
  nxt = []
  for si in range(SN - 1):
    pn = patch_nums[si]
    h = emb[idx_list[si]].transpose(1, 2).reshape(B, Cc, pn, pn)
    f_hat2 = f_hat2 + phi(si, F.interpolate(h, size=(H, W), mode="bicubic"))
    pn_next = patch_nums[si + 1]
    nxt.append(
      F.interpolate(f_hat2, size=(pn_next, pn_next), mode="area").view(B, Cc, -1).transpose(1, 2)
    )
  return idx_list, f_hat, torch.cat(nxt, 1)


def test_msvq_parity_with_torch():
  torch = pytest.importorskip("torch")
  pn = (1, 2, 3, 4, 5, 6, 8, 10)  # non-integer area/bicubic ratios (10->3, 10->4, 10->6, 10->8)
  m = Q.MultiScaleVQ(V, C, patch_nums=pn, share_quant_resi=4, eini=0.0)
  f = jax.random.normal(jax.random.key(11), (2, 10, 10, C))
  v = nn.unbox(m.init(jax.random.key(12), f))
  p = v["params"]
  emb = torch.tensor(np.asarray(p["embedding"]))
  phis = [
    (
      torch.tensor(
        np.asarray(p[f"quant_resi_{k}"]["kernel"]).transpose(3, 2, 0, 1).copy()
      ),  # HWIO->OIHW
      torch.tensor(np.asarray(p[f"quant_resi_{k}"]["bias"])),
    )
    for k in range(4)
  ]
  f_t = torch.tensor(np.asarray(f).transpose(0, 3, 1, 2).copy())
  t_idx, t_fhat, t_teacher = _torch_msvq(f_t, emb, phis, Q.phi_index_table(len(pn), 4), pn)

  idx = m.apply(v, f, method="f_to_idx")
  for a, b in zip(idx, t_idx, strict=True):
    np.testing.assert_array_equal(np.asarray(a), b.numpy())
  _, aux = m.apply(v, f)
  np.testing.assert_allclose(
    np.asarray(aux["f_hat"]), t_fhat.numpy().transpose(0, 2, 3, 1), atol=1e-5
  )
  teacher = m.apply(
    v, [jnp.asarray(i.numpy(), jnp.int32) for i in t_idx], method="idx_to_var_input"
  )
  np.testing.assert_allclose(np.asarray(teacher), t_teacher.numpy(), atol=1e-5)

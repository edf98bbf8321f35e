"""VAR transformer: parameter counts, init, scale causality, loss, training, torch parity."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arvision.models import layers
from arvision.models import var as var_lib
from arvision.ops import masks

# ------------------------------------------------------------------------------------------------
# Parameter counts (abstract: no real init)

OFFICIAL_COUNTS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_param_count_matches_official(depth, var_kit):
  patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  tok = var_kit.FakeMSTokenizer(patch_nums=patch_nums, vocab_size=4096, z_channels=32)
  cfg = var_kit.make_config(depth=depth, width=0, heads=0, num_classes=1000)
  family = var_lib.build(cfg, tokenizer=tok)
  assert family.module.width == 64 * depth and family.module.num_heads == depth
  assert family.seq_len == 680
  n = var_lib.param_count(family.abstract_params())
  assert n == var_lib.official_param_count(depth) == OFFICIAL_COUNTS[depth]


def test_official_count_shared_aln_formula(var_kit):
  # Shared AdaLN swaps per-block ada_lin (6C^2 + 6C) for ada_gss (6C) plus one shared Dense.
  d, C = 4, 256
  diff = var_lib.official_param_count(d) - var_lib.official_param_count(d, shared_aln=True)
  assert diff == d * (6 * C * C) - (6 * C * C + 6 * C)
  tok = var_kit.FakeMSTokenizer(patch_nums=(1, 2, 4), vocab_size=64, z_channels=8)
  fam = var_lib.build(
    var_kit.make_config(depth=d, width=0, heads=0, shared_aln=True), tokenizer=tok
  )
  params = fam.abstract_params()
  assert params["blocks_0"]["ada_gss"].shape == (1, 1, 6, C)
  assert "ada_lin" not in params["blocks_0"] and "shared_ada_lin" in params
  n_ref = var_lib.official_param_count(
    d, vocab_size=64, cvae=8, num_classes=5, patch_nums=(1, 2, 4), shared_aln=True
  )
  assert var_lib.param_count(params) == n_ref


# ------------------------------------------------------------------------------------------------
# Init statistics (official init_weights)


def test_init_statistics(var_kit):
  depth, C, V = 4, 128, 256
  tok = var_kit.FakeMSTokenizer(vocab_size=V)
  fam, _ = var_kit.make_family(tok, depth=depth, width=C, heads=4, alng=1e-3, aln=0.5)
  p = jax.jit(fam.init, static_argnums=1)(jax.random.key(1), None)
  std = math.sqrt(1 / (3 * C))

  def close(x, target, rel=0.06):
    s = float(np.std(np.asarray(x)))
    assert abs(s - target) < rel * target, (s, target)

  close(p["word_embed"]["kernel"], std)
  close(p["class_emb"]["embedding"], std)
  close(p["pos_1LC"], std, rel=0.1)
  close(p["head"]["kernel"], 0.02 * std)
  close(p["head_nm"]["ada_lin"]["kernel"], 0.5 * std)
  for i in range(depth):
    b = p[f"blocks_{i}"]
    close(b["attn"]["mat_qkv"]["kernel"], std)
    close(b["attn"]["proj"]["kernel"], std / math.sqrt(2 * depth))
    close(b["ffn"]["fc1"]["kernel"], std)
    close(b["ffn"]["fc2"]["kernel"], std / math.sqrt(2 * depth))
    ada = np.asarray(b["ada_lin"]["kernel"])
    assert ada.shape == (C, 6 * C)
    close(ada[:, : 2 * C], 1e-3 * std)  # gamma1, gamma2 (torch rows [:2C])
    close(ada[:, 2 * C :], 0.5 * std)
    np.testing.assert_allclose(b["attn"]["scale_mul"], np.full((4,), math.log(4.0)), rtol=1e-6)
    for bias in (
      b["attn"]["q_bias"],
      b["attn"]["v_bias"],
      b["attn"]["proj"]["bias"],
      b["ffn"]["fc2"]["bias"],
      b["ada_lin"]["bias"],
    ):
      assert np.all(np.asarray(bias) == 0)
    assert "bias" not in b["attn"]["mat_qkv"]
  assert np.all(np.asarray(p["head"]["bias"]) == 0)
  # torch trunc_normal_ truncates at absolute +-2: effectively untruncated at these stds.
  assert np.abs(np.asarray(p["word_embed"]["kernel"])).max() > 2.5 * std


def test_drop_path_schedule_is_linear(var_kit):
  fam, _ = var_kit.make_family(depth=4, drop_path_rate=0.3)
  np.testing.assert_allclose(layers.drop_path_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3], atol=1e-12)
  assert fam.module.drop_path_rate == 0.3
  # Official rule when the config leaves it at -1: 0.1 * depth / 24.
  fam2, _ = var_kit.make_family(depth=12, width=64, heads=2, drop_path_rate=-1.0)
  assert fam2.module.drop_path_rate == pytest.approx(0.05)


# ------------------------------------------------------------------------------------------------
# Forward properties


def _teacher(fam, seed, B):
  L1 = fam.seq_len - fam.lengths[0]
  return jax.random.normal(jax.random.key(seed), (B, L1, fam.module.cvae))


def test_forward_shapes_and_dtype(var_kit):
  fam, tok, params, ap = var_kit.setup_var(alng=0.5)
  logits = ap(params, jnp.array([0, 3]), _teacher(fam, 0, 2))
  assert logits.shape == (2, 21, 16) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="teacher input shape"):
    fam.apply(params, jnp.array([0, 3]), jnp.zeros((2, 19, 8)))


def test_scale_causality_gradient(var_kit):
  """d logits(scale k) / d teacher tokens is exactly 0 for later scales and nonzero for <= k."""
  fam, tok, params, ap = var_kit.setup_var(
    alng=0.5
  )  # large gammas: a clear signal through the blocks
  teacher = _teacher(fam, 1, 2)
  labels = jnp.array([1, 4])
  bounds = var_lib.scale_bounds(fam.patch_nums)
  # Teacher token j is sequence position j + first_l.
  seg_of_teacher = np.concatenate([np.full(n, s) for s, n in enumerate(fam.lengths)])[1:]
  w = jax.random.normal(jax.random.key(2), (2, fam.seq_len, 16))

  @jax.jit
  def grads(t):
    def f(t, b, e):
      return jnp.sum(fam.apply(params, labels, t)[:, b:e] * w[:, b:e])

    return [jax.grad(f)(t, b, e) for b, e in bounds]

  all_g = grads(teacher)
  for k in range(len(bounds)):
    g = np.abs(np.asarray(all_g[k])).sum(axis=(0, 2))
    assert np.all(g[seg_of_teacher > k] == 0.0), k
    if k > 0:
      assert np.all(g[seg_of_teacher <= k] > 0), k


def test_cond_drop_replaces_label_with_null(var_kit):
  fam, tok, params, ap = var_kit.setup_var(alng=0.5, cond_drop_rate=1.0)
  t = _teacher(fam, 0, 3)
  dropped = ap(params, jnp.array([0, 1, 2]), t, rng=jax.random.key(0), train=True)
  null = ap(params, jnp.full((3,), 5), t)
  cond = ap(params, jnp.array([0, 1, 2]), t)
  np.testing.assert_allclose(dropped, null, atol=1e-6)
  assert np.abs(np.asarray(cond - null)).max() > 1e-6


def test_drop_path_is_per_sample_and_train_only(var_kit):
  fam, tok, params, ap = var_kit.setup_var(alng=0.5, drop_path_rate=1.0, cond_drop_rate=0.0)
  t = _teacher(fam, 0, 4)
  lab = jnp.array([0, 1, 2, 3])
  # Block 1 has rate 1.0 (linear schedule 0 -> 1): its branches never contribute in training.
  a = ap(params, lab, t, rng=jax.random.key(0), train=True)
  b = ap(params, lab, t, rng=jax.random.key(1), train=True)
  np.testing.assert_allclose(a, b, atol=1e-6)
  params0 = jax.tree_util.tree_map(lambda x: x, params)
  params0["blocks_1"] = jax.tree_util.tree_map(lambda x: x * 0, params["blocks_1"])
  ev = ap(params0, lab, t)
  np.testing.assert_allclose(a, ev, atol=1e-5)
  assert np.abs(np.asarray(ap(params, lab, t) - ev)).max() > 1e-6


def test_drop_path_function():
  x = jnp.ones((1000, 3))
  y = layers.drop_path(x, 0.25, jax.random.key(0), deterministic=False)
  rows = np.asarray(y)[:, 0]
  assert set(np.unique(rows).tolist()) <= {0.0, np.float32(1 / 0.75).item()}
  assert np.all(np.asarray(y) == rows[:, None])  # whole sample kept or dropped
  assert abs((rows == 0).mean() - 0.25) < 0.05
  np.testing.assert_array_equal(layers.drop_path(x, 0.25, None, deterministic=True), x)


# ------------------------------------------------------------------------------------------------
# Loss and training


def test_loss_matches_manual_ce_and_metrics(var_kit):
  fam, tok, params, ap = var_kit.setup_var(alng=0.5)
  batch = {"image": var_kit.random_images(0, 3, tok), "label": jnp.array([0, 1, 2])}
  loss_fn = jax.jit(fam.loss, static_argnames="train")
  loss, m = loss_fn(params, batch, jax.random.key(0), train=False)
  idx = tok.encode_idx(params["tokenizer"], batch["image"])
  logits = ap(params, batch["label"], tok.idx_to_var_input(params["tokenizer"], idx))
  gt = jnp.concatenate(idx, axis=1)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), gt[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(loss, ce.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["loss_s2"], ce[:, 5:].mean(), rtol=1e-6)
  np.testing.assert_allclose(m["acc"], (logits.argmax(-1) == gt).mean(), rtol=1e-6)
  assert {f"loss_s{k}" for k in range(3)} | {f"acc_s{k}" for k in range(3)} <= set(m)
  # Pre-tokenized batches give the same loss.
  loss_t, _ = loss_fn(params, {"tokens": gt, "label": batch["label"]}, jax.random.key(0), False)
  np.testing.assert_allclose(loss_t, loss, rtol=1e-6)


def test_label_smoothing_matches_torch_definition(var_kit):
  _, tok, params, ap = var_kit.setup_var(alng=0.5)
  fam, _ = var_kit.make_family(tok, alng=0.5, label_smoothing=0.1)  # same params, smoothed loss
  batch = {"image": var_kit.random_images(0, 2, tok), "label": jnp.array([0, 1])}
  loss, m = jax.jit(fam.loss, static_argnames="train")(params, batch, jax.random.key(0), False)
  idx = tok.encode_idx(params["tokenizer"], batch["image"])
  logits = ap(params, batch["label"], tok.idx_to_var_input(params["tokenizer"], idx))
  gt = jnp.concatenate(idx, axis=1)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, gt[..., None], axis=-1)[..., 0]
  smooth = 0.9 * nll + 0.1 * (-logp.mean(-1))  # torch: (1 - ls) * nll + ls * mean(-logp)
  np.testing.assert_allclose(loss, smooth.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["ce"], nll.mean(), rtol=1e-5)


def test_build_errors_name_the_problem(var_kit):
  with pytest.raises(ValueError, match="tokenizer"):
    var_lib.build(var_kit.make_config(), tokenizer=None)
  with pytest.raises(ValueError, match="num_heads"):
    var_lib.build(var_kit.make_config(width=30, heads=4), tokenizer=var_kit.FakeMSTokenizer())


# ------------------------------------------------------------------------------------------------
# Torch parity of one block and the head norm (official formulas re-written here in torch)


def _torch_block(x, cond, w, *, C, H, l2, attn_bias, shared_gss=None, eps=1e-6):
  import torch
  import torch.nn.functional as F

  B, L, _ = x.shape
  hd = C // H
  if shared_gss is None:
    ada = F.linear(F.silu(cond), w["ada_w"], w["ada_b"]).view(-1, 1, 6, C)
  else:
    ada = w["ada_gss"] + shared_gss
  gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)

  def ln(t):
    return F.layer_norm(t, (C,), eps=eps)

  h = ln(x).mul(scale1.add(1)).add(shift1)
  bias = torch.cat((w["q_bias"], torch.zeros_like(w["q_bias"]), w["v_bias"]))
  qkv = F.linear(h, w["qkv_w"], bias).view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)
  q, k, v = qkv.unbind(0)
  if l2:
    sm = w["scale_mul"].view(1, H, 1, 1).clamp_max(math.log(100)).exp()
    q = F.normalize(q, dim=-1).mul(sm)
    k = F.normalize(k, dim=-1)
    scale = 1.0
  else:
    scale = 0.25 / math.sqrt(hd)
  att = (q * scale) @ k.transpose(-2, -1) + attn_bias
  o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
  o = F.linear(o, w["proj_w"], w["proj_b"])
  x = x + o * gamma1
  h = ln(x).mul(scale2.add(1)).add(shift2)
  h = F.linear(
    F.gelu(F.linear(h, w["fc1_w"], w["fc1_b"]), approximate="tanh"), w["fc2_w"], w["fc2_b"]
  )
  return x + h * gamma2


def _randomize(tree, seed):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [
      0.3 * jax.random.normal(k, leaf.shape, leaf.dtype)
      for k, leaf in zip(keys, leaves, strict=True)
    ]
  )


@pytest.mark.parametrize("l2,shared", [(True, False), (False, False), (True, True)])
def test_block_parity_with_torch(l2, shared):
  torch = pytest.importorskip("torch")
  B, C, H, D = 2, 32, 4, 24
  lengths = (1, 4, 9)
  L = sum(lengths)
  blk = layers.AdaLNSelfAttn(num_heads=H, attn_l2_norm=l2, shared_aln=shared, attn_impl="xla")
  x = jax.random.normal(jax.random.key(0), (B, L, C))
  cond = (
    jax.random.normal(jax.random.key(1), (B, 1, 6, C))
    if shared
    else jax.random.normal(jax.random.key(1), (B, D))
  )
  mask = masks.scale_causal(lengths)
  p = nn.unbox(blk.init(jax.random.key(2), x, cond, mask=mask)["params"])
  p = _randomize(p, 3)  # nonzero biases/gammas so every term is exercised
  if l2:
    p["attn"]["scale_mul"] = jnp.array([0.5, 1.0, 5.0, 1.5])  # 5.0 > ln 100: clamped
  y, _ = blk.apply({"params": p}, x, cond, mask=mask)

  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)
  w = {
    "q_bias": t(p["attn"]["q_bias"]),
    "v_bias": t(p["attn"]["v_bias"]),
    "qkv_w": t(p["attn"]["mat_qkv"]["kernel"]).T,
    "proj_w": t(p["attn"]["proj"]["kernel"]).T,
    "proj_b": t(p["attn"]["proj"]["bias"]),
    "fc1_w": t(p["ffn"]["fc1"]["kernel"]).T,
    "fc1_b": t(p["ffn"]["fc1"]["bias"]),
    "fc2_w": t(p["ffn"]["fc2"]["kernel"]).T,
    "fc2_b": t(p["ffn"]["fc2"]["bias"]),
  }
  if l2:
    w["scale_mul"] = t(p["attn"]["scale_mul"])
  if shared:
    w["ada_gss"] = t(p["ada_gss"])
  else:
    w["ada_w"], w["ada_b"] = t(p["ada_lin"]["kernel"]).T, t(p["ada_lin"]["bias"])
  lvl = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
  attn_bias = t(np.where(lvl[:, None] >= lvl[None, :], 0.0, -np.inf))[None, None]
  ref = _torch_block(
    t(x),
    None if shared else t(cond),
    w,
    C=C,
    H=H,
    l2=l2,
    attn_bias=attn_bias,
    shared_gss=t(cond) if shared else None,
  )
  np.testing.assert_allclose(np.asarray(y), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_head_norm_parity_with_torch():
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  B, L, C, D = 2, 5, 16, 12
  m = layers.AdaLNBeforeHead()
  x = jax.random.normal(jax.random.key(0), (B, L, C))
  cond = jax.random.normal(jax.random.key(1), (B, D))
  p = _randomize(nn.unbox(m.init(jax.random.key(2), x, cond)["params"]), 4)
  y = m.apply({"params": p}, x, cond)
  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)
  ada = F.linear(F.silu(t(cond)), t(p["ada_lin"]["kernel"]).T, t(p["ada_lin"]["bias"]))
  scale, shift = ada.view(-1, 1, 2, C).unbind(2)
  ref = F.layer_norm(t(x), (C,), eps=1e-6).mul(scale.add(1)).add(shift)
  np.testing.assert_allclose(np.asarray(y), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_full_model_parity_with_torch(var_kit):
  """The whole VAR forward (embeddings, blocks, head) against a torch re-implementation."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  fam, tok, params, ap = var_kit.setup_var(alng=0.5)
  p = _randomize({k: v for k, v in params.items() if k != "tokenizer"}, 7)
  for i in range(2):
    p[f"blocks_{i}"]["attn"]["scale_mul"] = jnp.array([1.0, 2.0])
  labels = jnp.array([0, 5])  # 5 = null class
  teacher = _teacher(fam, 3, 2)
  y = ap({**p, "tokenizer": params["tokenizer"]}, labels, teacher)

  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)
  C, H = 32, 2
  cond = t(p["class_emb"]["embedding"])[torch.tensor(np.asarray(labels))]
  sos = cond.unsqueeze(1) + t(p["pos_start"])
  x = torch.cat(
    [sos, F.linear(t(teacher), t(p["word_embed"]["kernel"]).T, t(p["word_embed"]["bias"]))], dim=1
  )
  lvl = np.concatenate([np.full(n, i) for i, n in enumerate(fam.lengths)])
  x = x + t(p["lvl_embed"]["embedding"])[torch.tensor(lvl)] + t(p["pos_1LC"])
  attn_bias = t(np.where(lvl[:, None] >= lvl[None, :], 0.0, -np.inf))[None, None]
  for i in range(2):
    b = p[f"blocks_{i}"]
    w = {
      "q_bias": t(b["attn"]["q_bias"]),
      "v_bias": t(b["attn"]["v_bias"]),
      "qkv_w": t(b["attn"]["mat_qkv"]["kernel"]).T,
      "proj_w": t(b["attn"]["proj"]["kernel"]).T,
      "proj_b": t(b["attn"]["proj"]["bias"]),
      "fc1_w": t(b["ffn"]["fc1"]["kernel"]).T,
      "fc1_b": t(b["ffn"]["fc1"]["bias"]),
      "fc2_w": t(b["ffn"]["fc2"]["kernel"]).T,
      "fc2_b": t(b["ffn"]["fc2"]["bias"]),
      "scale_mul": t(b["attn"]["scale_mul"]),
      "ada_w": t(b["ada_lin"]["kernel"]).T,
      "ada_b": t(b["ada_lin"]["bias"]),
    }
    x = _torch_block(x, cond, w, C=C, H=H, l2=True, attn_bias=attn_bias)
  ada = F.linear(
    F.silu(cond), t(p["head_nm"]["ada_lin"]["kernel"]).T, t(p["head_nm"]["ada_lin"]["bias"])
  )
  scale, shift = ada.view(-1, 1, 2, C).unbind(2)
  h = F.layer_norm(x, (C,), eps=1e-6).mul(scale.add(1)).add(shift)
  ref = F.linear(h, t(p["head"]["kernel"]).T, t(p["head"]["bias"]))
  np.testing.assert_allclose(np.asarray(y), ref.numpy(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# configs/var.py


def test_configs_official_variants():
  from arvision import config_util, families
  from arvision.optim import decay_mask

  for name, depth in (("d16", 16), ("d30", 30)):
    cfg = config_util.load_config_file(f"var.py:{name}")
    tok = families.build(cfg.tokenizer.config)
    fam = families.build(cfg, tokenizer=tok)
    assert fam.seq_len == 680 and fam.module.width == 64 * depth
    assert fam.module.drop_path_rate == pytest.approx(0.1 * depth / 24)
    assert cfg.optim.lr_scaling == "batch256" and cfg.optim.clip_norm == 2.0
    assert cfg.sample.cfg == 1.5 and cfg.sample.top_k == 900 and cfg.sample.top_p == 0.96
    if name == "d16":
      abstract = fam.abstract_params()
      assert var_lib.param_count(abstract) == OFFICIAL_COUNTS[16]
      mask = decay_mask(abstract, cfg.optim.no_decay)
      assert not mask["pos_1LC"] and not mask["pos_start"]
      assert not mask["lvl_embed"]["embedding"]
      assert not mask["blocks_0"]["attn"]["scale_mul"] and not mask["blocks_0"]["attn"]["q_bias"]
      assert mask["blocks_0"]["attn"]["mat_qkv"]["kernel"] and mask["class_emb"]["embedding"]
      assert mask["blocks_3"]["ada_lin"]["kernel"] and not mask["blocks_3"]["ada_lin"]["bias"]
  d36 = config_util.load_config_file("var.py:d36")
  assert d36.model.shared_aln and d36.model.depth == 36 and d36.data.image_size == 512
  assert tuple(d36.tokenizer.config.model.patch_nums)[-1] == 32
  assert d36.tokenizer.config.data.image_size == 512  # the latent side 32 = 512 / 16
  with pytest.raises(ValueError, match="variant"):
    config_util.load_config_file("var.py:d17")


def test_configs_small_variants_build():
  from arvision import config_util, families

  for name in ("smoke", "fmnist"):
    cfg = config_util.load_config_file(f"var.py:{name}")
    # fmnist uses the tokenizer shipped in the package; smoke trains its own.
    want = {"smoke": "", "fmnist": "shipped:fmnist_msvq"}[name]
    assert cfg.family == "var" and cfg.tokenizer.checkpoint == want
    assert cfg.data.image_size == cfg.tokenizer.config.data.image_size
    fam = families.build(cfg, tokenizer=families.build(cfg.tokenizer.config))
    assert fam.patch_nums == tuple(cfg.tokenizer.config.model.patch_nums)
    assert fam.sample_defaults()["more_smooth"] is False


# ------------------------------------------------------------------------------------------------
# Variant hooks (config.model.*: mask, scales, scale_loss, head, sample_patch_nums)


def test_block_diagonal_mask_sees_own_scale_only(var_kit):
  """With model.mask=block_diagonal, d logits(scale k) / d teacher tokens is nonzero exactly on
  scale k's own inputs (scale 0 has none: it is the class token)."""
  fam, tok, params, _ = var_kit.setup_var(alng=0.5, mask="block_diagonal")
  teacher = _teacher(fam, 1, 2)
  labels = jnp.array([1, 4])
  seg_of_teacher = np.concatenate([np.full(n, s) for s, n in enumerate(fam.lengths)])[1:]
  w = jax.random.normal(jax.random.key(2), (2, fam.seq_len, 16))

  @jax.jit
  def grads(t):
    def f(t, b, e):
      return jnp.sum(fam.apply(params, labels, t)[:, b:e] * w[:, b:e])

    return [jax.grad(f)(t, b, e) for b, e in var_lib.scale_bounds(fam.patch_nums)]

  for k, g in enumerate(grads(teacher)):
    g = np.abs(np.asarray(g)).sum(axis=(0, 2))
    assert np.all(g[seg_of_teacher != k] == 0.0), k
    assert np.all(g[seg_of_teacher == k] > 0), k


@pytest.mark.parametrize(
  "mask,scales", [("block_diagonal", "residual"), ("scale_causal", "independent")]
)
def test_variant_decoding_matches_teacher_forcing(mask, scales, var_kit):
  """Cached (or, block_diagonal, cache-free) decoding of known tokens gives the teacher-forced
  logits of the same model, and the teacher input follows the `scales` strategy."""
  tok = var_kit.FakeIndependentTokenizer() if scales == "independent" else None
  fam, tok, params, ap = var_kit.setup_var(alng=0.5, mask=mask, scales=scales, tok=tok)
  labels = jnp.array([0, 3, 5])
  tp = params["tokenizer"]
  images = var_kit.random_images(4, 3, tok)
  gt = fam.targets(params, {"image": images})
  encode = tok.encode_idx if scales == "residual" else tok.encode_idx_independent
  for a, b in zip(gt, encode(tp, images), strict=True):
    np.testing.assert_array_equal(a, b)
  teacher = fam.scales.teacher(tp, gt, tp["codebook"])
  if scales == "independent":  # scale k + 1 reads scale k's own code map, upsampled
    pn0, pn1 = fam.patch_nums[:2]
    h0 = tp["codebook"][gt[0]].reshape(3, pn0, pn0, -1)
    np.testing.assert_allclose(
      teacher[:, : pn1 * pn1],
      jnp.repeat(jnp.repeat(h0, pn1 // pn0, axis=1), pn1 // pn0, axis=2).reshape(3, -1, 8),
    )
  full = ap(params, labels, teacher)
  kw = dict(cfg=0.0, top_k=0, top_p=0.0, return_logits=True)
  masks_all = [jnp.ones_like(i, bool) for i in gt]
  imgs, idx, logits = fam.sample_tokens(
    params, labels, jax.random.key(0), known_idx=gt, known_mask=masks_all, **kw
  )
  for si, (b, e) in enumerate(var_lib.scale_bounds(fam.patch_nums)):
    np.testing.assert_allclose(logits[si], full[:, b:e], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(idx[si], gt[si])
  if scales == "independent":  # the image is the last scale's code map, decoded
    last = tp["codebook"][gt[-1]].reshape(3, tok.P, tok.P, -1)
    ref = np.round((np.asarray(tok.decode_fhat(tp, last)) + 1) * 127.5)
    np.testing.assert_allclose(np.asarray(imgs, np.float32), ref, atol=1.0)


def test_independent_scales_need_tokenizer_methods(var_kit):
  with pytest.raises(ValueError, match="encode_idx_independent"):
    var_kit.make_family(var_kit.FakeMSTokenizer(), scales="independent")
  with pytest.raises(ValueError, match="model.scales='flex'"):
    var_kit.make_family(scales="flex")
  with pytest.raises(ValueError, match="model.mask='diagonal'"):
    var_kit.make_family(mask="diagonal")


def test_real_tokenizer_independent_scales():
  """The msvq tokenizer's FlexVAR-style methods: per-scale codes of the downsampled latent."""
  from arvision import config_util, families
  from arvision.ops.resize import area
  from arvision.tokenizers import quantizers

  cfg = config_util.load_config_file("tokenizer.py:smoke")
  tok = families.build(cfg)
  tp = jax.jit(tok.init)(jax.random.key(0))
  img = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1), minval=-1, maxval=1)
  idx = tok.encode_idx_independent(tp, img)
  f = tok.encode_f(tp, img)
  for pn, i in zip(tok.patch_nums, idx, strict=True):
    z = area(f, (pn, pn)).reshape(-1, f.shape[-1])
    np.testing.assert_array_equal(i.reshape(-1), quantizers.nearest_code(z, tok.codebook(tp)))
  h = tok.codebook(tp)[idx[1]].reshape(2, 2, 2, -1)
  assert tok.independent_input(tp, h, 4).shape == (2, 4, 4, h.shape[-1])


def test_sample_schedule_hook(var_kit):
  from arvision.models import next_scale

  with pytest.raises(ValueError, match="pos_1LC"):
    var_kit.make_family(sample_patch_nums=(1, 4))
  fam, _ = var_kit.make_family(sample_patch_nums=(1, 2, 4))  # equal to training: fine
  assert fam.sample_patch_nums == (1, 2, 4)
  # A model without per-scale tables may sample another schedule ending at the latent side.
  assert next_scale.check_sample_schedule((1, 2, 4), (1, 4), None, "independent") == (1, 4)
  with pytest.raises(ValueError, match="end at the latent side"):
    next_scale.check_sample_schedule((1, 2, 4), (1, 2), None, "independent")
  with pytest.raises(ValueError, match="model.scales='independent'"):
    next_scale.check_sample_schedule((1, 2, 4), (1, 4), None, "residual")


def test_head_hook(var_kit):
  fam, _ = var_kit.make_family(head="categorical")
  assert set(fam.abstract_params()["head"]) == {"kernel", "bias"}
  with pytest.raises(ValueError, match="model.head='bits'"):
    var_kit.make_family(head="bits")


# diffusion: 37 s on 2 cores, slow; flow covers the continuous-head path in make test.
@pytest.mark.parametrize("head", ["flow", pytest.param("diffusion", marks=pytest.mark.slow)])
def test_continuous_head_trains_and_samples(head, var_kit):
  """FlowAR-style: a continuous head models each token's code vector given the hidden state;
  sampling feeds the sampled vectors to the scale inputs and reports their nearest codes."""
  fam, tok = var_kit.make_family(alng=0.5, head=head, head_width=16, head_steps=4)
  params = var_kit.make_params(fam, tok)
  assert "net" in params["head"] and "kernel" not in params["head"]
  batch = {"image": var_kit.random_images(0, 4, tok), "label": jnp.array([0, 1, 2, 3])}
  trainable = {k: v for k, v in params.items() if k != "tokenizer"}
  opt = optax.adam(3e-3)
  state = opt.init(trainable)

  def loss_of(tp, rng):
    return fam.loss({**tp, "tokenizer": params["tokenizer"]}, batch, rng, True)[0]

  @jax.jit
  def step(tp, state, rng):
    loss, g = jax.value_and_grad(loss_of)(tp, rng)
    upd, state = opt.update(g, state, tp)
    return optax.apply_updates(tp, upd), state, loss

  # The same fixed noise before and after (the loss is a Monte-Carlo estimate).
  probe = jax.jit(
    lambda tp: jnp.mean(jnp.stack([loss_of(tp, jax.random.key(i)) for i in range(4)]))
  )
  first = float(probe(trainable))
  for i in range(15):
    trainable, state, _ = step(trainable, state, jax.random.key(100 + i))
  last = float(probe(trainable))
  assert np.isfinite(last) and last < first, (first, last)
  params = {**trainable, "tokenizer": params["tokenizer"]}
  labels = jnp.array([1, 2])
  img, idx, logits = fam.sample_tokens(params, labels, jax.random.key(0), cfg=1.5)
  img2, idx2, _ = fam.sample_tokens(params, labels, jax.random.key(0), cfg=1.5)
  np.testing.assert_array_equal(img, img2)
  assert logits is None and img.dtype == jnp.uint8 and img.shape == (2, 8, 8, 1)
  for si, i in enumerate(idx):
    assert i.shape == (2, fam.lengths[si]) and np.all((np.asarray(i) >= 0) & (np.asarray(i) < 16))
  gt = tok.encode_idx(params["tokenizer"], var_kit.random_images(1, 2, tok))
  km = [jnp.ones_like(i, bool) for i in gt]
  _, kidx, _ = fam.sample_tokens(params, labels, jax.random.key(0), known_idx=gt, known_mask=km)
  for a, b in zip(kidx, gt, strict=True):
    np.testing.assert_array_equal(a, b)


def test_lognormal_scale_loss(var_kit):
  _, tok, params, ap = var_kit.setup_var(alng=0.5)
  fam, _ = var_kit.make_family(tok, alng=0.5, scale_loss="lognormal", scale_loss_mu=0.5)
  batch = {"image": var_kit.random_images(0, 3, tok), "label": jnp.array([0, 1, 2])}
  loss, m = jax.jit(fam.loss, static_argnames="train")(params, batch, jax.random.key(0), False)
  idx = tok.encode_idx(params["tokenizer"], batch["image"])
  logits = ap(params, batch["label"], tok.idx_to_var_input(params["tokenizer"], idx))
  gt = jnp.concatenate(idx, axis=1)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), gt[..., None], axis=-1)[..., 0]
  # HMAR's `lognorm` (official Trainer.norm_dist_equivalent), shifted by mu = 0.5: a normal
  # density at the standardised side ratios, sides reversed (scale 0 gets the largest side's z).
  r = np.asarray(fam.patch_nums, np.float64) / fam.patch_nums[-1]
  z = (r[::-1] - r.mean()) / np.std(r, ddof=1)
  pdf = np.exp(-((z - 0.5) ** 2) / 2)
  w = pdf / pdf.sum()
  per_scale = [ce[:, b:e].mean(axis=1) for b, e in var_lib.scale_bounds(fam.patch_nums)]
  expected = np.mean(sum(wk * c for wk, c in zip(w, per_scale, strict=True)))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(m["ce"], ce.mean(), rtol=1e-6)


def test_cfg_schedule_hook(var_kit):
  fam, tok, params, _ = var_kit.setup_var(alng=0.5)
  labels = jnp.array([1, 2])
  kw = dict(cfg=2.0, top_k=1, top_p=0.0, return_logits=True)
  _, _, lin = fam.sample_tokens(params, labels, jax.random.key(0), **kw)
  # Official linear schedule written as one scale per scale: s = 1 + cfg * si / (n - 1).
  _, _, lst = fam.sample_tokens(params, labels, jax.random.key(0), cfg_schedule=(1, 2, 3), **kw)
  for a, b in zip(lin, lst, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  _, _, const = fam.sample_tokens(params, labels, jax.random.key(0), cfg_schedule="constant", **kw)
  assert np.abs(np.asarray(const[0] - lin[0])).max() > 1e-4  # constant guides the first scale
  with pytest.raises(ValueError, match="one scale per step"):
    fam.sample_tokens(params, labels, jax.random.key(0), cfg_schedule=(1, 2), **kw)
  with pytest.raises(ValueError, match="out of range"):
    fam.sample_tokens(params, jnp.array([1, 6]), jax.random.key(0), **kw)

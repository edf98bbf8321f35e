"""MAR: masking schedules, mask-rate law, static-shape encoder, gradients, sampling, a loop run."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from arvision import api, checkpoint, config_util, families, train
from arvision.models import mar as mar_lib

_CACHE = {}


def setup_mar():
  """The smoke family and params, built once per test module (init is slow on a shared CPU)."""
  if "mar" not in _CACHE:
    c = config_util.load_config_file("mar.py:smoke")
    tok = families.build(c.tokenizer.config)
    fam = families.build(c, tokenizer=tok)
    params = {**fam.init(jax.random.key(0), None), "tokenizer": tok.init(jax.random.key(1), None)}
    _CACHE["mar"] = (fam, tok, params)
  return _CACHE["mar"]


def _official_schedule(L, num_iter, seed=0):
  """The official `sample_tokens` loop with real boolean masks (numpy): tokens per step."""
  order = np.random.default_rng(seed).permutation(L)
  mask = np.ones(L, bool)
  counts, mask_lens, predicted = [], [], []
  for step in range(num_iter):
    mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    mask_len = np.floor(L * mask_ratio)
    mask_len = max(1.0, min(mask.sum() - 1.0, mask_len))
    mask_next = np.zeros(L, bool)
    mask_next[order[: int(mask_len)]] = True
    to_pred = mask.copy() if step >= num_iter - 1 else np.logical_xor(mask, mask_next)
    mask = mask_next
    counts.append(int(to_pred.sum()))
    mask_lens.append(mask_len)
    predicted.append(set(np.nonzero(to_pred)[0].tolist()))
  return order, counts, mask_lens, predicted


@pytest.mark.parametrize("L,num_iter", [(64, 16), (256, 64), (256, 256), (16, 16), (4, 3), (9, 1)])
def test_mask_schedule_matches_official_loop(L, num_iter):
  s = mar_lib.mask_schedule(L, num_iter)
  order, counts, mask_lens, predicted = _official_schedule(L, num_iter)
  np.testing.assert_array_equal(s["count"], counts)
  np.testing.assert_array_equal(s["mask_len"], mask_lens)
  assert s["count"].sum() == L and (s["count"] >= 1).all()
  for k in range(num_iter):  # step k predicts order positions [after, masked)
    assert set(order[s["after"][k] : s["masked"][k]].tolist()) == predicted[k]


def test_disa_schedule_is_linear_and_bounded():
  s = mar_lib.disa_steps(64, 50, 5)
  assert s[0] == 50 and s[-1] == 5 and (np.diff(s) <= 0).all()
  np.testing.assert_allclose(s, 50 - 45 * np.arange(64) / 63, atol=0.5)


@pytest.mark.slow  # 32 s; the mask-count tests stay fast
def test_training_mask_rate_law():
  scipy_stats = pytest.importorskip("scipy.stats")
  fam, _, _ = setup_mar()
  L = fam.seq_len
  keys = jax.random.split(jax.random.key(0), 4000)
  rates = np.asarray(jax.vmap(lambda k: mar_lib.truncnorm_mask_rate(k, 0.7))(keys))
  assert rates.min() >= 0.7 and rates.max() <= 1.0
  law = scipy_stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
  assert abs(rates.mean() - law.mean()) < 4 * law.std() / math.sqrt(len(rates))
  assert abs(rates.std() - law.std()) < 0.1 * law.std()
  mask, rate = jax.jit(fam.random_mask, static_argnums=1)(jax.random.key(3), 5)
  n = math.ceil(L * float(rate))
  np.testing.assert_array_equal(np.asarray(mask).sum(1), [n] * 5)
  assert len({tuple(r) for r in np.asarray(mask)}) > 1  # one random order per sample
  assert fam.train_capacity >= fam.buffer_size + L - math.ceil(L * 0.7)


def _cond(fam, params, tokens, mask, labels, capacity):
  var = fam._vars(params)
  cemb = fam.module.apply(var, labels, method=mar_lib.MAR.class_embedding)
  return fam.module.apply(var, tokens, mask, cemb, capacity, method=mar_lib.MAR.cond)


@pytest.mark.slow  # ~46 s on 2 cores (make test was over 20 minutes); make test-slow runs it
def test_padding_changes_nothing():
  """Capacity == the exact kept count (the official gather, no padding) vs padded capacities."""
  fam, _, params = setup_mar()
  B, L, C = 3, fam.seq_len, fam.token_dim
  tokens = jax.random.normal(jax.random.key(1), (B, L, C))
  mask, _ = fam.random_mask(jax.random.key(2), B)
  n_keep = fam.buffer_size + L - int(np.asarray(mask)[0].sum())
  exact = _cond(fam, params, tokens, mask, jnp.arange(B), n_keep)
  for cap in (n_keep + 1, fam.train_capacity, L + fam.buffer_size):
    np.testing.assert_allclose(
      _cond(fam, params, tokens, mask, jnp.arange(B), cap), exact, rtol=2e-5, atol=2e-5
    )


@pytest.mark.slow  # ~70 s on 2 cores (a gradient per token); make test keeps MAR's mask via its loss/sampler tests
def test_encoder_sees_only_unmasked_tokens():
  fam, _, params = setup_mar()
  B, L, C = 2, fam.seq_len, fam.token_dim
  tokens = jax.random.normal(jax.random.key(1), (B, L, C))
  mask, _ = fam.random_mask(jax.random.key(4), B)
  # The head's output layers start at zero (no gradient at all): perturb every head param.
  leaves, tdef = jax.tree.flatten(params["diffloss"])
  keys = jax.random.split(jax.random.key(6), len(leaves))
  noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  var = fam._vars({**params, "diffloss": jax.tree.unflatten(tdef, noisy)})

  def f(inp):  # the targets stay fixed: gradients flow only through the encoder input
    return fam.module.apply(
      var,
      inp,
      mask,
      jnp.arange(B),
      capacity=fam.train_capacity,
      target_BxLxC=tokens,
      rngs={"diffusion": jax.random.key(5)},
    )

  g = np.abs(np.asarray(jax.grad(f)(tokens))).sum(-1)
  m = np.asarray(mask) > 0
  assert (g[m] == 0).all()
  assert (g[~m] > 0).all()


def test_label_null_and_drop_use_fake_latent():
  fam, _, params = setup_mar()
  var = fam._vars(params)
  nc = fam.num_classes
  emb = fam.module.apply(var, jnp.asarray([0, nc]), method=mar_lib.MAR.class_embedding)
  np.testing.assert_array_equal(emb[1], params["fake_latent"][0])
  np.testing.assert_array_equal(emb[0], params["class_emb"]["embedding"][0])
  mod = fam.module.clone(label_drop_prob=1.0)
  dropped = mod.apply(
    var,
    jnp.arange(4),
    True,
    method=mar_lib.MAR.class_embedding,
    rngs={"dropout": jax.random.key(0)},
  )
  np.testing.assert_array_equal(dropped, jnp.broadcast_to(params["fake_latent"], (4, emb.shape[1])))


def test_patchify_matches_official_layout():
  rng = np.random.default_rng(0)
  B, c, h, p = 2, 3, 4, 2
  x_nchw = rng.standard_normal((B, c, h * p, h * p)).astype(np.float32)
  # official: reshape(b, c, h, p, w, p) -> einsum nchpwq->nhwcpq -> (b, h*w, c*p*p)
  ref = np.einsum("nchpwq->nhwcpq", x_nchw.reshape(B, c, h, p, h, p)).reshape(B, h * h, c * p * p)
  out = mar_lib.patchify(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), p)
  np.testing.assert_array_equal(out, ref)
  back = mar_lib.unpatchify(out, p, h, h, c)
  np.testing.assert_array_equal(back, x_nchw.transpose(0, 2, 3, 1))


def test_init_follows_official_rules():
  fam, _, params = setup_mar()
  blk = params["encoder_blocks_0"]
  k = blk["attn"]["qkv"]["kernel"]
  bound = math.sqrt(6.0 / (k.shape[0] + k.shape[1]))  # xavier uniform
  assert float(jnp.abs(k).max()) <= bound and float(jnp.abs(k).max()) > 0.8 * bound
  assert not np.any(blk["attn"]["qkv"]["bias"]) and np.all(blk["norm1"]["scale"] == 1)
  pos = np.asarray(params["encoder_pos_embed_learned"])
  assert pos.shape == (1, fam.seq_len + fam.buffer_size, fam.module.encoder_dim)
  assert abs(pos.std() - 0.02) < 0.004


@pytest.mark.parametrize("variant,millions", [("B", 208), ("L", 479), ("H", 943)])
def test_official_sizes(variant, millions):
  c = config_util.load_config_file(f"mar.py:{variant}")
  fam = families.build(c, tokenizer=families.build(c.tokenizer.config))
  n = mar_lib.param_count(fam.abstract_params())
  m = c.model
  assert n == mar_lib.official_param_count(
    m.encoder_depth, m.encoder_embed_dim, m.diffloss_d, m.diffloss_w
  )
  assert round(n / 1e6) in (millions - 1, millions, millions + 1), n
  assert fam.seq_len == 256 and fam.token_dim == 16
  assert c.tokenizer.config.model.scale_factor == 0.2325


def test_sampling_cfg_one_equals_conditional_and_disa_compiles_once_more():
  # determinism in the rng and no retrace for cfg/temperature are the family contract
  fam, _, params = setup_mar()
  labels = jnp.asarray([0, 1, 2])
  kw = dict(num_iter=3, cfg_schedule="constant", temperature=1.0)
  impl = dict(num_iter=3, cfg_schedule="constant", steps_per_iter=(4, 4, 4))
  one = jnp.float32(1.0)
  _, cond_tok = fam._sample_jit(params, labels, jax.random.key(7), one, one, guided=False, **impl)
  _, guided_tok = fam._sample_jit(params, labels, jax.random.key(7), one, one, guided=True, **impl)
  np.testing.assert_allclose(guided_tok, cond_tok, rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(cond_tok) != 0)  # every token was sampled
  a, _ = fam.sample_tokens(params, labels, jax.random.key(1), cfg=2.0, **kw)
  assert a.dtype == np.uint8 and a.shape == (3, 16, 16, 1)
  n = fam.trace_count
  fam.sample_tokens(
    params,
    labels,
    jax.random.key(1),
    cfg=2.0,
    disa=True,
    disa_min_steps=2,
    num_diffusion_steps=4,
    **kw,
  )
  assert fam.trace_count == n + 1  # DiSA's per-step counts are static: one more compilation


def test_build_errors_name_the_problem():
  c = mlc.ConfigDict(config_util.load_config_file("mar.py:smoke").to_dict())
  tok = families.build(c.tokenizer.config)
  with pytest.raises(ValueError, match="tokenizer"):
    families.build(c)
  c.model.attn_dropout = 0.1
  with pytest.raises(ValueError, match="attn_dropout"):
    families.build(c, tokenizer=tok)
  c.model.attn_dropout = 0.0
  c.model.patch_size = 3
  with pytest.raises(ValueError, match="patch_size"):
    families.build(c, tokenizer=tok)


@pytest.mark.slow  # ~77 s on 2 cores; the loop/load/sample path is covered by the VAR workdir test
def test_smoke_workdir_trains_loads_and_samples(tmp_path):
  wd = str(tmp_path / "mar")
  config = config_util.load_config_file("mar.py:smoke")
  train.train(config, wd)
  assert "tokenizer" in checkpoint.load_params(wd)["frozen"]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses and all(np.isfinite(losses))
  model = api.load(wd)
  imgs = model.sample([0, 1, 2], jax.random.key(0))
  assert imgs.shape == (3, 16, 16, 1) and imgs.dtype == np.uint8
  np.testing.assert_array_equal(imgs, model.sample([0, 1, 2], jax.random.key(0)))

"""Sampling: top-k/top-p (official rule), Gumbel softmax, KV caches, and VAR's jitted sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.sampling import kv_cache, topk

# ------------------------------------------------------------------------------------------------
# Logit filtering


def _official_filter_np(logits, top_k, top_p):
  """numpy re-implementation of the official `sample_with_top_k_top_p_` filtering."""
  logits = np.array(logits, np.float64)
  if top_k > 0:
    kth = np.sort(logits, axis=-1)[..., -top_k][..., None]
    logits[logits < kth] = -np.inf
  if top_p > 0:
    order = np.argsort(logits, axis=-1, kind="stable")
    s = np.take_along_axis(logits, order, axis=-1)
    e = np.exp(s - s.max(-1, keepdims=True))
    remove_sorted = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1) <= (1 - top_p)
    remove_sorted[..., -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    logits[remove] = -np.inf
  return logits


def test_top_k_keeps_exactly_k_largest():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 50))
  out = np.asarray(topk.filter_top_k_top_p(logits, top_k=7, top_p=0.0))
  kept = np.isfinite(out)
  assert np.all(kept.sum(-1) == 7)
  ref_top = np.argsort(np.asarray(logits), axis=-1)[..., -7:]
  assert np.all(np.take_along_axis(kept, ref_top, axis=-1))
  np.testing.assert_array_equal(out[kept], np.asarray(logits)[kept])
  # Disabled and oversized k keep everything.
  for k in (0, 50, 900):
    assert np.all(np.isfinite(np.asarray(topk.filter_top_k_top_p(logits, top_k=k, top_p=0.0))))


def test_top_k_keeps_ties_with_kth():
  logits = jnp.array([[1.0, 3.0, 3.0, 3.0, 0.5]])
  out = np.asarray(topk.filter_top_k_top_p(logits, top_k=2))
  assert np.isfinite(out).sum() == 3  # the official rule removes only values < kth


@pytest.mark.parametrize(
  "top_k,top_p", [(0, 0.5), (0, 0.9), (0, 0.96), (20, 0.8), (5, 0.3), (0, 0.999), (10, 0.0)]
)
def test_top_p_matches_official_rule(top_k, top_p):
  logits = 2.0 * jax.random.normal(jax.random.key(top_k + int(100 * top_p)), (4, 6, 64))
  out = np.asarray(topk.filter_top_k_top_p(logits, top_k=top_k, top_p=top_p))
  ref = _official_filter_np(np.asarray(logits), top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
  np.testing.assert_allclose(out[np.isfinite(out)], ref[np.isfinite(ref)], rtol=1e-6)
  # The kept set is the smallest prefix (by descending prob) whose mass exceeds top_p.
  if top_p > 0 and top_k == 0:
    p = np.asarray(jax.nn.softmax(logits, -1))
    kept_mass = np.where(np.isfinite(out), p, 0).sum(-1)
    assert np.all(kept_mass > top_p - 1e-6)
    smallest_kept = np.where(np.isfinite(out), p, np.inf).min(-1)
    assert np.all(kept_mass - smallest_kept <= top_p + 1e-6)
  assert np.all(np.isfinite(out).sum(-1) >= 1)  # the largest is always kept


def test_sample_top_k_top_p_respects_filter_and_distribution():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  idx, _ = topk.sample_top_k_top_p(jax.random.key(0), jnp.tile(logits, (4000, 1)), top_k=2)
  counts = np.bincount(np.asarray(idx), minlength=4) / 4000
  assert counts[2] == counts[3] == 0
  assert abs(counts[0] - 0.5 / 0.8) < 0.03


def test_gumbel_softmax():
  logits = jnp.array([[0.0, 1.0, 2.0, -jnp.inf]])
  p = np.asarray(topk.gumbel_softmax(jax.random.key(0), logits, tau=0.5))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  assert p[0, 3] == 0.0
  hard = np.asarray(topk.gumbel_softmax(jax.random.key(1), jnp.tile(logits, (64, 1)), tau=1e-3))
  assert np.all(hard.max(-1) > 0.99)


def test_kv_cache_update():
  caches = kv_cache.init_kv_caches(2, 3, 10, 4, 8)
  assert len(caches) == 2 and caches[0][0].shape == (3, 10, 4, 8)
  k = jnp.ones((3, 4, 4, 8))
  ck, cv = kv_cache.update_kv_cache(caches[0], k, 2 * k, 5)
  assert np.all(np.asarray(ck[:, 5:9]) == 1) and np.all(np.asarray(cv[:, 5:9]) == 2)
  assert np.all(np.asarray(ck[:, :5]) == 0) and np.all(np.asarray(ck[:, 9:]) == 0)
  with pytest.raises(ValueError, match="exceed"):
    kv_cache.update_kv_cache(caches[0], k, k, 7)
  with pytest.raises(ValueError, match="num_heads"):
    kv_cache.init_kv_caches(1, 1, 1, 0, 1)


# ------------------------------------------------------------------------------------------------
# VAR's jitted, KV-cached sampler


def _gt_tokens(var_kit, fam, tok, params, B, seed=0):
  return tok.encode_idx(params["tokenizer"], var_kit.random_images(seed, B, tok))


def test_kv_cache_teacher_forcing_reproduces_full_forward(var_kit):
  fam, tok, params, ap = var_kit.setup_var(alng=0.5)
  labels = jnp.array([0, 3, 5])  # 5 = null class
  gt = _gt_tokens(var_kit, fam, tok, params, 3)
  full = ap(params, labels, tok.idx_to_var_input(params["tokenizer"], gt))
  masks_all = [jnp.ones_like(i, bool) for i in gt]
  imgs, idx, logits = fam.sample_tokens(
    params,
    labels,
    jax.random.key(0),
    cfg=0.0,
    top_k=0,
    top_p=0.0,
    known_idx=gt,
    known_mask=masks_all,
    return_logits=True,
  )
  for si, (b, e) in enumerate(
    zip(np.cumsum([0, *fam.lengths[:-1]]), np.cumsum(fam.lengths), strict=True)
  ):
    np.testing.assert_allclose(logits[si], full[:, b:e], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(idx[si], gt[si])
  # Teacher-forced decoding reconstructs the tokenizer's image of those tokens.
  f_hat = jnp.zeros((3, tok.P, tok.P, 8))
  for si, (pn, i) in enumerate(zip(fam.patch_nums, gt, strict=True)):
    f_hat, _ = tok.next_input(
      params["tokenizer"], si, f_hat, params["tokenizer"]["codebook"][i].reshape(3, pn, pn, 8)
    )
  ref = np.round((np.asarray(tok.decode_fhat(params["tokenizer"], f_hat)) + 1) * 127.5)
  np.testing.assert_allclose(np.asarray(imgs, np.float32), ref, atol=1.0)
  assert imgs.dtype == jnp.uint8 and imgs.shape == (3, 8, 8, 1)


def test_cfg_zero_is_the_conditional_path_and_first_scale_unguided(var_kit):
  fam, tok, params, _ = var_kit.setup_var(alng=0.5)
  labels = jnp.array([1, 2])
  gt = _gt_tokens(var_kit, fam, tok, params, 2, seed=1)
  masks_all = [jnp.ones_like(i, bool) for i in gt]
  kw = dict(top_k=0, top_p=0.0, known_idx=gt, known_mask=masks_all, return_logits=True)
  _, _, l0 = fam.sample_tokens(params, labels, jax.random.key(0), cfg=0.0, **kw)
  # Changing the null-class embedding must not change anything at cfg = 0.
  p2 = dict(params)
  p2["class_emb"] = {"embedding": params["class_emb"]["embedding"].at[5].add(1.0)}
  _, _, l0b = fam.sample_tokens(p2, labels, jax.random.key(0), cfg=0.0, **kw)
  _, _, l3 = fam.sample_tokens(p2, labels, jax.random.key(0), cfg=3.0, **kw)
  for a, b in zip(l0, l0b, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(l3[0], l0[0], atol=1e-6)  # the first scale is sampled unguided
  for si in (1, 2):
    assert np.abs(np.asarray(l3[si] - l0[si])).max() > 1e-3
  # Guided logits follow (1 + t) cond - t uncond with t = cfg * si / (n - 1).
  _, _, lu = fam.sample_tokens(p2, jnp.array([5, 5]), jax.random.key(0), cfg=0.0, **kw)
  np.testing.assert_allclose(l3[1], 2.5 * l0[1] - 1.5 * lu[1], atol=1e-4, rtol=1e-4)


def test_sampled_indices_and_greedy_sampling(var_kit):
  """VAR specifics (determinism and no-retrace are the family contract): index shapes and range,
  `sample` is `sample_tokens`' images, and top_k = 1 is greedy whatever the rng."""
  fam, tok = var_kit.make_family(var_kit.FakeMSTokenizer(vocab_size=64), alng=0.5)
  _, _, base, _ = var_kit.setup_var(alng=0.5)
  params = jax.jit(fam.init, static_argnums=1)(jax.random.key(0), None)
  params["tokenizer"] = dict(
    base["tokenizer"], codebook=jax.random.normal(jax.random.key(9), (64, 8))
  )
  labels = jnp.array([0, 1, 2, 3])
  a_img, a_idx, _ = fam.sample_tokens(
    params, labels, jax.random.key(0), cfg=1.5, top_k=30, top_p=0.9
  )
  for si, i in enumerate(a_idx):
    assert i.shape == (4, fam.lengths[si]) and i.dtype == jnp.int32
    assert np.all((np.asarray(i) >= 0) & (np.asarray(i) < 64))
  imgs = fam.sample(params, labels, jax.random.key(0), cfg=1.5, top_k=30, top_p=0.9)
  np.testing.assert_array_equal(imgs, a_img)
  _, g1, _ = fam.sample_tokens(params, labels, jax.random.key(3), cfg=1.5, top_k=1, top_p=0.0)
  _, g2, _ = fam.sample_tokens(params, labels, jax.random.key(4), cfg=1.5, top_k=1, top_p=0.0)
  for x, y in zip(g1, g2, strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("more_smooth", [False, True])
def test_zero_shot_editing_keeps_known_tokens(more_smooth, var_kit):
  fam, tok, params, _ = var_kit.setup_var(alng=0.5)
  labels = jnp.array([0, 4])
  known = _gt_tokens(var_kit, fam, tok, params, 2, seed=5)
  rngs = jax.random.split(jax.random.key(7), len(known))
  kmask = [jax.random.bernoulli(r, 0.5, k.shape) for r, k in zip(rngs, known, strict=True)]
  imgs, idx, _ = fam.sample_tokens(
    params,
    labels,
    jax.random.key(2),
    cfg=1.0,
    top_k=0,
    top_p=0.0,
    more_smooth=more_smooth,
    known_idx=known,
    known_mask=kmask,
  )
  assert imgs.shape == (2, 8, 8, 1) and imgs.dtype == jnp.uint8
  n_free = 0
  for i, k, m in zip(idx, known, kmask, strict=True):
    m = np.asarray(m)
    np.testing.assert_array_equal(np.asarray(i)[m], np.asarray(k)[m])
    n_free += int((~m).sum())
  assert n_free > 0
  with pytest.raises(ValueError, match="together"):
    fam.sample_tokens(params, labels, jax.random.key(2), known_idx=known)
  with pytest.raises(ValueError, match="known_idx"):
    fam.sample_tokens(params, labels, jax.random.key(2), known_idx=known[:2], known_mask=kmask[:2])


@pytest.mark.slow  # ~30 s of CPU: compiles the real conv tokenizer into the loss and the sampler
def test_real_tokenizer_end_to_end():
  """configs/var.py:smoke with the real msvq tokenizer: loss, cached logits, sampling."""
  from arvision import config_util, families

  cfg = config_util.load_config_file("var.py:smoke")
  tok = families.build(cfg.tokenizer.config)
  fam = families.build(cfg, tokenizer=tok)
  params = jax.jit(fam.init, static_argnums=1)(jax.random.key(1), None)
  params["tokenizer"] = jax.jit(tok.init)(jax.random.key(0))
  size, ch = cfg.data.image_size, cfg.data.channels
  images = jax.random.uniform(jax.random.key(2), (2, size, size, ch), minval=-1, maxval=1)
  labels = jnp.array([0, 1])
  loss, metrics = jax.jit(fam.loss, static_argnames="train")(
    params, {"image": images, "label": labels}, jax.random.key(3), True
  )
  V = cfg.tokenizer.config.model.vocab_size
  assert abs(float(loss) - np.log(V)) < 0.1  # near-uniform logits at init (head *= 0.02)
  gt = tok.encode_idx(params["tokenizer"], images)
  full = jax.jit(fam.apply)(params, labels, tok.idx_to_var_input(params["tokenizer"], gt))
  imgs, idx, logits = fam.sample_tokens(
    params,
    labels,
    jax.random.key(0),
    cfg=0.0,
    top_k=0,
    top_p=0.0,
    known_idx=gt,
    known_mask=[jnp.ones_like(g, bool) for g in gt],
    return_logits=True,
  )
  np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full, atol=1e-4, rtol=1e-4)
  rec = np.round((np.asarray(tok.decode_idx(params["tokenizer"], gt)) + 1) * 127.5)
  np.testing.assert_allclose(np.asarray(imgs, np.float32), rec, atol=1.0)
  assert imgs.shape == (2, size, size, ch) and imgs.dtype == jnp.uint8

"""Raster next-token family (LlamaGen): RoPE layout, causality, KV-cache decoding, CFG, loss, loop."""

import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from arvision.models import raster
from arvision.sampling import orders

# ------------------------------------------------------------------------------------------------
# A tiny VQ-like tokenizer: patch means quantised into V bins (fast, deterministic).


class FakeVQ:
  def __init__(self, vocab_size=16, latent_size=4, patch=2, channels=1):
    self.config = mlc.ConfigDict(dict(model=dict(vocab_size=vocab_size)))
    self.latent_size, self.patch, self.channels = latent_size, patch, channels
    self.image_size = latent_size * patch
    self.vocab_size = vocab_size

  def init(self, rng):
    return {"levels": jnp.linspace(-1.0, 1.0, self.vocab_size)}

  def encode_idx(self, p, images):
    B, s, P = images.shape[0], self.latent_size, self.patch
    m = images.reshape(B, s, P, s, P, -1).mean(axis=(2, 4, 5)).reshape(B, s * s)
    return jnp.argmin(jnp.abs(m[..., None] - p["levels"]), axis=-1).astype(jnp.int32)

  def decode_idx(self, p, idx):
    B, s, P = idx.shape[0], self.latent_size, self.patch
    v = p["levels"][idx].reshape(B, s, 1, s, 1, 1)
    return jnp.broadcast_to(v, (B, s, P, s, P, self.channels)).reshape(
      B, self.image_size, self.image_size, self.channels
    )


def make_config(dim=32, n_layer=2, n_head=4, n_kv_head=0, num_classes=5, **kw):
  model = dict(
    dim=dim,
    n_layer=n_layer,
    n_head=n_head,
    n_kv_head=n_kv_head,
    multiple_of=16,
    token_dropout=0.0,
    resid_dropout=0.0,
    ffn_dropout=0.0,
    attn_impl="xla",
  )
  model.update(kw)
  return mlc.ConfigDict(
    dict(family="raster", data=dict(num_classes=num_classes), model=model, sample=dict(cfg=2.0))
  )


_SETUPS = {}


def setup(**kw):
  key = tuple(sorted(kw.items()))
  if key not in _SETUPS:
    tok = FakeVQ()
    fam = raster.build(make_config(**kw), tokenizer=tok)
    p = jax.jit(fam.init, static_argnums=1)(jax.random.key(0), None)
    # the head is zero-initialised: random weights make the logits informative
    p["output"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(1), p["output"]["kernel"].shape)
    params = {**p, "tokenizer": tok.init(None)}
    _SETUPS[key] = (fam, tok, params, jax.jit(fam.apply, static_argnames="train"))
  return _SETUPS[key]


def rand_tokens(seed, B, fam):
  return jax.random.randint(jax.random.key(seed), (B, fam.num_tokens), 0, fam.module.vocab_size)


# ------------------------------------------------------------------------------------------------
# Sizes


def test_ffn_hidden_official_rule():
  for dim, hidden in ((768, 2048), (1024, 2816), (1280, 3584), (1536, 4096), (3200, 8704)):
    assert raster.ffn_hidden(dim) == hidden
  assert raster.ffn_hidden(128, multiple_of=32) == 352
  assert raster.ffn_hidden(768, ffn_dim_multiplier=1.5) == raster.find_multiple(
    int(1.5 * 2048), 256
  )


def test_official_configs_param_counts_and_recipe():
  from arvision import config_util, families
  from arvision.optim import decay_mask

  cfg = config_util.load_config_file("raster.py:B")
  fam = families.build(cfg, tokenizer=families.build(cfg.tokenizer.config))
  abstract = fam.abstract_params()
  C, V, hid = 768, 16384, 2048
  expected = V * C + 1001 * C + 12 * (4 * C * C + 3 * C * hid + 2 * C) + C + C * V
  assert raster.param_count(abstract) == expected == 110_888_448
  assert fam.num_tokens == 256 and fam.sample_defaults()["cfg"] == 2.0
  assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay) == (0.9, 0.95, 0.05)
  assert cfg.optim.clip_norm == 1.0 and cfg.optim.lr == 1e-4 and cfg.optim.schedule == "constant"
  mask = decay_mask(abstract, cfg.optim.no_decay)
  assert mask["tok_embeddings"]["embedding"] and mask["layers_0"]["attention"]["wqkv"]["kernel"]
  assert not mask["layers_0"]["attention_norm"]["scale"] and not mask["norm"]["scale"]
  xl = config_util.load_config_file("raster.py:XL")
  assert xl.data.image_size == 384 and xl.model.dim == 1280 and xl.sample.cfg == 1.75
  assert config_util.load_config_file("raster.py:L,image_size=384").data.image_size == 384
  with pytest.raises(ValueError, match="variant"):
    config_util.load_config_file("raster.py:XS")


def test_init_statistics():
  fam = raster.build(make_config(dim=128, n_head=4), tokenizer=FakeVQ(vocab_size=256))
  p = jax.jit(fam.init, static_argnums=1)(jax.random.key(3), None)
  assert np.all(np.asarray(p["output"]["kernel"]) == 0)
  for x in (p["tok_embeddings"]["embedding"], p["layers_1"]["attention"]["wqkv"]["kernel"]):
    assert abs(float(np.std(x)) - 0.02) < 0.002
  assert p["cls_embedding"]["embedding_table"]["embedding"].shape == (6, 128)
  assert np.all(np.asarray(p["norm"]["scale"]) == 1)


# ------------------------------------------------------------------------------------------------
# 2D RoPE


def test_rope_table_worked_example():
  g, hd, base = 3, 8, 10000.0
  table = raster.rope_2d_table(g, hd, base, prefix=1)
  assert table.shape == (1 + g * g, hd // 2, 2)
  np.testing.assert_array_equal(table[0], 0.0)  # official: zero rows for the class token
  # Independent: pair k < hd/4 turns by row * f_k, pair hd/4 + k by col * f_k, f_k = base^(-4k/hd).
  for r in range(g):
    for c in range(g):
      for k in range(hd // 2):
        f = base ** (-2 * (k % (hd // 4)) / (hd / 2))
        ang = (r if k < hd // 4 else c) * f
        np.testing.assert_allclose(
          table[1 + r * g + c, k], [math.cos(ang), math.sin(ang)], atol=1e-6
        )
  fixed = raster.rope_2d_table(g, hd, base, prefix=2, prefix_rows="identity")
  np.testing.assert_array_equal(fixed[:2, :, 0], 1.0)
  np.testing.assert_array_equal(fixed[:2, :, 1], 0.0)
  np.testing.assert_array_equal(fixed[2:], table[1:])
  with pytest.raises(ValueError, match="divisible by 4"):
    raster.rope_2d_table(3, 6)


def test_apply_rope_is_interleaved_complex_rotation():
  g, hd = 2, 8
  table = raster.rope_2d_table(g, hd)
  x = np.random.default_rng(0).standard_normal((1, 5, 2, hd)).astype(np.float32)
  out = np.asarray(raster.apply_rope(jnp.asarray(x), jnp.asarray(table)))
  z = x[..., 0::2] + 1j * x[..., 1::2]  # pairs (x[2k], x[2k+1])
  rot = table[None, :, None, :, 0] + 1j * table[None, :, None, :, 1]
  ref = np.stack([(z * rot).real, (z * rot).imag], axis=-1).reshape(x.shape)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_array_equal(out[:, 0], 0.0)  # the zeroed prefix row kills q/k there


# ------------------------------------------------------------------------------------------------
# Forward


def test_causality_gradient():
  fam, _, params, _ = setup()
  tokens = rand_tokens(0, 1, fam)
  emb = params["tok_embeddings"]["embedding"][tokens[:, :-1]]
  N = fam.num_tokens

  def logits_from(emb_in):
    h = jnp.concatenate(
      [fam.module.apply(fam._vars(params), jnp.array([1]), method="embed_cond"), emb_in], axis=1
    )
    out, _ = fam.module.apply(
      fam._vars(params),
      h,
      orders.input_rope_rows(fam.order, 1),
      mask=raster.masks.causal(),
      method="run",
    )
    return out

  for i in (0, 5, N - 2):
    g = jax.grad(lambda e, i=i: jnp.sum(logits_from(e)[0, i] ** 2))(emb)
    gn = np.abs(np.asarray(g[0])).sum(-1)  # input token j sits at sequence slot j + 1
    assert np.all(gn[i:] == 0), (i, gn)
    if i > 0:
      assert np.all(gn[:i] > 0)


def test_label_dropout_uses_null_class():
  fam, _, params, ap = setup(cond_drop_rate=1.0)
  tokens = rand_tokens(1, 2, fam)
  train = ap(params, jnp.array([1, 2]), tokens, rng=jax.random.key(0), train=True)
  null = ap(params, jnp.array([5, 5]), tokens)
  np.testing.assert_allclose(train, null, atol=1e-6)


def test_kv_cache_decoding_equals_full_forward_and_cfg_formula():
  fam, _, params, ap = setup(n_kv_head=2)
  B = 2
  labels = jnp.array([0, 3])
  tokens = rand_tokens(2, B, fam)
  known_mask = jnp.ones_like(tokens, bool)
  full_c = np.asarray(ap(params, labels, tokens))
  full_u = np.asarray(ap(params, jnp.full_like(labels, 5), tokens))
  _, codes, lg = fam.sample_tokens(
    params,
    labels,
    jax.random.key(0),
    cfg=1.0,
    known=tokens,
    known_mask=known_mask,
    return_logits=True,
  )
  np.testing.assert_array_equal(codes, tokens)
  np.testing.assert_allclose(lg, full_c, atol=2e-5)
  _, _, lg3 = fam.sample_tokens(
    params,
    labels,
    jax.random.key(0),
    cfg=3.0,
    known=tokens,
    known_mask=known_mask,
    return_logits=True,
  )
  np.testing.assert_allclose(lg3, full_u + 3.0 * (full_c - full_u), atol=1e-4)
  # cfg_interval=2: decode steps i = t - 1 > 2 are unguided (tokens t >= 4); token 0 is guided.
  _, _, lgi = fam.sample_tokens(
    params,
    labels,
    jax.random.key(0),
    cfg=3.0,
    cfg_interval=2,
    known=tokens,
    known_mask=known_mask,
    return_logits=True,
  )
  np.testing.assert_allclose(lgi[:, :4], lg3[:, :4], atol=1e-5)
  np.testing.assert_allclose(lgi[:, 4:], full_c[:, 4:], atol=2e-5)
  assert not np.allclose(lg3[:, 4:], full_c[:, 4:], atol=1e-3)


def test_sample_shapes_and_greedy_is_rng_free():
  # determinism, rng dependence and no retrace are the family contract (test_family_contract.py)
  fam, tok, params, _ = setup()
  labels = jnp.array([0, 1, 2])
  a = fam.sample(params, labels, jax.random.key(0), cfg=2.0, top_k=4)
  assert a.shape == (3, tok.image_size, tok.image_size, 1) and a.dtype == jnp.uint8
  # top_k=1 is greedy: independent of the rng
  _, g1, _ = fam.sample_tokens(params, labels, jax.random.key(5), top_k=1)
  _, g2, _ = fam.sample_tokens(params, labels, jax.random.key(6), top_k=1)
  np.testing.assert_array_equal(g1, g2)


# ------------------------------------------------------------------------------------------------
# Loss


def test_loss_image_and_tokens_paths_agree_and_match_manual_ce():
  fam, tok, params, ap = setup()
  img = jax.random.uniform(jax.random.key(4), (3, 8, 8, 1), minval=-1, maxval=1)
  labels = jnp.array([0, 1, 4])
  codes = tok.encode_idx(params["tokenizer"], img)
  l_img, m_img = fam.loss(params, {"image": img, "label": labels}, None, False)
  l_tok, _ = fam.loss(params, {"tokens": codes, "label": labels}, None, False)
  np.testing.assert_allclose(l_img, l_tok, rtol=1e-6)
  logp = jax.nn.log_softmax(ap(params, labels, codes))
  nll = -jnp.take_along_axis(logp, codes[..., None], axis=-1)
  np.testing.assert_allclose(l_img, nll.mean(), rtol=1e-5)
  assert 0 <= float(m_img["acc"]) <= 1
  with pytest.raises(ValueError, match="tokens"):
    fam.loss(params, {"tokens": codes[:, :5], "label": labels}, None, False)


def test_build_errors():
  with pytest.raises(ValueError, match="tokenizer"):
    raster.build(make_config(), tokenizer=None)
  with pytest.raises(ValueError, match="n_kv_head"):
    raster.build(make_config(n_kv_head=3), tokenizer=FakeVQ())
  with pytest.raises(ValueError, match="order"):
    raster.build(make_config(order="spiral"), tokenizer=FakeVQ())


@pytest.mark.slow  # ~50 s on 2 cores; the loop is covered in make test by tests/test_generator_workdir.py (VAR)
def test_smoke_config_trains_through_the_loop(tmp_path):
  from arvision import api, checkpoint, config_util, train

  config = config_util.load_config_file("raster.py:smoke")
  wd = str(tmp_path / "raster")
  train.train(config, wd)
  assert "tokenizer" in checkpoint.load_params(wd)["frozen"]
  model = api.load(wd)
  imgs = model.sample([0, 1], jax.random.key(0))
  assert imgs.shape == (2, 16, 16, 1) and imgs.dtype == np.uint8
  np.testing.assert_array_equal(imgs, model.sample([0, 1], jax.random.key(0)))


# ------------------------------------------------------------------------------------------------
# Orders, schedules and their masks (arvision/sampling/orders.py)


def test_orders_and_schedules():
  reg = orders.region_order(4, 2)
  assert sorted(reg.tolist()) == list(range(16))
  # the first four tokens are the top-left token of each 2x2 block, block by block
  assert reg[:4].tolist() == [0, 2, 8, 10] and reg[4:8].tolist() == [1, 3, 9, 11]
  assert orders.par_schedule(16, 4) == (1, 1, 1, 1, 4, 4, 4)
  cos = orders.cosine_schedule(64, 8)
  assert sum(cos) == 64 and orders.check_schedule(cos, 64) == cos and max(cos) > 1
  np.testing.assert_array_equal(orders.query_slots((1,) * 5, 1), np.arange(5))
  np.testing.assert_array_equal(orders.query_slots((1, 1, 2), 1), [0, 1, 1, 2])
  assert orders.input_mask((1,) * 5, 1) == raster.masks.causal()
  assert orders.input_mask((1, 1, 2), 1) == raster.masks.scale_causal((1, 1, 1))
  with pytest.raises(ValueError, match="summing to N"):
    orders.check_schedule((1, 2), 4)
  with pytest.raises(ValueError, match="k <= 2"):
    orders.check_schedule((1, 3, 1), 5)
  with pytest.raises(ValueError, match="model.order"):
    orders.static_order("spiral", 4)
  with pytest.raises(ValueError, match="regions"):
    orders.region_order(4, 3)


def _random_orders(seed, B, N):
  return jnp.asarray(np.stack([np.random.default_rng(seed + b).permutation(N) for b in range(B)]))


def test_random_order_kv_cache_equals_teacher_forcing_in_that_order():
  fam, _, params, _ = setup()
  B, labels = 2, jnp.array([0, 3])
  order = _random_orders(0, B, fam.num_tokens)
  seq = rand_tokens(5, B, fam)  # in decoding order
  _, grid, lg = fam.sample_tokens(
    params,
    labels,
    jax.random.key(0),
    cfg=1.0,
    known=seq,
    known_mask=jnp.ones_like(seq, bool),
    order=order,
    return_logits=True,
  )
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(grid), np.asarray(order), 1), seq)
  full = fam.apply(params, labels, seq, order=order)
  np.testing.assert_allclose(lg, full, atol=2e-5)
  # RoPE rows follow each example's grid positions: another order changes the logits
  assert not np.allclose(full, fam.apply(params, labels, seq), atol=1e-3)


@pytest.mark.parametrize("schedule", [(1, 1, 1, 1, 4, 4, 4), (1, 1, 2, 3, 4, 5)])
def test_parallel_schedule_logits_equal_block_causal_full_forward(schedule):
  fam, _, params, _ = setup()
  B, labels = 2, jnp.array([1, 4])
  order = _random_orders(3, B, fam.num_tokens)
  for cfg in (1.0, 3.0):
    _, grid, lg = fam.sample_tokens(
      params,
      labels,
      jax.random.key(2),
      cfg=cfg,
      order=order,
      schedule=schedule,
      return_logits=True,
    )
    seq = jnp.take_along_axis(grid, order, axis=1)
    full_c = fam.apply(params, labels, seq, order=order, schedule=schedule)
    if cfg == 1.0:
      np.testing.assert_allclose(lg, full_c, atol=2e-5)
    else:
      full_u = fam.apply(params, jnp.full_like(labels, 5), seq, order=order, schedule=schedule)
      np.testing.assert_allclose(lg, full_u + 3.0 * (full_c - full_u), atol=1e-4)


@pytest.mark.slow  # ~20 s on 2 cores; make test keeps the logits-equal-block-causal check of the schedule
def test_parallel_schedule_tokens_of_a_step_do_not_see_each_other():
  fam, _, params, _ = setup()
  schedule = (1, 1, 2, 3, 4, 5)
  starts = np.cumsum((0,) + schedule)
  seq = rand_tokens(6, 1, fam)
  emb0 = params["tok_embeddings"]["embedding"]

  def logits_of(emb, t):
    p = {**params, "tok_embeddings": {"embedding": emb}}
    return fam.apply(p, jnp.array([2]), seq, schedule=schedule)[0, t]

  for s in range(1, len(schedule)):
    t = int(starts[s]) + schedule[s] - 1  # the last token of step s
    g = jax.grad(lambda e, t=t: jnp.sum(logits_of(e, t) ** 2))(emb0)
    used = np.abs(np.asarray(g)).sum(-1) > 0
    seen = set(np.asarray(seq[0, : int(starts[s])]).tolist())
    unseen = set(np.asarray(seq[0, int(starts[s]) :]).tolist()) - seen
    assert all(used[v] for v in seen) and not any(used[v] for v in unseen), (s, seen, unseen)


def test_order_values_do_not_retrace_and_random_order_trains():
  fam, _, params, _ = setup()
  labels = jnp.array([0, 1])
  fam.sample(params, labels, jax.random.key(0), order=_random_orders(0, 2, fam.num_tokens))
  n = fam.trace_count
  a = fam.sample_tokens(params, labels, jax.random.key(0), order=_random_orders(9, 2, 16))[1]
  b = fam.sample_tokens(params, labels, jax.random.key(0), order=np.arange(16)[::-1])[1]
  assert fam.trace_count == n and not np.array_equal(a, b)
  # order = random in the config: a permutation per example, drawn from the loss rng
  rfam, _, rparams, _ = setup(order="random")
  assert rfam.order is None
  batch = {"tokens": rand_tokens(7, 3, rfam), "label": jnp.array([0, 1, 2])}
  l1, _ = rfam.loss(rparams, batch, jax.random.key(1), False)
  l2, _ = rfam.loss(rparams, batch, jax.random.key(1), False)
  l3, _ = rfam.loss(rparams, batch, jax.random.key(2), False)
  assert float(l1) == float(l2) and float(l1) != float(l3)
  order = orders.random_orders(jax.random.fold_in(jax.random.key(1), 1), 3, 16)
  seq = jnp.take_along_axis(batch["tokens"], order, axis=1)
  logp = jax.nn.log_softmax(rfam.apply(rparams, batch["label"], seq, order=order))
  np.testing.assert_allclose(l1, -jnp.take_along_axis(logp, seq[..., None], -1).mean(), rtol=1e-5)
  imgs = rfam.sample(rparams, batch["label"], jax.random.key(3))
  np.testing.assert_array_equal(imgs, rfam.sample(rparams, batch["label"], jax.random.key(3)))


def test_par_config_wires_order_schedule_into_loss_and_sampler():
  fam, _, params, _ = setup(order="regions", schedule="par")
  assert fam.schedule == orders.par_schedule(16, 4)
  np.testing.assert_array_equal(fam.order, orders.region_order(4, 2))
  codes, labels = rand_tokens(8, 2, fam), jnp.array([0, 4])
  loss, _ = fam.loss(params, {"tokens": codes, "label": labels}, None, False)
  seq = codes[:, fam.order]
  logits = fam.apply(params, labels, seq, schedule=orders.par_schedule(16, 4))
  logp = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(loss, -jnp.take_along_axis(logp, seq[..., None], -1).mean(), rtol=1e-5)
  _, grid, lg = fam.sample_tokens(params, labels, jax.random.key(1), cfg=1.0, return_logits=True)
  np.testing.assert_allclose(lg, fam.apply(params, labels, grid[:, fam.order]), atol=2e-5)
  cos = setup(schedule="cosine", schedule_steps=4)[0]
  assert cos.schedule == orders.cosine_schedule(16, 4) and len(cos.schedule) < 16

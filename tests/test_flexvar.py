"""FlexVAR (`arvision/models/flexvar.py`): what is specific to it (the family contract covers the
rest): any scale list in sampling, the position map at every side, independent (no-residual)
scales in the padded training path, the random training lists, the converter's coverage."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision import config_util, errors, families
from arvision.convert import flexvar as cf
from arvision.convert.common import to_state_dict
from arvision.models import flexvar as fv
from arvision.ops import masks


@functools.lru_cache(maxsize=1)
def _smoke():
  c = config_util.load_config_file("flexvar.py:smoke")
  tok = families.build(c.tokenizer.config)
  fam = families.build(c, tokenizer=tok)
  params = {**fam.init(jax.random.key(1)), "tokenizer": tok.init(jax.random.key(0))}
  return fam, params


# slow: two sampler compilations (~60 CPU-s; measured under load, see the landing report)
@pytest.mark.slow
def test_sampling_an_unseen_scale_list_extrapolates_and_is_greedy_above_the_trained_side():
  fam, params = _smoke()
  assert fam.patch_nums == (1, 2, 4, 8) and fam.max_pn == 8
  pns = (1, 3, 5, 8, 11)  # 3, 5 never in the default list; 11 past the 8x8 latent
  labels = jnp.array([0, 3])
  kw = dict(patch_nums=pns, cfg=1.5, top_k=0, top_p=0.0, return_logits=True)
  img, idx, logits = fam.sample_tokens(params, labels, jax.random.key(5), **kw)
  side = 11 * fam.tokenizer.downsample
  assert img.shape == (2, side, side, 1) and img.dtype == jnp.uint8
  assert [i.shape for i in idx] == [(2, p * p) for p in pns]
  assert all(bool(jnp.all(jnp.isfinite(lg))) for lg in logits)
  assert fv.greedy_scales(pns, fam.max_pn, fam.topk_patch_nums) == (False,) * 4 + (True,)
  # top-k 1 above the trained side: the token is the argmax of the guided logits
  np.testing.assert_array_equal(idx[-1], jnp.argmax(logits[-1], axis=-1))
  img2, idx2, _ = fam.sample_tokens(params, labels, jax.random.key(5), **kw)
  np.testing.assert_array_equal(img, img2)
  _, idx3, _ = fam.sample_tokens(params, labels, jax.random.key(6), **kw)
  assert any(bool(jnp.any(a != b)) for a, b in zip(idx[:4], idx3[:4], strict=True))
  # one compiled sampler per list: a new cfg reuses it, a new list compiles once
  n = fam.trace_count
  fam.sample_tokens(params, labels, jax.random.key(5), **{**kw, "cfg": 3.0})
  assert fam.trace_count == n
  fam.sample_tokens(params, labels, jax.random.key(5), **{**kw, "patch_nums": (1, 2, 8)})
  assert fam.trace_count == n + 1
  with pytest.raises(ValueError, match="start at 1"):
    fam.sample_tokens(params, labels, jax.random.key(5), patch_nums=(2, 4, 8))


def test_official_guidance_and_greedy_rules():
  pns = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32)
  s = fv.cfg_scales(pns, 2.0, 16)
  np.testing.assert_allclose(s[:13], [1 + 2.0 * si / 9 for si in range(13)], rtol=1e-6)
  assert s[13:] == [3.0, 3.0]  # above max_pn: t = cfg
  assert fv.cfg_scales(pns, 2.0, 16, "llamagen") == [2.0] * len(pns)
  greedy = fv.greedy_scales(pns, 16, fv.OFFICIAL_TOPK_PATCH_NUMS)
  assert [p for p, g in zip(pns, greedy, strict=True) if g] == [7, 9, 12, 14, 23, 32]


def test_position_map_is_area_downsampled_to_each_side():
  fam, params = _smoke()
  pos = np.asarray(params["pos_1LC"])[0]  # [32, 32, C]
  np.testing.assert_allclose(pos, fv.sincos_pos_map(32, pos.shape[-1]), atol=0)
  pos = pos + np.random.default_rng(0).normal(size=pos.shape).astype(np.float32)
  p = {**params, "pos_1LC": jnp.asarray(pos[None])}

  def at(pn):
    return np.asarray(fam.module.apply(fam._vars(p), pn, method=fv.FlexVAR.pos_at))[0]

  for pn in (1, 3, 13, 32, 40):
    want = np.zeros((pn, pn, pos.shape[-1]), np.float32)
    for i in range(pn):  # adaptive average pooling windows, written out
      r0, r1 = (i * 32) // pn, -((-(i + 1) * 32) // pn)
      for j in range(pn):
        c0, c1 = (j * 32) // pn, -((-(j + 1) * 32) // pn)
        want[i, j] = pos[r0:r1, c0:c1].mean(axis=(0, 1))
    np.testing.assert_allclose(at(pn), want.reshape(pn * pn, -1), rtol=1e-5, atol=1e-5)


def test_segment_causal_mask_equals_scale_causal():
  lengths = (1, 4, 9, 16)
  seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(5, 9)])
  dense = np.asarray(masks.segment_causal(seg).dense(35, 35))
  np.testing.assert_array_equal(dense[:30, :30], masks.scale_causal(lengths).dense(30))
  assert not dense[:30, 30:].any()  # real queries never see padding


@pytest.mark.slow
def test_padded_training_path_quantizes_every_scale_independently():
  """Targets and teacher inputs of the padded (random-list) path equal the per-scale path: each
  scale is its own quantization of the area-downsampled latent, and a scale's input is the
  previous scale's code map upsampled; the logits equal the static-list forward."""
  fam, params = _smoke()
  tok, tok_p = fam.tokenizer, params["tokenizer"]
  pns = (1, 3, 8)  # 3 is not in the default list (1, 2, 4, 8)
  images = jax.random.uniform(jax.random.key(2), (2, 16, 16, 1), minval=-1, maxval=1)
  lay = fam.layout(np.asarray(pns + (0,) * (fam.draw.slots - len(pns)), np.int32))
  n = int(lay["total"])
  assert n == sum(p * p for p in pns) and int(np.sum(lay["valid"])) == n
  idx, teacher = fam.padded_targets(tok_p, images, lay)
  want = tok.encode_idx_independent(tok_p, images, patch_nums=pns)
  np.testing.assert_array_equal(idx[:, :n], jnp.concatenate(want, axis=1))
  f = tok.encode_f(tok_p, images)
  cb = tok.codebook(tok_p)
  bounds = np.cumsum([0] + [p * p for p in pns])
  for k in range(1, len(pns)):
    prev = cb[want[k - 1]].reshape(2, pns[k - 1], pns[k - 1], -1)
    up = tok.independent_input(tok_p, prev, pns[k]).reshape(2, pns[k] ** 2, -1)
    np.testing.assert_allclose(teacher[:, bounds[k] : bounds[k + 1]], up, atol=1e-5)
  # not VAR's residual: the last scale's target alone decodes the image (its own quantization
  # of the full latent), whatever the coarser scales hold
  f_idx = tok.quantize_idx(tok_p, f)
  np.testing.assert_array_equal(want[-1], f_idx)
  labels = jnp.array([1, 2])
  padded = fam.padded_logits(params, labels, teacher, lay)[:, :n]
  static = fam.module.clone(patch_nums=pns).apply(fam._vars(params), labels, teacher[:, 1:n])
  np.testing.assert_allclose(padded, static, atol=2e-5, rtol=1e-5)


def test_training_draws_official_style_scale_lists():
  c = config_util.load_config_file("flexvar.py:d16")
  draw = fv.ScaleDraw(
    groups=c.model.train_scale_groups, full=c.model.patch_nums, max_tokens=c.model.max_tokens
  )
  lists = np.asarray(jax.vmap(draw.draw)(jax.random.split(jax.random.key(0), 200)))
  seen = set()
  for row in lists:
    pns = [int(p) for p in row if p > 0]
    seen.add(tuple(pns))
    assert pns[:2] == [1, 2] and pns == sorted(set(pns)), pns
    assert sum(p * p for p in pns) <= 680 and pns[-1] <= 16
  assert len(seen) > 50  # a different list nearly every step
  assert any(p[-1] != 16 for p in seen)  # the cap may drop the last scale, as official
  with pytest.raises(ValueError, match="start with"):
    fv.ScaleDraw(groups=((2, 2, 1),), full=(1, 2))


def _official_flexvar_keys(depth=2, classes=10, vocab=32, cvae=8, side=32):
  """The official FlexVAR state-dict layout (key -> shape), written from its constructor."""
  C, keys = 64 * depth, {}
  keys.update(
    {
      "word_embed.weight": (C, cvae),
      "word_embed.bias": (C,),
      "class_emb.weight": (classes + 1, C),
      "pos_start": (1, 1, C),
      "pos_1LC": (1, C, side, side),
      "head_nm.ada_lin.1.weight": (2 * C, C),
      "head_nm.ada_lin.1.bias": (2 * C,),
      "head.weight": (vocab, C),
      "head.bias": (vocab,),
      "attn_bias_for_masking": (1, 1, 30, 30),
    }
  )
  for i in range(depth):
    b = f"blocks.{i}."
    keys.update(
      {
        b + "attn.scale_mul_1H11": (1, depth, 1, 1),
        b + "attn.q_bias": (C,),
        b + "attn.v_bias": (C,),
        b + "attn.zero_k_bias": (C,),
        b + "attn.mat_qkv.weight": (3 * C, C),
        b + "attn.proj.weight": (C, C),
        b + "attn.proj.bias": (C,),
        b + "ffn.fc1.weight": (4 * C, C),
        b + "ffn.fc1.bias": (4 * C,),
        b + "ffn.fc2.weight": (C, 4 * C),
        b + "ffn.fc2.bias": (C,),
        b + "ada_lin.1.weight": (6 * C, C),
        b + "ada_lin.1.bias": (6 * C,),
      }
    )
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in keys.items()}


def _tok_config():
  c = config_util.load_config_file("flexvar.py:smoke").tokenizer.config
  with c.unlocked():
    c.data.image_size = 32  # a 16x16 latent, the official lists' side
  return c


def test_converter_maps_every_key_and_names_bad_ones():
  sd = _official_flexvar_keys()
  config = cf.flexvar_config(sd, _tok_config())
  assert (config.model.depth, config.model.width, config.model.num_heads) == (2, 128, 2)
  assert config.data.num_classes == 10 and config.model.pos_side == 32
  params = cf.convert_flexvar(sd, config)
  np.testing.assert_array_equal(params["pos_1LC"], sd["pos_1LC"].transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(
    params["blocks_1"]["ffn"]["fc1"]["kernel"], sd["blocks.1.ffn.fc1.weight"].T
  )
  back = to_state_dict(params)
  skipped = {"attn_bias_for_masking", "blocks.0.attn.zero_k_bias", "blocks.1.attn.zero_k_bias"}
  assert len(back) == len(sd) - len(skipped)  # every other key became exactly one param
  with pytest.raises(errors.UserError, match="blocks.0.ffn.extra.weight"):
    cf.convert_flexvar({**sd, "blocks.0.ffn.extra.weight": np.zeros((2, 2), np.float32)}, config)
  missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.q_bias"}
  with pytest.raises(errors.UserError, match="blocks_1/attn/q_bias"):
    cf.convert_flexvar(missing, config)
  with pytest.raises(errors.UserError, match="lvl_embed"):
    cf.flexvar_config({**sd, "lvl_embed.weight": np.zeros((10, 128), np.float32)})

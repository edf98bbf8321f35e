"""The BSQ tokenizer family (`model.type="bsq"`, Infinity's VAE) and `arvision convert
infinity_vae`: every official key maps, both official key layouts, errors name the key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _official_vae_keys(ch=8, mult=(1, 2), blocks=1, bits=8, wrapped=True):
  """The official BSQ VAE's state-dict layout (key -> shape), written from its constructor
  (`flux_vqgan.py`: `Conv`/`Normalize` wrappers, no attention, no quant convs)."""
  cv = ".conv" if wrapped else ""
  nm = ".norm" if wrapped else ""
  keys = {}

  def conv(name, o, i, k):
    keys[f"{name}{cv}.weight"], keys[f"{name}{cv}.bias"] = (o, i, k, k), (o,)

  def norm(name, c):
    keys[f"{name}{nm}.weight"], keys[f"{name}{nm}.bias"] = (c,), (c,)

  def block(name, i, o):
    norm(f"{name}.norm1", i)
    conv(f"{name}.conv1", o, i, 3)
    norm(f"{name}.norm2", o)
    conv(f"{name}.conv2", o, o, 3)
    if i != o:
      conv(f"{name}.nin_shortcut", o, i, 1)

  conv("encoder.conv_in", ch, 1, 3)  # one image channel, as the smoke data
  c = ch
  for i, m in enumerate(mult):
    for j in range(blocks):
      block(f"encoder.down.{i}.block.{j}", c, ch * m)
      c = ch * m
    if i != len(mult) - 1:
      conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
  block("encoder.mid.block_1", c, c)
  block("encoder.mid.block_2", c, c)
  norm("encoder.norm_out", c)
  conv("encoder.conv_out", bits, c, 3)
  conv("decoder.conv_in", c, bits, 3)
  block("decoder.mid.block_1", c, c)
  block("decoder.mid.block_2", c, c)
  for i in reversed(range(len(mult))):
    for j in range(blocks + 1):
      block(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
      c = ch * mult[i]
    if i != 0:
      conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
  norm("decoder.norm_out", c)
  conv("decoder.conv_out", 1, c, 3)
  keys["quantizer.lfq.mask"] = keys["quantize.lfq.mask"] = (bits,)  # `quantize` is an alias
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in keys.items()}


@pytest.mark.parametrize("wrapped", [True, False])
def test_converter_maps_every_official_key_and_names_bad_ones(wrapped):
  from arvision import config_util, errors
  from arvision.convert import bsq as cb
  from arvision.convert.common import flatten

  sd = _official_vae_keys(wrapped=wrapped)
  config = cb.infer_config(sd)
  m = config.model
  assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, m.embed_dim) == (8, (1, 2), 1, 8)
  assert m.type == "bsq" and not m.mid_attn and config.data.channels == 1
  with config.unlocked():  # the smoke tokenizer's data (1 channel, 16 px) and schedule
    smoke = config_util.load_config_file("tokenizer.py:bsq_smoke")
    config.data, config.model.patch_nums = smoke.data, smoke.model.patch_nums
  params, _ = cb.convert_vae(sd, config)
  flat = flatten(params["ae"])
  assert len(flat) == len(sd) - 2  # every key but the quantizer buffer (twice) is one param
  w = sd["encoder.down.0.downsample.conv" + (".conv" if wrapped else "") + ".weight"]
  np.testing.assert_array_equal(
    flat["encoder/down_0/downsample/conv/kernel"], w.transpose(2, 3, 1, 0)
  )
  n = sd["decoder.up.1.block.0.norm1" + (".norm" if wrapped else "") + ".weight"]
  np.testing.assert_array_equal(flat["decoder/up_1/block_0/norm1/scale"], n)
  with pytest.raises(errors.UserError, match="encoder.extra.weight"):
    cb.convert_vae({**sd, "encoder.extra.weight": np.zeros((2, 2), np.float32)}, config)
  key = "decoder.conv_out" + (".conv" if wrapped else "") + ".bias"
  with pytest.raises(errors.UserError, match="decoder/conv_out/bias"):
    cb.convert_vae({k: v for k, v in sd.items() if k != key}, config)
  with pytest.raises(errors.UserError, match="encoder.conv_in"):
    cb.infer_config({"decoder.conv_in.weight": np.zeros((1, 1, 3, 3))})


# slow: eager encoder/decoder passes and a gradient (~40 CPU-s measured under load)
@pytest.mark.slow
def test_bsq_tokenizer_family_encodes_decodes_and_trains():
  from arvision import config_util, families

  tok = families.build(config_util.load_config_file("tokenizer.py:bsq_smoke"))
  params = tok.init(jax.random.key(0))
  assert set(params["ae"]) == {"encoder", "decoder"}  # no quant convs, no codebook
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1), minval=-1, maxval=1)
  bits = tok.encode_bits(params, images)
  assert [b.shape for b in bits] == [(2, p * p, 8) for p in (1, 2, 4, 8)]
  recon, codes = tok.reconstruct(params, images)
  np.testing.assert_array_equal(codes, jnp.concatenate(bits, axis=1))
  np.testing.assert_allclose(tok.decode_bits(params, bits), recon, atol=1e-5)
  targets, x = tok.flip_requant(params, images, jax.random.key(2), layers=2, strength=0.5)
  np.testing.assert_array_equal(targets[0], bits[0])  # scale 0's target never sees a flip
  assert x.shape == (2, 4 + 16 + 64, 8)
  loss, metrics = tok.loss(params, {"image": images}, jax.random.key(3), train=True)
  grads = jax.grad(lambda p: tok.loss(p, {"image": images}, jax.random.key(3), True)[0])(params)
  enc = grads["ae"]["encoder"]["conv_in"]["kernel"]
  assert bool(jnp.isfinite(loss)) and float(jnp.abs(enc).sum()) > 0  # straight through to it
  assert 0 <= float(metrics["bit_entropy"]) <= 1
  with pytest.raises(ValueError, match="encode_bits needs model.type"):
    families.build(config_util.load_config_file("tokenizer.py:smoke")).encode_bits(params, images)

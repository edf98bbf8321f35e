"""Exports: safetensors (+ JSON sidecar) read back by arvision.load, and the official layouts.

The official exports are checked against the key -> shape tables of the official modules in
tests/data/ (what `load_state_dict(strict=True)` needs: every key, every shape, the buffers), and
by round trips: official state dict -> convert -> export official -> same keys/values -> convert
back -> identical params.
"""

import json
import os

import jax
import ml_collections as mlc
import numpy as np
import pytest
from official_tables import zeros_sd as _zeros_sd

import arvision
from arvision import api, config_util, export
from arvision import checkpoint as ckpt_lib
from arvision.convert import common
from arvision.convert import llamagen as cl
from arvision.convert import mar as cm
from arvision.convert import var as cv

HERE = os.path.dirname(os.path.abspath(__file__))


def _tables(name):
  with open(os.path.join(HERE, "data", f"{name}_official_keys.json")) as f:
    return json.load(f)


VAR, LLAMAGEN, MAR = _tables("var"), _tables("llamagen"), _tables("mar")


def _random_sd(table, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}


def _shapes(sd):
  return {k: list(np.shape(v)) for k, v in sd.items()}


def _same_params(a, b):
  fa, fb = common.flatten(a), common.flatten(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _var_model(seed=0):
  """A small official-shaped VAR (tables `vae_small` / `var_small`), sizes inferred."""
  vae_sd, var_sd = _random_sd(VAR["vae_small"], seed), _random_sd(VAR["var_small"], seed + 1)
  tok_params, tok_config = cv.convert_vae(vae_sd)
  config = cv.var_config(var_sd, tokenizer_patch_nums=tok_config.model.patch_nums)
  tok_config.model.patch_nums = config.tokenizer.config.model.patch_nums
  tok_config.data.image_size = 64
  config.tokenizer.config = tok_config
  config.data.image_size = 64
  params = cv.convert_var(var_sd, config)
  config = config_util.from_json(config_util.to_json(config))
  return api.from_params({**params, "tokenizer": tok_params}, config), vae_sd, var_sd


def test_var_official_export_matches_the_tables_and_round_trips():
  model, vae_sd, var_sd = _var_model(3)
  out = export.official_state_dicts(model)  # converts back and compares inside
  (_, var_back), (_, vae_back) = out["var.pth"], out["var_vae.pth"]
  assert _shapes(var_back) == VAR["var_small"]
  assert _shapes(vae_back) == VAR["vae_small"]
  buffers = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "ema_vocab_hit_SV")
  for sd, back in ((var_sd, var_back), (vae_sd, vae_back)):
    for k, v in sd.items():
      if not k.endswith(buffers):
        np.testing.assert_array_equal(back[k], v, err_msg=k)
  # the recomputed masking buffer: token i (scale s_i) sees token j iff s_j <= s_i
  lvl = var_back["lvl_1L"][0]
  assert list(np.bincount(lvl)) == [1, 4, 16]
  bias = var_back["attn_bias_for_masking"][0, 0]
  assert bias[0, 1] == -np.inf and bias[20, 0] == 0 and bias[5, 4] == 0

  again, _ = cv.convert_vae(vae_back, model.config.tokenizer.config)
  _same_params(again, model.params["tokenizer"])
  _same_params(
    cv.convert_var(var_back, model.config),
    {k: v for k, v in model.params.items() if k != "tokenizer"},
  )


@pytest.mark.parametrize("name", ["var_d16", "var_d30"])
def test_released_var_sizes_export_every_official_key(name):
  sd = _zeros_sd(VAR[name])
  config = cv.var_config(sd)
  back = cv.to_official_var(cv.convert_var(sd, config), config)
  assert _shapes(back) == VAR[name]


def test_released_vae_exports_every_official_key():
  params, config = cv.convert_vae(_zeros_sd(VAR["vae_full"]))
  assert _shapes(cv.to_official_vae(params, config)) == VAR["vae_full"]


def test_llamagen_official_export_round_trips(experiment):
  small = experiment("parity_llamagen_official").small_configs
  config = small()
  vq_sd, gpt_sd = _random_sd(LLAMAGEN["vq_small"], 1), _random_sd(LLAMAGEN["gpt_small"], 2)
  tok_params, _ = cl.convert_vq(vq_sd, config.tokenizer.config)
  params = cl.convert_gpt(gpt_sd, config)
  model = api.from_params({**params, "tokenizer": tok_params}, config)
  out = export.official_state_dicts(model)
  (_, gpt_back), (_, vq_back) = out["llamagen.pt"], out["llamagen_vq.pt"]
  assert _shapes(gpt_back) == LLAMAGEN["gpt_small"]
  assert _shapes(vq_back) == LLAMAGEN["vq_small"]
  for k, v in {**gpt_sd, **vq_sd}.items():
    if k != "quantize.codebook_used":
      np.testing.assert_array_equal({**gpt_back, **vq_back}[k], v, err_msg=k)
  full_vq, full_config = cl.convert_vq(_zeros_sd(LLAMAGEN["vq16_full"]))
  assert _shapes(cl.to_official_vq(full_vq, full_config)) == LLAMAGEN["vq16_full"]
  sd = _zeros_sd(LLAMAGEN["gpt_L"])
  gpt_config = cl.gpt_config(sd)
  assert (
    _shapes(cl.to_official_gpt(cl.convert_gpt(sd, gpt_config), gpt_config)) == (LLAMAGEN["gpt_L"])
  )


def _small_mar_config():
  c = mlc.ConfigDict(config_util.load_config_file("mar.py:smoke").to_dict())
  c.model.update(
    encoder_embed_dim=64,
    encoder_depth=2,
    encoder_num_heads=4,
    decoder_embed_dim=64,
    decoder_depth=2,
    decoder_num_heads=4,
    buffer_size=8,
    diffloss_d=2,
    diffloss_w=96,
  )
  c.data.num_classes = 10
  tok = c.tokenizer.config
  tok.model.update(type="kl", ch=8, ch_mult=(1, 2, 2, 2, 2), z_channels=4, embed_dim=4)
  tok.data.image_size = 64
  return c


def test_mar_official_export_round_trips():
  config = _small_mar_config()
  mar_sd = _random_sd(MAR["mar_small"], 4)
  params = cm.convert_mar(mar_sd, config)
  vae_sd = _zeros_sd(MAR["vae_kl16"])
  vae_params, vae_config = cm.convert_vae(vae_sd)
  back = cm.to_official_mar(params, config)
  assert _shapes(back) == MAR["mar_small"]
  for k, v in mar_sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  _same_params(cm.convert_mar(back, config), params)
  vae_back = cm.to_official_vae(vae_params, vae_config)
  assert _shapes(vae_back) == MAR["vae_kl16"]
  _same_params(cm.convert_vae(vae_back, vae_config)[0], vae_params)


def test_safetensors_export_loads_back_and_samples_the_same(tmp_path):
  model, _, _ = _var_model(5)
  out = export.save_safetensors(model, str(tmp_path / "st"))
  assert sorted(os.listdir(out)) == ["arvision.json", "params.safetensors"]
  from safetensors.numpy import load_file

  names = load_file(os.path.join(out, "params.safetensors"))
  assert "blocks_1/attn/mat_qkv/kernel" in names and "tokenizer/ae/quantize/embedding" in names
  back = arvision.load(out)
  _same_params(back.params, model.params)
  assert back.config.to_dict() == model.config.to_dict()
  np.testing.assert_array_equal(
    back.sample([1, 2], jax.random.key(0), top_k=5),
    model.sample([1, 2], jax.random.key(0), top_k=5),
  )


def test_cli_export_official_files_load_with_torch(tmp_path):
  torch = pytest.importorskip("torch")
  model, vae_sd, var_sd = _var_model(7)
  ckpt_lib.save_export(
    str(tmp_path / "w"),
    {k: v for k, v in model.params.items() if k != "tokenizer"},
    {"tokenizer": model.params["tokenizer"]},
    model.config,
  )
  from absl import flags

  from arvision import cli

  flags.FLAGS.unparse_flags()
  argv = ["arvision", "export", "--workdir", str(tmp_path / "w"), "--format", "official"]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr("sys.argv", [*argv, "--out", str(tmp_path / "off")])
    with pytest.raises(SystemExit) as exit_:
      cli.run()  # absl's app.run always exits
  assert not exit_.value.code
  files = sorted(os.listdir(tmp_path / "off"))
  assert files == ["var.pth", "var_vae.pth"]
  sd = torch.load(tmp_path / "off" / "var.pth", weights_only=True)
  assert {k: list(v.shape) for k, v in sd.items()} == VAR["var_small"]
  np.testing.assert_array_equal(sd["head.weight"].numpy(), var_sd["head.weight"])
  # and the official file converts back through `arvision convert` into the same model
  cv.main_var_vae(str(tmp_path / "off" / "var_vae.pth"), str(tmp_path / "vae"))
  cv.main_var(str(tmp_path / "off" / "var.pth"), str(tmp_path / "conv"), vae=str(tmp_path / "vae"))
  _same_params(arvision.load(str(tmp_path / "conv")).params, model.params)


def test_converters_infer_sizes_from_the_checkpoints():
  """Depth, widths, classes, schedules from shapes; heads from the official variant or a flag."""
  config = cv.var_config(_zeros_sd(VAR["var_small"]))
  assert (config.model.depth, config.model.width, config.model.num_heads) == (2, 64, 2)
  assert tuple(config.tokenizer.config.model.patch_nums) == (1, 2, 4)
  with pytest.raises(ValueError, match="patch_nums=.* do not fit"):
    cv.var_config(_zeros_sd(VAR["var_small"]), patch_nums=(1, 2, 3))
  vae = cv.infer_vae_config(_zeros_sd(VAR["vae_small"]))
  assert (vae.model.ch, vae.model.z_channels, vae.model.vocab_size) == (32, 8, 64)

  gpt = cl.gpt_config(_zeros_sd(LLAMAGEN["gpt_small_gqa"]), num_heads=4)
  assert gpt.variant == "inferred" and gpt.model.n_kv_head == 2 and gpt.model.n_layer == 2
  assert cl.gpt_config(_zeros_sd(LLAMAGEN["gpt_small"]), num_heads=4).model.n_kv_head == 0
  assert cl.gpt_config(_zeros_sd(LLAMAGEN["gpt_XL"])).model.n_head == 20  # official variant

  mar = cm.detect_config(_zeros_sd(MAR["mar_small"]), num_heads=4)
  want = _small_mar_config().model
  for k in ("encoder_depth", "encoder_embed_dim", "decoder_depth", "buffer_size", "diffloss_w"):
    assert mar.model[k] == want[k], k
  assert mar.data.num_classes == 10 and mar.data.image_size == 64
  cm.convert_mar(_zeros_sd(MAR["mar_small"]), mar)  # the inferred shapes fit

  # tokenizers: the released ones infer exactly the shipped configs; small ones their sizes
  assert cm.infer_vae_config(_zeros_sd(MAR["vae_kl16"])).model.to_dict() == (
    cm.vae_config().model.to_dict()
  )
  assert cl.infer_vq_config(_zeros_sd(LLAMAGEN["vq16_full"])).model.to_dict() == (
    cl.vq_config().model.to_dict()
  )
  vq = cl.infer_vq_config(_zeros_sd(LLAMAGEN["vq_small"]))
  assert (vq.model.ch, tuple(vq.model.ch_mult), vq.model.z_channels) == (128, (1, 2), 32)
  cl.convert_vq(_zeros_sd(LLAMAGEN["vq_small"]))

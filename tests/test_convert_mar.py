"""MAR converters: key coverage of the official models, layouts, EMA selection, errors naming keys.

`tests/data/mar_official_keys.json` holds the state-dict key -> shape tables of the official
LTH14/mar modules (KL-16 VAE, MAR-B/L/H with the README's DiffLoss MLPs, and a small MAR built with
the same class), dumped by `experiments/parity_mar_official.py --dump_keys` from the official code.
Numerical parity with the official code itself is `experiments/parity_mar_official.py`.
"""

import json
import os

import ml_collections as mlc
import numpy as np
import pytest
from official_tables import count_params as _n
from official_tables import zeros_sd as _zeros_sd

from arvision import config_util
from arvision.convert import common
from arvision.convert import mar as cm

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "mar_official_keys.json")) as f:
  TABLES = json.load(f)

# The small official model of the key tables (experiments/parity_mar_official.py SMALL).
SMALL = dict(width=64, depth=2, heads=4, buffer_size=8, diffloss_d=2, diffloss_w=96, classes=10)


def _random_sd(table, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}


def _small_config():
  c = mlc.ConfigDict(config_util.load_config_file("mar.py:smoke").to_dict())
  s = SMALL
  c.model.update(
    encoder_embed_dim=s["width"],
    encoder_depth=s["depth"],
    encoder_num_heads=s["heads"],
    decoder_embed_dim=s["width"],
    decoder_depth=s["depth"],
    decoder_num_heads=s["heads"],
    buffer_size=s["buffer_size"],
    diffloss_d=s["diffloss_d"],
    diffloss_w=s["diffloss_w"],
  )
  c.data.num_classes = s["classes"]
  tok = c.tokenizer.config
  tok.model.update(type="kl", ch=8, ch_mult=(1, 2, 2, 2, 2), z_channels=4, embed_dim=4)
  tok.data.image_size = 64  # 4x4 latents: L = 16, as the official img_size 64 / stride 16
  return c


def test_kl16_vae_maps_every_key():
  table = TABLES["vae_kl16"]
  params, config = cm.convert_vae(_zeros_sd(table))
  assert _n(params) == sum(int(np.prod(s)) for s in table.values())
  assert config.model.scale_factor == 0.2325 and config.model.type == "kl"


@pytest.mark.parametrize("name,variant", [("mar_base", "B"), ("mar_large", "L"), ("mar_huge", "H")])
def test_released_mar_checkpoints_map_every_key(name, variant):
  table = TABLES[name]
  sd = _zeros_sd(table)
  config = cm.detect_config(sd)
  assert config.variant == variant
  params = cm.convert_mar(sd, config)
  assert _n(params) == sum(int(np.prod(s)) for s in table.values())


def test_layouts_and_round_trip_of_a_small_model():
  sd = _random_sd(TABLES["mar_small"], 1)
  params = cm.convert_mar(sd, _small_config())
  blk = params["encoder_blocks_1"]
  np.testing.assert_array_equal(
    blk["attn"]["qkv"]["kernel"], sd["encoder_blocks.1.attn.qkv.weight"].T
  )
  np.testing.assert_array_equal(blk["norm2"]["scale"], sd["encoder_blocks.1.norm2.weight"])
  np.testing.assert_array_equal(params["class_emb"]["embedding"], sd["class_emb.weight"])
  np.testing.assert_array_equal(params["fake_latent"], sd["fake_latent"])
  np.testing.assert_array_equal(params["mask_token"], sd["mask_token"])
  np.testing.assert_array_equal(
    params["diffusion_pos_embed_learned"], sd["diffusion_pos_embed_learned"]
  )
  net = params["diffloss"]["net"]
  np.testing.assert_array_equal(
    net["res_blocks_1"]["adaLN_modulation_1"]["kernel"],
    sd["diffloss.net.res_blocks.1.adaLN_modulation.1.weight"].T,
  )
  np.testing.assert_array_equal(
    net["time_embed"]["mlp_2"]["bias"], sd["diffloss.net.time_embed.mlp.2.bias"]
  )
  back = common.to_state_dict(params)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_errors_name_the_key():
  sd = dict(_zeros_sd(TABLES["mar_small"]))
  config = _small_config()
  bad = dict(sd, **{"decoder_blocks.0.mlp.fc1.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="decoder_blocks.0.mlp.fc1.weight"):
    cm.convert_mar(bad, config)
  missing = {k: v for k, v in sd.items() if k != "diffloss.net.cond_embed.bias"}
  with pytest.raises(ValueError, match="diffloss/net/cond_embed/bias"):
    cm.convert_mar(missing, config)
  with pytest.raises(ValueError, match="extra.weight"):
    cm.convert_mar(dict(sd, **{"extra.weight": np.zeros(3, np.float32)}), config)
  wrong = _zeros_sd(TABLES["mar_small"])
  with pytest.raises(ValueError, match="num_heads=3 does not divide"):
    cm.detect_config(wrong, num_heads=3)  # sizes are inferred; heads are the one flag


def test_ema_entry_is_selected(tmp_path):
  torch = pytest.importorskip("torch")
  table = TABLES["mar_small"]
  model = {k: torch.zeros(s) for k, s in table.items()}
  ema = {k: torch.ones(s) for k, s in table.items()}
  path = str(tmp_path / "checkpoint-last.pth")
  torch.save({"model": model, "model_ema": ema, "epoch": 3}, path)
  assert all(np.all(v == 1) for v in cm.load_mar_state_dict(path, ema=True).values())
  assert all(np.all(v == 0) for v in cm.load_mar_state_dict(path, ema=False).values())
  torch.save({"model": model}, path)
  with pytest.raises(ValueError, match="model_ema"):
    cm.load_mar_state_dict(path, ema=True)
  with pytest.raises(ValueError, match="--vae"):
    cm.main_mar(path, str(tmp_path / "out"))

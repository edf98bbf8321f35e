"""LlamaGen converters: key coverage against the official tables, layouts, errors, round trip.

`tests/data/llamagen_official_keys.json` holds the state-dict key -> shape tables of the official
FoundationVision/LlamaGen modules (VQ_16, GPT-B/L/XL/XXL/3B and small models of the same classes),
dumped by `experiments/parity_llamagen_official.py --dump_keys`; numerical parity with the official
code is that program's main mode (experiments/results/parity_llamagen_official.json).
"""

import json
import os

import jax
import numpy as np
import pytest
from official_tables import count_params as _n
from official_tables import zeros_sd as _zeros_sd

from arvision import api, config_util
from arvision import checkpoint as ckpt_lib
from arvision.convert import common
from arvision.convert import llamagen as cl

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "llamagen_official_keys.json")) as f:
  TABLES = json.load(f)


def _random_sd(table, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}


def _count(table, skip=()):
  return sum(int(np.prod(s)) for k, s in table.items() if k not in skip)


@pytest.fixture(scope="module")
def small_configs(experiment):
  """The parity script's small LlamaGen configs (the shapes of `vq_small` / `gpt_small`)."""
  return experiment("parity_llamagen_official").small_configs


def test_full_vq_checkpoint_maps_every_key():
  params, config = cl.convert_vq(_zeros_sd(TABLES["vq16_full"]))
  assert _n(params) == _count(TABLES["vq16_full"], {"quantize.codebook_used"})
  assert config.model.vocab_size == 16384


@pytest.mark.parametrize("name", ["B", "L", "XL", "XXL", "3B"])
def test_full_gpt_checkpoints_map_every_key(name):
  sd = _zeros_sd(TABLES[f"gpt_{name}"])
  config = cl.gpt_config(sd)
  assert config.variant == name
  assert _n(cl.convert_gpt(sd, config)) == _count(TABLES[f"gpt_{name}"])


def test_layouts_and_gqa(small_configs):
  sd = _random_sd(TABLES["vq_small"], 1)
  cfg = small_configs()
  ae = cl.convert_vq(sd, cfg.tokenizer.config)[0]["ae"]
  w = sd["encoder.conv_blocks.1.res.0.conv1.weight"]
  np.testing.assert_array_equal(
    ae["encoder"]["down_1"]["block_0"]["conv1"]["kernel"], w.transpose(2, 3, 1, 0)
  )
  # decoder conv_blocks run from the lowest resolution: conv_blocks.0 is up_1 for 2 levels
  np.testing.assert_array_equal(
    ae["decoder"]["up_1"]["attn_2"]["q"]["bias"], sd["decoder.conv_blocks.0.attn.2.q.bias"]
  )
  np.testing.assert_array_equal(
    ae["encoder"]["mid"]["attn_1"]["k"]["bias"], sd["encoder.mid.1.k.bias"]
  )
  np.testing.assert_array_equal(ae["quantize"]["embedding"], sd["quantize.embedding.weight"])
  for key, n_kv in (("gpt_small", 0), ("gpt_small_gqa", 2)):
    sd = _random_sd(TABLES[key], 2)
    p = cl.convert_gpt(sd, small_configs(n_kv))
    np.testing.assert_array_equal(
      p["layers_1"]["attention"]["wqkv"]["kernel"], sd["layers.1.attention.wqkv.weight"].T
    )
    np.testing.assert_array_equal(p["output"]["kernel"], sd["output.weight"].T)
    np.testing.assert_array_equal(
      p["cls_embedding"]["embedding_table"]["embedding"], sd["cls_embedding.embedding_table.weight"]
    )
    np.testing.assert_array_equal(
      p["layers_0"]["ffn_norm"]["scale"], sd["layers.0.ffn_norm.weight"]
    )


def test_round_trip_and_skipped_buffers(small_configs):
  sd = _random_sd(TABLES["gpt_small"], 3)
  extra = {
    "freqs_cis": np.zeros((17, 8, 2), np.float32),
    "layers.0.attention.kv_cache.k_cache": np.zeros((2, 4, 24, 16), np.float32),
  }
  p = cl.convert_gpt({**sd, **extra}, small_configs())
  back = common.to_state_dict(p)
  assert set(back) == set(sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_errors_name_the_key(small_configs):
  sd = _random_sd(TABLES["gpt_small"], 4)
  config = small_configs()
  with pytest.raises(ValueError, match="layers.0.attention.extra"):
    cl.convert_gpt({**sd, "layers.0.attention.extra": np.zeros(3, np.float32)}, config)
  missing = dict(sd)
  del missing["layers.1.feed_forward.w2.weight"]
  with pytest.raises(ValueError, match="layers_1/feed_forward/w2/kernel"):
    cl.convert_gpt(missing, config)
  with pytest.raises(ValueError, match="shape mismatch for 'output.weight'"):
    cl.convert_gpt(dict(sd, **{"output.weight": np.zeros((5, 64), np.float32)}), config)
  with pytest.raises(ValueError, match="num_heads=5 does not divide"):
    cl.gpt_config(sd, num_heads=5)  # sizes are inferred; heads are the one flag
  with pytest.raises(ValueError, match="tok_embeddings"):
    cl.gpt_config(_zeros_sd(TABLES["vq_small"]))


def test_checkpoint_layouts_and_export_loads_and_samples(tmp_path, small_configs):
  torch = pytest.importorskip("torch")
  sd_vq = {k: torch.from_numpy(v) for k, v in _random_sd(TABLES["vq_small"], 5).items()}
  sd = {k: torch.from_numpy(v) for k, v in _random_sd(TABLES["gpt_small"], 6).items()}
  for i, wrapped in enumerate(({"model": sd}, {"module": sd}, {"state_dict": sd}, sd)):
    torch.save(wrapped, str(tmp_path / f"c{i}.pt"))
    assert set(common.load_torch_state_dict(str(tmp_path / f"c{i}.pt"))) == set(sd)
  config = small_configs()
  tok_params, _ = cl.convert_vq({k: v.numpy() for k, v in sd_vq.items()}, config.tokenizer.config)
  params = cl.convert_gpt({k: v.numpy() for k, v in sd.items()}, config)
  config = config_util.from_json(config_util.to_json(config))
  ckpt_lib.save_export(str(tmp_path / "out"), params, {"tokenizer": tok_params}, config)
  model = api.load(str(tmp_path / "out"))
  imgs = model.sample([1, 2], jax.random.key(0), cfg=2.0, top_k=5)
  assert imgs.shape == (2, 8, 8, 3) and imgs.dtype == np.uint8
  np.testing.assert_array_equal(imgs, model.sample([1, 2], jax.random.key(0), cfg=2.0, top_k=5))

"""xAR converter: key coverage of the official models (B/L/H and a small one), the inferred
config, buffers skipped, errors naming keys, the round trip.

`tests/data/xar_official_keys.json` holds the state-dict key -> shape tables of the official
OliverRensu/xAR modules, dumped by `experiments/parity_xar_official.py --dump_keys` from the
official code. Numerical parity with the official code is `experiments/parity_xar_official.py`.
"""

import json
import os
import re

import numpy as np
import pytest
from official_tables import count_params as _n
from official_tables import zeros_sd as _zeros_sd

from arvision import errors
from arvision.convert import common
from arvision.convert import xar as cx

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "xar_official_keys.json")) as f:
  TABLES = json.load(f)


def _n_params(table):
  buffers = [k for k in table if any(re.fullmatch(p, k) for p in cx.SKIP)]
  return sum(int(np.prod(s)) for k, s in table.items() if k not in buffers)


@pytest.mark.parametrize(
  "name,variant,depth,width",
  [
    ("xar_base", "B", 8, 768),
    # building the 32- and 40-block abstract models takes 30-50 s on a loaded 2-core CPU
    pytest.param("xar_large", "L", 16, 1024, marks=pytest.mark.slow),
    pytest.param("xar_huge", "H", 20, 1280, marks=pytest.mark.slow),
  ],
)
def test_released_xar_checkpoints_map_every_key(name, variant, depth, width):
  table = TABLES[name]
  sd = _zeros_sd(table)
  config = cx.detect_config(sd)
  assert config.variant == variant
  m = config.model
  assert (m.encoder_depth, m.decoder_depth, m.encoder_embed_dim) == (depth, depth, width)
  assert config.data.num_classes == 1000 and config.data.image_size == 256 and m.mlp_ratio == 4.0
  params = cx.convert_xar(sd, config)
  assert _n(params) == _n_params(table)  # every non-buffer key, nothing else
  assert any(k.endswith("attn.rope.freqs_cos") for k in table) and "mask" in table


def test_small_model_round_trip_and_errors():
  table = TABLES["xar_small"]
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}
  config = cx.detect_config(sd)
  assert config.variant == "inferred" and config.model.encoder_num_heads == 1  # width 64 / 64
  params = cx.convert_xar(sd, config)
  np.testing.assert_array_equal(
    params["encoder_blocks_1"]["mlp"]["fc1_g"]["kernel"], sd["encoder_blocks.1.mlp.fc1_g.weight"].T
  )
  np.testing.assert_array_equal(params["z_proj_ln"]["scale"], sd["z_proj_ln.weight"])
  back = cx.to_official_xar(params)
  kept = {k for k in sd if k in back}
  assert kept == set(back) and len(back) == len(sd) - sum(
    1 for k in sd if k == "mask" or ".rope." in k
  )
  for k in back:
    np.testing.assert_array_equal(back[k], sd[k])
  bad = dict(sd)
  bad["decoder_blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(errors.UserError, match="decoder_blocks.0.attn.extra.weight"):
    cx.convert_xar(bad, config)
  del bad["decoder_blocks.0.attn.extra.weight"], bad["pred.bias"]
  with pytest.raises(errors.UserError, match="pred/bias"):
    cx.convert_xar(bad, config)
  with pytest.raises(errors.UserError, match="not an xAR checkpoint"):
    cx.detect_config({"foo": np.zeros(1)})
  assert common.flatten(params)  # a plain nested dict

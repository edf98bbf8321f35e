"""FlowAR converter: key coverage of the official models (S/L/H and small ones with and without
cross-attention), the inferred config, buffers skipped, errors naming keys, the round trip.

`tests/data/flowar_official_keys.json` holds the official state-dict key -> shape tables, dumped
by `experiments/parity_flowar_official.py --dump_keys` from the official code. Numerical parity
with the official code is `experiments/parity_flowar_official.py`.
"""

import json
import os
import re

import numpy as np
import pytest
from official_tables import count_params as _n
from official_tables import zeros_sd as _zeros_sd

from arvision import errors
from arvision.convert import flowar as cf

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "flowar_official_keys.json")) as f:
  TABLES = json.load(f)


def _n_params(table):
  buffers = [k for k in table if any(re.fullmatch(p, k) for p in cf.SKIP)]
  return sum(int(np.prod(s)) for k, s in table.items() if k not in buffers)


@pytest.mark.parametrize(
  "name,variant,depth,width,head,cross",
  [
    ("flowar_small", "S", 6, 768, (2, 1024), False),
    # building the big abstract models takes 30-60 s on a loaded 2-core CPU
    pytest.param("flowar_large", "L", 8, 1024, (12, 1024), True, marks=pytest.mark.slow),
    pytest.param("flowar_huge", "H", 15, 1536, (12, 1536), True, marks=pytest.mark.slow),
  ],
)
def test_released_flowar_checkpoints_map_every_key(name, variant, depth, width, head, cross):
  table = TABLES[name]
  sd = _zeros_sd(table)
  config = cf.detect_config(sd)
  m = config.model
  assert config.variant == variant
  assert (m.encoder_depth, m.decoder_depth, m.encoder_embed_dim) == (depth, depth, width)
  assert (m.head_depth, m.head_width, m.cross) == (*head, cross)
  assert tuple(m.patch_nums) == (1, 2, 4, 8, 16) and config.data.num_classes == 1000
  params = cf.convert_flowar(sd, config)
  assert _n(params) == _n_params(table)
  assert "mask" in table and any(k.endswith("attn.rope.freqs") for k in table)


@pytest.mark.parametrize("cross", [0, 1])
def test_small_models_round_trip_and_errors(cross):
  table = TABLES[f"flowar_small_cross{cross}"]
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}
  config = cf.detect_config(sd, num_heads=4)
  assert config.model.cross == bool(cross) and config.model.head_width == 128
  params = cf.convert_flowar(sd, config)
  key = "flownet.res_blocks.1.mlp.fc1_g.weight"
  np.testing.assert_array_equal(
    params["flownet"]["res_blocks_1"]["mlp"]["fc1_g"]["kernel"], sd[key].T
  )
  back = cf.to_official_flowar(params)
  assert set(back) == {k for k in sd if not any(re.fullmatch(p, k) for p in cf.SKIP)}
  for k in back:
    np.testing.assert_array_equal(back[k], sd[k])
  bad = dict(sd)
  bad["flownet.res_blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(errors.UserError, match="flownet.res_blocks.0.attn.extra.weight"):
    cf.convert_flowar(bad, config)
  del bad["flownet.res_blocks.0.attn.extra.weight"], bad["diffusion_pos_embed_learned"]
  with pytest.raises(errors.UserError, match="diffusion_pos_embed_learned"):
    cf.convert_flowar(bad, config)
  with pytest.raises(errors.UserError, match="not a FlowAR checkpoint"):
    cf.detect_config({"foo": np.zeros(1)})

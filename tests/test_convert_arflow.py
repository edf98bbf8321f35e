"""ARFlow converter: key coverage of the official models (S/2, B/4, L/2, XL/2 and a small one),
the inferred config, `pos_embed` rebuilt (equal to the official buffer), errors naming keys, the
round trip.

`tests/data/arflow_official_keys.json` holds the state-dict key -> shape tables of the official
TheFllood/ARFlow modules, dumped by `experiments/parity_arflow_official.py --dump_keys` from the
official code. Numerical parity with the official code is `experiments/parity_arflow_official.py`.
"""

import json
import os

import numpy as np
import pytest
from official_tables import count_params as _n
from official_tables import zeros_sd as _zeros_sd

from arvision import errors
from arvision.convert import arflow as ca
from arvision.models import arflow as af

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "arflow_official_keys.json")) as f:
  TABLES = json.load(f)


@pytest.mark.parametrize(
  "name,variant",
  [
    ("ARFlow-S/2", "S-2"),
    # building the 24- and 28-block abstract models takes tens of seconds on a loaded CPU
    pytest.param("ARFlow-B/4", "B-4", marks=pytest.mark.slow),
    pytest.param("ARFlow-L/2", "L-2", marks=pytest.mark.slow),
    pytest.param("ARFlow-XL/2", "XL-2", marks=pytest.mark.slow),
  ],
)
def test_released_arflow_models_map_every_key(name, variant):
  table = TABLES[name]
  sd = _zeros_sd(table)
  config = ca.detect_config(sd)
  assert config.variant == variant
  m = config.model
  assert config.data.num_classes == 1000 and m.mlp_ratio == 4.0
  params = ca.convert_arflow(sd, config)
  assert _n(params) == sum(int(np.prod(s)) for k, s in table.items() if k != "pos_embed")
  d, h, p = m.depth, m.hidden_size, m.patch_size
  pos = int(np.prod(table["pos_embed"]))  # [1, (32 / patch)^2, width]: rebuilt, not a param
  assert _n(params) + pos == af.official_param_count(d, h, m.num_heads, p)


def test_small_model_round_trip_pos_embed_and_errors():
  table = TABLES["small"]
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}
  config = ca.detect_config(sd)
  m = config.model
  assert config.variant == "inferred" and (m.depth, m.hidden_size, m.num_heads) == (2, 128, 4)
  assert config.data.num_classes == 10
  params = ca.convert_arflow(sd, config)
  np.testing.assert_array_equal(
    params["blocks_1"]["attn"]["gt_proj"]["kernel"], sd["blocks.1.attn.gt_proj.weight"].T
  )
  np.testing.assert_array_equal(
    params["x_embedder"]["proj"]["kernel"], sd["x_embedder.proj.weight"].transpose(2, 3, 1, 0)
  )
  back = ca.to_official_arflow(params, side=8, width=128)
  assert set(back) == set(sd)
  for k in back:
    if k != "pos_embed":
      np.testing.assert_array_equal(back[k], sd[k])
  bad = dict(sd)
  bad["blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(errors.UserError, match=r"blocks\.0\.attn\.extra\.weight"):
    ca.convert_arflow(bad, config)
  missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
  with pytest.raises(errors.UserError, match=r"blocks_1/mlp/fc2/bias"):
    ca.convert_arflow(missing, config)
  with pytest.raises(errors.UserError, match="gt_proj"):
    ca.detect_config({k: v for k, v in sd.items() if "gt_proj" not in k})


def test_pos_embed_is_the_official_mae_table():
  """Our rebuilt `pos_embed` against MAE's construction written out independently."""
  side, dim = 4, 16
  ours = af.mae_sincos_2d(side, dim)
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
  rows = []
  for h in range(side):
    for w in range(side):
      a, b = w * omega, h * omega  # MAE: the first half encodes grid[0] = the column index
      rows.append(np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)]))
  np.testing.assert_allclose(ours, np.array(rows), atol=1e-6)

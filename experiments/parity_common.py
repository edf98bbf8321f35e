"""Harness pieces the `parity_<family>_official.py` scripts share.

- `git_head`, `write_rows`: the record of the MAR-line scripts (mar, xar, flowar, arflow): the
  reference checkout's commit, and the JSON written with a `quantity value` table printed.
- `small_raster_config`, `run_record`, `write_record`: the raster successors' scripts (nar, par,
  randar), which compare a small official LlamaGen-style transformer on a VQ-16 tokenizer shape:
  its arvision config, and the record (device, versions, dtype, command, rows, time).

The scripts are not a package: each puts this folder on `sys.path` to import this module.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time


def git_head(path: str) -> str:
  """The commit of the checkout at `path` ("unknown" when it is not a git checkout)."""
  try:
    return subprocess.check_output(["git", "-C", path, "rev-parse", "HEAD"], text=True).strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _write_json(out: str, rec: dict) -> None:
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(rec, f, indent=2)


def write_rows(out: str, rec: dict, rows: dict) -> dict:
  """Writes `rec` to `out` and prints the max-abs-error `rows` as a table; returns `rows`."""
  _write_json(out, rec)
  print(f"{'quantity':40s} value")
  for k, v in rows.items():
    print(f"{k:40s} {v:.3e}")
  return rows


def small_raster_config(name: str, grid: int, small: dict, **model):
  """`configs/<name>.py:smoke` with the small official model's shapes (`small`: n_layer, n_head,
  dim, vocab_size, num_classes) on a VQ-16 tokenizer shape at `grid` x `grid` codes (random
  weights: only the transformer is compared), dropouts off, `model` fields set."""
  import ml_collections as mlc  # noqa: PLC0415

  from arvision import config_util  # noqa: PLC0415

  c = mlc.ConfigDict(config_util.load_config_file(f"{name}.py:smoke").to_dict())
  tok = mlc.ConfigDict(config_util.load_config_file("tokenizer.py:llamagen_vq16").to_dict())
  tok.model.update(ch_mult=(1, 2), z_channels=8, vocab_size=small["vocab_size"], ch=32)
  tok.data.image_size = 2 * grid
  c.tokenizer.config = tok
  c.model.update(dim=small["dim"], n_layer=small["n_layer"], n_head=small["n_head"])
  c.model.update(multiple_of=256, attn_impl="xla", **model)
  c.model.update(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
  c.data.num_classes = small["num_classes"]
  c.data.image_size, c.data.channels = 2 * grid, 3
  return c


def run_record(command: str) -> dict:
  """The record's head: device, jax / torch versions, platform, dtype and the `command`."""
  import jax  # noqa: PLC0415
  import torch  # noqa: PLC0415

  rec = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "torch": torch.__version__}
  rec["platform"] = platform.platform()
  rec["dtype"] = "float32"
  rec["command"] = command
  return rec


def write_record(out: str, rec: dict) -> None:
  """Stamps `rec` with the time, prints it and writes it to `out`."""
  rec["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
  print(json.dumps(rec, indent=2))
  _write_json(out, rec)

"""Exports of a trained or converted model: safetensors (+ a JSON sidecar) and official layouts.

    arvision export --workdir runs/var --format safetensors --out runs/var_st
    arvision.load("runs/var_st")

`--format safetensors` writes `params.safetensors` (every param of the model, the frozen tokenizer
included, named by its `/`-joined path, float32) and `arvision.json` (format version, the
config, the step); `arvision.load(DIR)` reads it back into the same `Model`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from arvision import config_util, errors

SIDECAR = "arvision.json"
WEIGHTS = "params.safetensors"
FORMAT = "arvision-safetensors"


def is_safetensors_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, SIDECAR)) and os.path.isfile(os.path.join(path, WEIGHTS))


def save_safetensors(model, out: str) -> str:
  """Writes `model`'s params and config under `out` (created; existing files are replaced)."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  from arvision.convert import common  # noqa: PLC0415

  os.makedirs(out, exist_ok=True)
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in common.flatten(model.params).items()}
  save_file(flat, os.path.join(out, WEIGHTS))
  sidecar = dict(
    format=FORMAT,
    version=1,
    step=int(model.step),
    config=json.loads(config_util.to_json(model.config)),
  )
  with open(os.path.join(out, SIDECAR), "w") as f:
    json.dump(sidecar, f, indent=1)
  return out


def load_safetensors(path: str):
  from safetensors.numpy import load_file  # noqa: PLC0415

  from arvision import api  # noqa: PLC0415
  from arvision.convert import common  # noqa: PLC0415

  with open(os.path.join(path, SIDECAR)) as f:
    sidecar = json.load(f)
  if sidecar.get("format") != FORMAT or sidecar.get("version") != 1:
    raise errors.UserError(
      f"{path}/{SIDECAR}: format {sidecar.get('format')!r} version {sidecar.get('version')!r}; "
      f"this arvision reads {FORMAT!r} version 1"
    )
  config = config_util.from_json(json.dumps(sidecar["config"]))
  params = common.unflatten(load_file(os.path.join(path, WEIGHTS)))
  return api.from_params(params, config, int(sidecar.get("step", 0)))

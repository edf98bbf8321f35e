"""Tokenizers shipped with the package, so the main job skips tokenizer training.

`config.tokenizer.checkpoint = "shipped:<name>"` (e.g. `shipped:fmnist_msvq`, the default of
`configs/var.py:fmnist`) loads `arvision/tokenizers/data/tokenizer_<name>.npz`: the params of a run of
`arvision train --config configs/tokenizer.py:<name>` (EMA params when the run kept them), that
run's config and a sha of what determines the weights (model, loss, data, optim, steps, seed).

The weights are used only while `configs/tokenizer.py:<name>` still has the shipped run's values
in every field that determines weights (fields added to arvision later are not compared, as on
resume); after a config change `resolve` says which fields differ and the generator trains its
tokenizer in `WORKDIR/tokenizer` as before (`make quickstart-from-scratch` always does). Refresh the file with

    arvision train --config configs/tokenizer.py:<name> --workdir runs/tok_<name>
    python -m arvision.tokenizers.shipped --workdir runs/tok_<name> --name <name>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np
from absl import logging

from arvision import config_util, errors

PREFIX = "shipped:"
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
NAMES = ("fmnist_msvq",)
# What determines the trained weights (not logging, eval or checkpoint settings).
_SHA_KEYS = ("family", "seed", "total_steps", "model", "loss", "data", "optim")
# data fields that cannot change the weights (which metrics to compute; bad-file handling).
_DATA_NOT_IN_SHA = ("domain_metrics", "on_bad_image", "num_threads", "prefetch", "eval_batch_size")


def is_shipped(spec: str) -> bool:
  return str(spec).startswith(PREFIX)


def path(name: str) -> str:
  return os.path.join(DATA_DIR, f"tokenizer_{name}.npz")


def config_sha(config) -> str:
  d = json.loads(config_util.to_json(config))
  keep = {k: d.get(k) for k in _SHA_KEYS}
  if isinstance(keep["data"], dict):
    keep["data"] = {k: v for k, v in keep["data"].items() if k not in _DATA_NOT_IN_SHA}
  return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _name(spec: str) -> str:
  name = str(spec)[len(PREFIX) :]
  if name not in NAMES:
    raise errors.UserError(
      f"config.tokenizer.checkpoint={spec!r}: no shipped tokenizer {name!r}; accepted: "
      f"{[PREFIX + n for n in NAMES]}, a tokenizer run dir, or '' (train one in WORKDIR/tokenizer)"
    )
  return name


def load(spec: str):
  """`(tokenizer config, params)` of the shipped tokenizer `spec` ("shipped:<name>").

  Raises:
    errors.UserError: unknown name, or the file is missing from this install.
  """
  from arvision.convert.common import unflatten

  name = _name(spec)
  p = path(name)
  if not os.path.exists(p):
    raise errors.UserError(
      f"config.tokenizer.checkpoint={spec!r}: {p} is not in this install; set "
      "--config.tokenizer.checkpoint='' to train the tokenizer first"
    )
  with np.load(p) as f:
    config = config_util.from_json(str(f["__config__"]))
    params = unflatten({k: f[k] for k in f.files if not k.startswith("__")})
  return config, params


def info(spec: str) -> dict:
  """The metadata stored beside the weights: config sha, step, eval metrics, the command."""
  with np.load(path(_name(spec))) as f:
    return json.loads(str(f["__info__"]))


def _weight_fields(config) -> dict:
  """Flattened `{"model.ch": 16, ...}` of what determines the weights."""
  d = json.loads(config_util.to_json(config))
  flat = {}
  for k in _SHA_KEYS:
    v = d.get(k)
    if isinstance(v, dict):
      for kk, vv in v.items():
        if not (k == "data" and kk in _DATA_NOT_IN_SHA):
          flat[f"{k}.{kk}"] = list(vv) if isinstance(vv, tuple) else vv
    else:
      flat[k] = v
  return flat


def differences(shipped_config, wanted_config) -> list[str]:
  """Fields that determine the weights and differ. A field the shipped run's config lacks was added
  to arvision after it was trained and is not compared (the `train.check_resumable` rule): such a
  field must default to what the shipped run did (e.g. `model.dtype = "float32"`)."""
  have, want = _weight_fields(shipped_config), _weight_fields(wanted_config)
  return sorted(
    f"{k}: shipped {have.get(k)!r} vs wanted {want.get(k)!r}"
    for k in have
    if have[k] != want.get(k)
  )


def resolve(spec: str, wanted_config) -> bool:
  """Whether the shipped tokenizer `spec` was trained with `wanted_config` (the generator's
  `config.tokenizer.config`); logs why not."""
  name = _name(spec)
  if not os.path.exists(path(name)):
    logging.warning("shipped tokenizer %s is not in this install", name)
    return False
  shipped_config, _ = load(spec)
  diff = differences(shipped_config, wanted_config)
  if diff:
    logging.warning(
      "the shipped tokenizer %s was trained with another config (%s): training the tokenizer "
      "instead",
      name,
      "; ".join(diff[:5]),
    )
  return not diff


def export(workdir: str, name: str, out: str | None = None) -> str:
  """Writes the finished tokenizer run `workdir` as the shipped tokenizer `name`."""
  from arvision import checkpoint as ckpt_lib
  from arvision.convert.common import flatten

  loaded = ckpt_lib.load_params(workdir)
  config = ckpt_lib.read_config(workdir, loaded["step"])
  if config.family != "tokenizer" or loaded["step"] != config.total_steps:
    raise errors.UserError(
      f"{workdir} is not a finished tokenizer run (family {config.family!r}, step "
      f"{loaded['step']} of {config.total_steps})"
    )
  params = loaded.get("ema", loaded["params"])
  metrics = {}
  mpath = os.path.join(workdir, "eval", f"step_{loaded['step']:08d}", "metrics.json")
  if os.path.exists(mpath):
    with open(mpath) as f:
      metrics = json.load(f).get("metrics", {})
  meta = dict(
    config_sha=config_sha(config),
    step=int(loaded["step"]),
    metrics={k: metrics[k] for k in ("psnr", "ssim", "usage", "perplexity") if k in metrics},
    command=f"arvision train --config configs/tokenizer.py:{config.variant} --workdir W",
  )
  out = out or path(name)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  np.savez(out, __config__=config_util.to_json(config), __info__=json.dumps(meta), **flat)
  return out


def main():
  ap = argparse.ArgumentParser(description="Write a finished tokenizer run as a shipped tokenizer")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--name", required=True, choices=NAMES)
  ap.add_argument("--out")
  args = ap.parse_args()
  print(f"wrote {export(args.workdir, args.name, args.out)}")


if __name__ == "__main__":
  main()

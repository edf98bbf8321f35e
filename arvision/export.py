"""Exports of a trained or converted model: safetensors (+ a JSON sidecar) and official layouts.

    arvision export --workdir runs/var --format safetensors --out runs/var_st
    arvision.load("runs/var_st")

`--format official` writes the official PyTorch state dicts (VAR, LlamaGen, MAR and their
tokenizers: the inverse of `arvision/convert/`, checked by converting back).

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


def read_safetensors(path: str):
  """(params, config, step) of a safetensors export; `arvision.load(path)` makes the Model."""
  from safetensors.numpy import load_file  # noqa: PLC0415

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
  return params, config, int(sidecar.get("step", 0))


def _official_kind(config) -> str:
  if config.family == "var":
    return "var"
  if config.family == "raster":
    return "llamagen"
  if config.family == "mar":
    return "mar"
  kinds = {"msvq": "var_vae", "vq": "llamagen_vq", "kl": "mar_vae"}
  kind = kinds.get(config.model.get("type", ""))
  if kind is None:
    raise errors.UserError(
      f"--format official: no official layout for family {config.family!r}; accepted: var, "
      "raster (LlamaGen), mar and their tokenizers (msvq, vq, kl)"
    )
  return kind


def official_state_dicts(model) -> dict[str, tuple[str, dict]]:
  """`{file name: (converter kind, state dict)}` in the official layouts: the generator and, when
  the model carries one, its tokenizer. Each is checked by converting it back with the
  converters (`arvision/convert/`): every key maps, every param is covered, values identical."""
  from arvision.convert import llamagen as cl  # noqa: PLC0415
  from arvision.convert import mar as cm  # noqa: PLC0415
  from arvision.convert import var as cv  # noqa: PLC0415

  exporters = {
    "var": (cv.to_official_var, "var.pth"),
    "var_vae": (cv.to_official_vae, "var_vae.pth"),
    "llamagen": (cl.to_official_gpt, "llamagen.pt"),
    "llamagen_vq": (cl.to_official_vq, "llamagen_vq.pt"),
    "mar": (cm.to_official_mar, "mar.pth"),
    "mar_vae": (cm.to_official_vae, "mar_vae.ckpt"),
  }
  config, params = model.config, model.params
  kind = _official_kind(config)
  out = {}
  fn, name = exporters[kind]
  out[name] = (kind, fn(params, config))
  if "tokenizer" in params and kind in ("var", "llamagen", "mar"):
    tok_config = config.tokenizer.config
    tok_kind = _official_kind(tok_config)
    fn, name = exporters[tok_kind]
    out[name] = (tok_kind, fn(params["tokenizer"], tok_config))
  _check_round_trip(model, out)
  return out


def _check_round_trip(model, out) -> None:
  """Converts each exported state dict back and compares it with the model's params."""
  from arvision import families  # noqa: PLC0415
  from arvision.convert import common  # noqa: PLC0415
  from arvision.convert import llamagen as cl  # noqa: PLC0415
  from arvision.convert import mar as cm  # noqa: PLC0415
  from arvision.convert import var as cv  # noqa: PLC0415

  config = model.config
  for kind, sd in out.values():
    if kind in ("var", "llamagen", "mar"):
      back = {"var": cv.convert_var, "llamagen": cl.convert_gpt, "mar": cm.convert_mar}[kind](
        sd, config
      )
      want = {k: v for k, v in model.params.items() if k != "tokenizer"}
    else:
      tok_config = config.tokenizer.config if families.needs_tokenizer(config) else config
      back = {"var_vae": cv.convert_vae, "llamagen_vq": cl.convert_vq, "mar_vae": cm.convert_vae}[
        kind
      ](sd, tok_config)[0]
      want = model.params["tokenizer"] if "tokenizer" in model.params else model.params
    a, b = common.flatten(back), common.flatten(want)
    bad = sorted(k for k in b if k not in a or not np.array_equal(a[k], np.asarray(b[k])))
    if bad or set(a) != set(b):
      raise AssertionError(f"official {kind} export does not convert back to the params: {bad[:5]}")


def save_official(model, out: str) -> list[str]:
  """Writes the official PyTorch checkpoint(s) of `model` under directory `out` (`torch.save`
  with the wrappers the official loaders read: VAR raw state dicts, LlamaGen and the KL-16 VAE
  under "model", MAR under "model" and "model_ema")."""
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
      "--format official writes PyTorch files: pip install 'arvision[convert]'"
    ) from e
  os.makedirs(out, exist_ok=True)
  paths = []
  for name, (kind, sd) in official_state_dicts(model).items():
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}  # a writable copy
    obj = {
      "var": tensors,
      "var_vae": tensors,
      "mar": {"model": tensors, "model_ema": tensors},
    }.get(kind, {"model": tensors})
    path = os.path.join(out, name)
    torch.save(obj, path)
    paths.append(path)
  return paths

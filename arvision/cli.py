"""`arvision train|eval|sample|tokenize|convert` — thin; the logic lives in importable modules.

    arvision train  --config configs/tokenizer.py:fmnist_msvq --workdir runs/tok [--config.total_steps=N]
    arvision eval   --workdir runs/var --num_samples 2000 --out runs/var/eval \
                    [--inception_weights pt_inception-2015-12-05-6726825d.pth] [--reference ref.npz]
    arvision sample --workdir runs/var --labels 0,3,7 --out grid.png [--sample_kw cfg=2.0,top_k=100]
    arvision tokenize --workdir runs/tok --out runs/tok_codes [--views center_flip]
    arvision convert var_vae vae_ch160v4096z32.pth --out runs/var_vae
    arvision convert var var_d16.pth --vae runs/var_vae --out runs/var_d16
    arvision convert llamagen_vq vq_ds16_c2i.pt --out runs/vq16
    arvision convert llamagen c2i_L_256.pt --vae runs/vq16 --out runs/llamagen_L
    arvision convert mar_vae kl16.ckpt --out runs/kl16
    arvision convert mar checkpoint-last.pth --vae runs/kl16 --ema --out runs/mar_b
"""

from __future__ import annotations

import ast
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "eval", "sample", "tokenize", "convert")

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "path/to/config.py[:variant]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)")
_OUT = flags.DEFINE_string("out", None, "eval: output dir; sample: PNG path")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "eval: number of samples/reconstructions")
_LABELS = flags.DEFINE_string("labels", "0", "sample: comma-separated class labels")
_PER_LABEL = flags.DEFINE_integer("per_label", 8, "sample: images per label (one row each)")
_SEED = flags.DEFINE_integer("seed", 0, "sample/eval: rng seed")
_SAMPLE_KW = flags.DEFINE_string("sample_kw", "", "sampling overrides, e.g. cfg=1.5,top_k=900")
_INCEPTION_WEIGHTS = flags.DEFINE_string(
  "inception_weights",
  None,
  "eval: FID Inception weights (pytorch-fid/torch-fidelity .pth or an "
  "arvision .npz); enables FID/sFID/IS/precision/recall (rFID for tokenizers). Default: "
  "config.eval.inception_weights",
)
_REFERENCE = flags.DEFINE_string(
  "reference",
  None,
  "eval: ADM reference batch .npz (mu, sigma[, mu_s, sigma_s, arr_0]); default: "
  "config.eval.reference, or statistics of the eval split computed once and cached",
)
_EMA = flags.DEFINE_bool("ema", False, "convert mar: take the EMA weights (`model_ema`)")
_VIEWS = flags.DEFINE_enum(
  "views",
  "center_flip",
  ["center", "center_flip", "five_crop_flip"],
  "tokenize: augmented views per image (see arvision/data/tokens.py)",
)
_VAE = flags.DEFINE_string(
  "vae", None, "convert var|llamagen|mar: the converted tokenizer dir or the official checkpoint"
)


def _parse_kw(text: str) -> dict:
  out = {}
  for part in filter(None, text.split(",")):
    if "=" not in part:
      raise app.UsageError(f"--sample_kw entry {part!r} is not key=value")
    k, v = part.split("=", 1)
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def _require(flag, name):
  if flag.value is None:
    raise app.UsageError(f"--{name} is required")
  return flag.value


def _train():
  from arvision.train import train

  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/var.py:fmnist")
  train(config, _require(_WORKDIR, "workdir"))


def _eval():
  from arvision import api, evaluator

  workdir = _require(_WORKDIR, "workdir")
  model = api.load(workdir)
  out = _OUT.value or os.path.join(workdir, "eval")
  metrics = evaluator.run(
    model.family,
    model.params,
    model.config,
    workdir,
    step=model.step,
    out_dir=out,
    num_samples=_NUM_SAMPLES.value,
    sample_kw=_parse_kw(_SAMPLE_KW.value) or None,
    inception_weights=_INCEPTION_WEIGHTS.value,
    reference=_REFERENCE.value,
  )
  print({k: round(v, 4) for k, v in metrics.items()})


def _sample():
  import jax
  import numpy as np

  from arvision import api, visualize

  model = api.load(_require(_WORKDIR, "workdir"))
  labels = [int(x) for x in _LABELS.value.split(",")]
  labels = np.repeat(np.asarray(labels, np.int32), _PER_LABEL.value)
  images = model.sample(labels, jax.random.key(_SEED.value), **_parse_kw(_SAMPLE_KW.value))
  out = _OUT.value or "samples.png"
  visualize.save_grid(out, images, nrow=_PER_LABEL.value, scale=2)
  print(f"wrote {out}")


def _tokenize():
  from arvision.data import tokens

  out = _require(_OUT, "out")
  meta = tokens.tokenize(_require(_WORKDIR, "workdir"), out, views=_VIEWS.value)
  print(f"wrote {meta['splits']} to {out}; train on it with --config.data.source=tokens:{out}")


def _convert(argv):
  import importlib

  from arvision.convert import CONVERTERS

  if len(argv) != 3 or argv[1] not in CONVERTERS:
    raise app.UsageError(f"usage: arvision convert {{{'|'.join(CONVERTERS)}}} PATH --out DIR")
  module, fn = CONVERTERS[argv[1]].split(":")
  kw = {
    "var": lambda: {"vae": _require(_VAE, "vae")},
    "llamagen": lambda: {"vae": _VAE.value},
    "mar": lambda: {"vae": _require(_VAE, "vae"), "ema": _EMA.value},
  }.get(argv[1], dict)()
  out = getattr(importlib.import_module(module), fn)(argv[2], _require(_OUT, "out"), **kw)
  print(f"wrote {out}; load it with arvision.load({out!r})")


def main(argv):
  if _COMMAND in ("train", "eval", "sample", "tokenize"):
    from arvision.parallel import maybe_initialize_distributed

    # Multi-host jobs (coordinator address or a detected cluster in the environment) join here,
    # before anything touches the devices.
    if maybe_initialize_distributed():
      logging.info("jax.distributed initialised")
  if _COMMAND == "convert":
    return _convert(argv)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  {"train": _train, "eval": _eval, "sample": _sample, "tokenize": _tokenize}[_COMMAND]()


_COMMAND = None


class _QuietLibraries:
  """Keeps Orbax/TFDS/grain INFO chatter out of the console; their warnings still show."""

  def filter(self, record):
    import logging as std_logging

    noisy = ("orbax", "tensorflow_datasets", "grain", "etils")
    return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)


def run():
  global _COMMAND
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: arvision {{{'|'.join(COMMANDS)}}} [flags]\n\n{__doc__}", file=sys.stderr)
    sys.exit(2)
  _COMMAND = sys.argv[1]
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main, argv=[f"arvision {_COMMAND}"] + sys.argv[2:])


if __name__ == "__main__":
  run()

"""Config helpers: the common fields every config has, `:arg` parsing, loading and locking."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import ml_collections as mlc

from arvision import errors

# Where `configs/` lives when arvision runs from a checkout (configs can name siblings).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """Parses `"variant"` or `"variant,key=val,..."` into a ConfigDict with typed defaults.

  The first bare word (no `=`) sets `variant`. Unknown keys are errors naming the key.
  """
  out = mlc.ConfigDict(defaults)
  if not arg:
    return out
  for part in arg.split(","):
    if not part:
      continue
    if "=" not in part:
      if "variant" not in defaults:
        raise errors.UserError(
          f"config arg {part!r}: this config takes no variant; keys: {sorted(defaults)}"
        )
      out.variant = part
      continue
    key, val = part.split("=", 1)
    if key not in defaults:
      raise errors.UserError(f"config arg key {key!r} is unknown; accepted: {sorted(defaults)}")
    typ = type(defaults[key])
    if typ is bool:
      out[key] = val.lower() in ("1", "true", "yes")
    else:
      out[key] = typ(val) if defaults[key] is not None else val
  return out


def pick_variant(table: dict[str, Any], variant: str, what: str) -> Any:
  if variant not in table:
    raise errors.UserError(f"{what} variant {variant!r} is unknown; accepted: {sorted(table)}")
  return table[variant]


def set_run_length(c: mlc.ConfigDict, total_steps: int, logs: int = 20) -> None:
  """A short (CPU-sized) recipe's schedule: `total_steps`, `logs` log lines over the run and one
  checkpoint, at the end."""
  c.total_steps = int(total_steps)
  c.log_every = max(c.total_steps // logs, 1)
  c.checkpoint_every = c.total_steps


def base_config(family: str) -> mlc.ConfigDict:
  """The fields every config has. Family configs fill `model`, `data`, `optim`, `sample`."""
  c = mlc.ConfigDict()
  c.family = family
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50
  c.eval_every = 0  # 0: only at the end
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.resume_from = ""  # a checkpoint dir (step dir or workdir) to resume state from
  c.init_from = ""  # a checkpoint whose params (only) initialise the model

  c.model = mlc.ConfigDict()  # family-specific
  c.sample = mlc.ConfigDict()  # generators: default sampling settings (family.sample kwargs)

  c.data = mlc.ConfigDict()
  c.data.source = (
    "fashion_mnist"  # fashion_mnist | tfds:<name> | folder:<path> | tokens:<path> | synthetic
  )
  c.data.data_dir = (
    ""  # TFDS data_dir / cache dir ("" = ~/.cache/arvision/tfds or $ARVISION_DATA_DIR)
  )
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.batch_size = 64  # global batch size
  c.data.eval_batch_size = 256
  c.data.resize_ratio = 1.125  # VAR recipe: resize the short side to ratio*size, then crop
  c.data.random_crop = True
  c.data.hflip = False
  c.data.shuffle_seed = 0
  c.data.num_threads = 2
  c.data.prefetch = 4
  # folder: sources: an image that does not decode is "skip"ped (logged, listed in
  # WORKDIR/skipped_images.txt) or an "error".
  c.data.on_bad_image = "skip"
  # Offline domain metrics (arvision/evaluation/domain_classifiers.py): "auto" = the shipped
  # classifier trained on this source/size/channels if any (Fashion-MNIST 32x32x1: "fmnist"),
  # a shipped classifier's name, or "" for none.
  c.data.domain_metrics = "auto"

  c.optim = mlc.ConfigDict()
  c.optim.lr = 1e-3  # peak learning rate (after lr_scaling)
  c.optim.lr_scaling = "none"  # none | batch256 (lr = optim.lr * batch_size / 256)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.no_decay = (
    "bias",
    "scale",
    "norm",
  )  # path regexes without weight decay (1-D params never decay)
  c.optim.clip_norm = 1.0  # 0 = off
  c.optim.warmup_steps = 0
  c.optim.hold_steps = 0  # constant at peak after warmup
  c.optim.schedule = "cosine"  # cosine | linear | constant
  c.optim.end_lr_factor = 0.0  # final lr = end_lr_factor * peak
  c.optim.ema_decay = 0.0  # 0 = no EMA params
  # Microbatches per step (gradient accumulation inside the jitted step); must divide batch_size.
  c.optim.accum_steps = 1
  # Rematerialisation of the transformer blocks: none | block | full (docs/precision.md).
  c.remat = "none"

  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = mlc.ConfigDict(dict(strategy="dp"))

  c.eval = mlc.ConfigDict()
  # "" = the evaluator of the family's kind (generator | tokenizer | classifier), or a name in
  # arvision.evaluation.evaluate.EVALUATORS, or the dotted path of a module with `Evaluator`.
  c.eval.evaluator = ""
  c.eval.num_batches = 4  # held-out loss batches
  c.eval.num_samples = 100  # generated samples (generators) / reconstructed images (tokenizers)
  c.eval.batch_size = 100
  # Inception metrics (FID/sFID/IS/precision-recall; rFID for tokenizers) run only with weights:
  # a pytorch-fid / torch-fidelity .pth or an arvision .npz (they cannot be downloaded offline).
  c.eval.inception_weights = ""
  # An ADM reference batch .npz (mu/sigma[/mu_s/sigma_s/arr_0]); "" = statistics of the eval split.
  c.eval.reference = ""
  return c


def load_config_file(spec: str) -> mlc.ConfigDict:
  """Loads `path/to/config.py[:arg]`; a bare name resolves inside the repo's `configs/`."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path)):
    path = os.path.join(CONFIG_DIR, path)
  if not os.path.exists(path):
    raise errors.NotFound(f"config file {path!r} does not exist (from --config {spec!r})")
  name = "arvision_config_" + os.path.splitext(os.path.basename(path))[0]
  spec_ = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  config = module.get_config(arg or None)
  add_common_model_fields(config)
  config.lock()
  return config


def add_common_model_fields(config: mlc.ConfigDict) -> None:
  """Fields every family's `model` has, whatever its config file builds `model` from."""
  if "model" in config and "dtype" not in config.model:
    # Compute dtype (float32 | bfloat16); params and optimizer state stay float32.
    config.model.dtype = "float32"
  generator = config.get("family") not in ("tokenizer", "classifier")
  if "model" in config and "scan_layers" not in config.model and generator:
    # The transformer blocks as one nn.scan over stacked params (arvision.models.scan_layers).
    config.model.scan_layers = False


def to_json(config: mlc.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> mlc.ConfigDict:
  """Rebuilds a locked config from `to_json` output (tuples come back as lists)."""
  config = mlc.ConfigDict(json.loads(text))
  config.lock()
  return config

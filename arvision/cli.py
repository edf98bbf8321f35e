"""`arvision train|eval|sample|tokenize|convert` — thin; the logic lives in importable modules.

    arvision train  --config configs/tokenizer.py:fmnist_msvq --workdir runs/tok [--config.total_steps=N]
    arvision eval   --workdir runs/var --num_samples 2000 --out runs/var/eval \
                    [--inception_weights pt_inception-2015-12-05-6726825d.pth] [--reference ref.npz]
    arvision sample --workdir runs/var --labels 0,3,7 --out grid.png [--sample_kw cfg=2.0,top_k=100]
    arvision sample --model var-d16 --labels 207,360,387 --out grid.png --sample_kw cfg=1.5,top_k=900
    arvision zoo                                # the official models by name, and what is cached
    arvision demo --model var-d16 [--port 7860] # a browser app: class, knobs, grid, inpainting
    arvision export --workdir runs/var --format safetensors --out runs/var_st
    arvision export --workdir runs/var --format official --out var_d16.pth
    arvision tokenize --workdir runs/tok --out runs/tok_codes [--views center_flip]
    arvision verify --workdir runs/var          # reads every checkpoint step; reports damaged ones
    arvision convert var_vae vae_ch160v4096z32.pth --out runs/var_vae
    arvision convert var var_d16.pth --vae runs/var_vae --out runs/var_d16
    arvision convert hmar hmar-d16.pth --vae runs/var_vae --out runs/hmar_d16
    arvision convert llamagen_vq vq_ds16_c2i.pt --out runs/vq16
    arvision convert llamagen c2i_L_256.pt --vae runs/vq16 --out runs/llamagen_L
    arvision convert flexvar_vae FlexVAE.pth --out runs/flexvae
    arvision convert flexvar FlexVARd16-epo179.pth --vae runs/flexvae --out runs/flexvar_d16
    arvision convert infinity_vae infinity_vae_d32reg.pth --out runs/infinity_vae_d32
    arvision convert infinity infinity_2b_reg.pth --vae runs/infinity_vae_d32 --out runs/infinity_2b
    arvision convert mar_vae kl16.ckpt --out runs/kl16
    arvision convert mar checkpoint-last.pth --vae runs/kl16 --ema --out runs/mar_b
    arvision compile --config configs/var.py:d30 --topology v5p:4x4x8 --config.sharding.strategy=fsdp
                     [--what sample] [--json out.json] [--alternatives 4]   # needs the `aot` extra

Bad input (an unknown config field, a missing workdir, a label out of range, ...) prints one line,
`arvision <cmd>: error: <what was wrong>; <what to do>`, and exits with status 2; `--verbose` (or
ARVISION_DEBUG=1) shows the traceback too. Any other error is a bug and shows its traceback.
"""

from __future__ import annotations

import ast
import difflib
import errno
import os
import sys
import traceback
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from arvision import config_util, errors

COMMANDS = (
  "train",
  "eval",
  "sample",
  "tokenize",
  "convert",
  "verify",
  "zoo",
  "export",
  "demo",
  "compile",
)

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "path/to/config.py[:variant]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)")
_MODEL = flags.DEFINE_string(
  "model",
  None,
  "sample/eval/export/demo: instead of --workdir, a zoo name (`arvision zoo`), hf://<repo>/<file>, "
  "or a converted/exported dir; downloaded and converted once, then cached",
)
_FORMAT = flags.DEFINE_enum(
  "format",
  "safetensors",
  ["safetensors", "official"],
  "export: safetensors (+ arvision.json; arvision.load reads it) or official (the official "
  "PyTorch state dict: .pth for VAR / LlamaGen / MAR and their tokenizers)",
)
_PATCH_NUMS = flags.DEFINE_string(
  "patch_nums",
  None,
  "convert var|hmar|mvar: the scale schedule when it cannot be inferred, e.g. 1,2,4",
)
_NUM_HEADS = flags.DEFINE_integer(
  "num_heads",
  None,
  "convert llamagen|mar: attention heads (not in the weights' shapes); default: the official "
  "variant of the same size, else head dim 64",
)
_OUT = flags.DEFINE_string("out", None, "eval: output dir; sample: PNG path")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "eval: number of samples/reconstructions")
_LABELS = flags.DEFINE_string("labels", "0", "sample: comma-separated class labels")
_PER_LABEL = flags.DEFINE_integer("per_label", 8, "sample: images per label (one row each)")
_SEED = flags.DEFINE_integer("seed", 0, "sample/eval: rng seed")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "demo: address to serve on (0.0.0.0: all)")
_PORT = flags.DEFINE_integer("port", 7860, "demo: port to serve on")
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
  "tokenize: augmented views per image (see arvision/pretokenize.py)",
)
_VAE = flags.DEFINE_string(
  "vae",
  None,
  "convert var|hmar|mvar|llamagen|mar|flexvar|infinity: the converted tokenizer dir or the official checkpoint",
)
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "compile: a TPU slice, <chip>:<shape>, e.g. v5p:4x4x8, v6e:16x16, v5e:16x16"
)
_WHAT = flags.DEFINE_enum("what", "train", ["train", "sample"], "compile: the step to compile")
_JSON = flags.DEFINE_string("json", None, "compile: also write the report as JSON here")
_ALTERNATIVES = flags.DEFINE_integer(
  "alternatives",
  4,
  "compile: when the step does not fit, compile up to this many alternatives (strategies, "
  "remat, accumulation) and name the first that fits; 0: none",
)
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "show the traceback of user errors too (also: ARVISION_DEBUG=1)"
)
_NO_COMPILE_CACHE = flags.DEFINE_bool(
  "no_compile_cache",
  False,
  "train/eval/sample/tokenize/demo: do not use the persistent compilation cache (default: on, "
  "under $ARVISION_CACHE/jax; also ARVISION_COMPILE_CACHE=0)",
)


def _parse_kw(text: str) -> dict:
  out = {}
  for part in filter(None, text.split(",")):
    if "=" not in part:
      raise errors.UserError(
        f"--sample_kw entry {part!r} is not key=value; write e.g. --sample_kw cfg=2.0,top_k=100"
      )
    k, v = part.split("=", 1)
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def _require(flag, name):
  if flag.value is None:
    raise errors.UserError(f"--{name} is required; see `arvision {_COMMAND} --help`")
  return flag.value


def _train():
  from arvision.train import train

  workdir = _require(_WORKDIR, "workdir")
  config = _CONFIG.value
  if config is None:
    raise errors.UserError("--config is required, e.g. --config configs/var.py:fmnist")
  train(config, workdir)


def _load_model():
  """The model of --model (zoo name, hf:// file, dir) or --workdir."""
  from arvision import api

  if _MODEL.value and _WORKDIR.value:
    raise errors.UserError("pass one of --model and --workdir, not both")
  return api.load(_MODEL.value or _require(_WORKDIR, "workdir"))


def _eval():
  from arvision.evaluation import evaluate

  model = _load_model()
  workdir = _WORKDIR.value or _require(_OUT, "out")  # a zoo model has no workdir of its own
  sample_kw = model.check_sample_kw(_parse_kw(_SAMPLE_KW.value))
  out = _OUT.value or os.path.join(workdir, "eval")
  metrics = evaluate.run(
    model.family,
    model.params,
    model.config,
    workdir,
    step=model.step,
    out_dir=out,
    num_samples=_NUM_SAMPLES.value,
    sample_kw=sample_kw or None,
    inception_weights=_INCEPTION_WEIGHTS.value,
    reference=_REFERENCE.value,
  )
  print({k: round(v, 4) for k, v in metrics.items()})


def _sample():
  import jax
  import numpy as np

  from arvision import visualize

  model = _load_model()
  try:
    labels = [int(x) for x in _LABELS.value.split(",")]
  except ValueError:
    raise errors.UserError(
      f"--labels={_LABELS.value!r} is not a comma-separated list of class indices, e.g. 0,3,7"
    ) from None
  labels = np.repeat(np.asarray(labels, np.int32), _PER_LABEL.value)
  images = model.sample(
    labels, jax.random.key(_SEED.value), progress=True, **_parse_kw(_SAMPLE_KW.value)
  )
  out = _OUT.value or "samples.png"
  visualize.save_grid(out, images, nrow=_PER_LABEL.value, scale=2)
  print(f"wrote {out}")


def _demo():
  from arvision import demo

  if _MODEL.value and _WORKDIR.value:
    raise errors.UserError("pass one of --model and --workdir, not both")
  demo.serve(_MODEL.value or _require(_WORKDIR, "workdir"), host=_HOST.value, port=_PORT.value)


def _tokenize():
  from arvision import pretokenize

  out = _require(_OUT, "out")
  meta = pretokenize.tokenize(_require(_WORKDIR, "workdir"), out, views=_VIEWS.value)
  print(f"wrote {meta['splits']} to {out}; train on it with --config.data.source=tokens:{out}")


def _convert(argv):
  import importlib

  from arvision.convert import CONVERTERS

  if len(argv) != 3 or argv[1] not in CONVERTERS:
    raise errors.UserError(
      f"expected `arvision convert {{{'|'.join(CONVERTERS)}}} PATH --out DIR`, got "
      f"{' '.join(argv[1:]) or 'no arguments'}"
    )
  if not os.path.exists(argv[2]):
    raise errors.NotFound(
      f"{argv[2]!r} does not exist; pass the official checkpoint file to convert"
    )
  module, fn = CONVERTERS[argv[1]].split(":")
  kw = {
    "var": lambda: {
      "vae": _require(_VAE, "vae"),
      "patch_nums": [int(p) for p in _PATCH_NUMS.value.split(",")] if _PATCH_NUMS.value else None,
    },
    "hmar": lambda: {
      "vae": _require(_VAE, "vae"),
      "patch_nums": [int(p) for p in _PATCH_NUMS.value.split(",")] if _PATCH_NUMS.value else None,
    },
    "mvar": lambda: {
      "vae": _require(_VAE, "vae"),
      "patch_nums": [int(p) for p in _PATCH_NUMS.value.split(",")] if _PATCH_NUMS.value else None,
    },
    "llamagen": lambda: {"vae": _VAE.value, "num_heads": _NUM_HEADS.value},
    "par": lambda: {"vae": _VAE.value, "num_heads": _NUM_HEADS.value},
    "randar": lambda: {"vae": _VAE.value, "num_heads": _NUM_HEADS.value},
    "nar": lambda: {"vae": _VAE.value, "num_heads": _NUM_HEADS.value},
    "flexvar": lambda: {"vae": _require(_VAE, "vae")},
    "infinity": lambda: {"vae": _require(_VAE, "vae")},
    "mar": lambda: {"vae": _require(_VAE, "vae"), "ema": _EMA.value, "num_heads": _NUM_HEADS.value},
    "xar": lambda: {"vae": _require(_VAE, "vae"), "ema": _EMA.value, "num_heads": _NUM_HEADS.value},
    "flowar": lambda: {
      "vae": _require(_VAE, "vae"),
      "ema": _EMA.value,
      "num_heads": _NUM_HEADS.value,
    },
    "arflow": lambda: {"vae": _require(_VAE, "vae")},
  }.get(argv[1], dict)()
  out = getattr(importlib.import_module(module), fn)(argv[2], _require(_OUT, "out"), **kw)
  print(f"wrote {out}; load it with arvision.load({out!r})")


def _zoo():
  from arvision import hub, zoo

  rows = [
    ("name", "family", "params", "res", "FID", "IS", "eval settings", "license", "cached", "source")
  ]
  for e in zoo.ENTRIES.values():
    where = f"hf://{e.repo}/{e.filename}" if e.repo else e.url.split("?")[0]
    settings = ",".join(f"{k}={v}" for k, v in e.sample.items())
    rows.append(
      (
        e.name,
        e.family,
        e.params or "-",
        str(e.image_size),
        f"{e.fid:g}" if e.fid is not None else "-",
        f"{e.is_:g}" if e.is_ is not None else "-",
        settings or "-",
        e.license,
        hub.cached(e) or "-",
        where,
      )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
  print(
    f"\nconverted models are cached under {hub.cache_root()}; downloads under "
    f"{hub.hf_cache_dir()}; load one with arvision.load(NAME) or `arvision sample --model NAME`"
  )


def _export():
  from arvision import export

  model = _load_model()
  out = _require(_OUT, "out")
  if _FORMAT.value == "safetensors":
    export.save_safetensors(model, out)
    print(f"wrote {out}; load it with arvision.load({out!r})")
  else:
    for path in export.save_official(model, out):
      print(f"wrote {path}")


def _verify():
  from arvision import checkpoint

  workdir = _require(_WORKDIR, "workdir")
  dirs = [workdir] + [
    os.path.join(workdir, sub)  # a generator's tokenizer stage lives in WORKDIR/tokenizer
    for sub in ("tokenizer",)
    if os.path.isdir(checkpoint.checkpoint_dir(os.path.join(workdir, sub)))
  ]
  damaged = 0
  for path in dirs:
    for row in checkpoint.verify(path):
      where = checkpoint.checkpoint_dir(path)
      if row["ok"] is None:
        print(f"{where}/{row['ignored']}: ignored (not a committed step)")
      elif row["ok"]:
        digest = "files match their digest" if row["digest"] else "no digest to check files"
        print(
          f"{where}/{row['step']}: OK ({row['arrays']} arrays, {row['bytes'] / 1e6:.1f} MB, "
          f"{digest})"
        )
      else:
        damaged += 1
        print(f"{where}/{row['step']}: DAMAGED: {row['error']}")
  if damaged:
    print(
      f"{damaged} damaged step(s); `arvision train` resumes from the newest step that restores "
      "and moves newer damaged ones aside",
      file=sys.stderr,
    )
    sys.exit(1)


def _compile():
  import json
  import platform
  import resource

  from arvision.parallel import aot

  config = _CONFIG.value
  if config is None:
    raise errors.UserError("--config is required, e.g. --config configs/var.py:d30")
  topology = _require(_TOPOLOGY, "topology")
  report = aot.compile_step(config, topology, what=_WHAT.value)
  if not report["fits"] and _WHAT.value == "train" and _ALTERNATIVES.value > 0:
    print(aot.format_report(report), flush=True)
    print(f"does not fit: compiling up to {_ALTERNATIVES.value} alternatives ...", flush=True)
    report["alternatives"] = aot.find_fit(config, topology, max_tries=_ALTERNATIVES.value)
    print("\n".join(aot.format_report(report).splitlines()[-len(report["alternatives"]) - 2 :]))
  else:
    print(aot.format_report(report))
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    out = aot.to_json(report)
    # The compile host: `compile_s` is wall time, which a busy host inflates; the process's CPU
    # seconds and peak RSS say what the compile itself cost.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["host"] = dict(
      cpu=platform.processor() or platform.machine(),
      cores=os.cpu_count(),
      load_avg_1min=os.getloadavg()[0],
      process_cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
      peak_rss_gib=round(usage.ru_maxrss / 2**20, 2),
    )
    out["command"] = "arvision " + " ".join(sys.argv[1:])
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {_JSON.value}")


def _default_to_cpu():
  """Without JAX_PLATFORMS and without accelerator device files, run on the CPU directly: an
  installed libtpu (the `aot` extra, for `arvision compile`) would otherwise try to open a TPU
  and print its failure on every command."""
  if os.environ.get("JAX_PLATFORMS") is not None:
    return
  import glob

  if any(
    glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
  ):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # read at import: update the live config too
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def main(argv):
  if _COMMAND in ("train", "eval", "sample", "tokenize"):
    from arvision.parallel import maybe_initialize_distributed

    # Multi-host jobs (coordinator address or a detected cluster in the environment) join here,
    # before anything touches the devices.
    if maybe_initialize_distributed():
      logging.info("jax.distributed initialised")
  if _COMMAND in ("train", "eval", "sample", "tokenize", "demo"):
    from arvision import compile_cache

    if _NO_COMPILE_CACHE.value:  # also for `arvision.load` and anything this process starts
      os.environ[compile_cache.ENV] = "0"
    compile_cache.enable()  # a rerun loads what this one compiles
  try:
    if _COMMAND == "convert":
      return _convert(argv)
    if len(argv) > 1:
      raise errors.UserError(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    commands = {
      "train": _train,
      "eval": _eval,
      "sample": _sample,
      "tokenize": _tokenize,
      "verify": _verify,
      "zoo": _zoo,
      "export": _export,
      "demo": _demo,
      "compile": _compile,
    }
    commands[_COMMAND]()
  except errors.UserError as e:
    _fail(e)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
      raise
    # Storage trouble outside a checkpoint save (metrics, eval outputs): the user can fix it.
    _fail(
      f"{e}; free some space (or fix the filesystem) and rerun the same command: the run "
      "resumes from its newest complete checkpoint",
    )


def _verbose(argv=None) -> bool:
  if os.environ.get("ARVISION_DEBUG", "") not in ("", "0"):
    return True
  if argv is not None:  # before the flags are parsed
    return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for a in argv)
  return _VERBOSE.value


def _fail(e: Exception | str, argv=None):
  """A user error: one line on stderr, exit status 2 (with the traceback under --verbose)."""
  if _verbose(argv):
    traceback.print_exc()
  msg = " ".join(str(e).split())
  print(f"arvision {_COMMAND}: error: {msg}", file=sys.stderr)
  sys.exit(2)


def _config_args(argv):
  """(index in argv of the --config value or None, that value, [field of each --config.<field>])."""
  at, spec, overrides = None, None, []
  for i, a in enumerate(argv):
    if a in ("--config", "-config") and i + 1 < len(argv):
      at, spec = i + 1, argv[i + 1]
    elif a.startswith(("--config=", "-config=")):
      at, spec = i, a.split("=", 1)[1]
    elif a.startswith(("--config.", "-config.")):
      overrides.append(a.split("config.", 1)[1].split("=", 1)[0])
  return at, spec, overrides


def _check_config(argv: list[str]) -> list[str]:
  """Loads `--config` and checks every `--config.<field>` override before ml_collections does,
  so that a missing file or a misspelt field is one line naming it (ml_collections raises a
  traceback). A bare `name.py[:arg]` resolves inside the repo's `configs/`."""
  at, spec, overrides = _config_args(argv)
  if spec is None:
    if overrides:
      raise errors.UserError(
        f"--config.{overrides[0]} given without --config; add --config path/to/config.py"
      )
    return argv
  path, sep, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(config_util.CONFIG_DIR, path)):
    path = os.path.join(config_util.CONFIG_DIR, path)
    argv = list(argv)
    argv[at] = (argv[at].split("=", 1)[0] + "=" if "=" in argv[at] else "") + path + sep + arg
  if not os.path.isfile(path):
    here = config_util.CONFIG_DIR
    shipped = (
      sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
    )
    raise errors.NotFound(
      f"config file {path!r} does not exist (from --config {spec!r}); pass a config .py file "
      f"with an optional :variant, e.g. configs/var.py:fmnist"
      + (f" (shipped in {here}: {', '.join(shipped)})" if shipped else "")
    )
  config = config_util.load_config_file(path + sep + arg)
  for field in overrides:
    node, done = config, []
    for key in field.split("."):
      if not hasattr(node, "keys"):
        raise errors.UserError(
          f"--config.{field}: {'.'.join(done)} is a {type(node).__name__}, not a group of fields"
        )
      if key not in node:
        where = ".".join(done) or "the top level"
        near = difflib.get_close_matches(key, list(node.keys()), n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise errors.UserError(
          f"--config.{field}: {spec} has no field {'.'.join(done + [key])!r}; {hint}fields at "
          f"{where}: {', '.join(sorted(node.keys()))}"
        )
      node, done = node[key], done + [key]
  return argv


def _parse_flags(argv):
  """absl's flag parsing, with bad flags and configs reported as one line (exit status 2)."""
  try:
    argv = _check_config(argv)
    return flags.FLAGS(argv)
  except (errors.UserError, flags.Error) as e:
    _fail(e, argv)


_COMMAND = None


class _QuietLibraries:
  """Keeps Orbax/TFDS/grain INFO chatter out of the console; their warnings still show."""

  def filter(self, record):
    import logging as std_logging

    noisy = ("orbax", "tensorflow_datasets", "grain", "etils")
    if not any(n in record.pathname for n in noisy):
      return True
    if record.exc_info and not _verbose():
      # Orbax logs a failed background save with its traceback; arvision reports the failure
      # as one line (`checkpoint.Checkpointer`), so keep only the library's message line.
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING


def run():
  global _COMMAND
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: arvision {{{'|'.join(COMMANDS)}}} [flags]\n\n{__doc__}", file=sys.stderr)
    sys.exit(2)
  _COMMAND = sys.argv[1]
  _default_to_cpu()
  # Orbax leaves an un-awaited coroutine behind when a save fails; the failure is reported.
  warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main, argv=[f"arvision {_COMMAND}"] + sys.argv[2:], flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

"""The first training losses of every committed Fashion-MNIST recipe: a check that a refactor
changed no numbers.

    python experiments/recipe_losses.py --out experiments/results/recipe_losses_baseline.json
    python experiments/recipe_losses.py --compare experiments/results/recipe_losses_baseline.json

Each recipe is built as `arvision train` builds it: the config file's own seed, data pipeline
(`data.make_train_iter`), mesh and sharded step (`arvision.train.build`); then `--steps` steps
run and every step's loss is recorded at full precision. A generator's tokenizer is NOT a trained
one: it is the seeded initial state that `arvision train` would start that tokenizer config from
(its own `train.build(...).init`), so the check needs no tokenizer training. The generators'
losses are therefore a fingerprint of the code path, not the recipe's real learning curve.

`--compare BASELINE.json` reruns the baseline's recipes and step count, writes its own JSON
(default experiments/results/recipe_losses_after.json), prints the largest absolute difference of
the losses per recipe, and exits 1 if any loss differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

from arvision import config_util, data, families, parallel, train

# The committed Fashion-MNIST recipes (configs/*.py variants), tokenizers first.
RECIPES = (
  "tokenizer.py:fmnist_msvq",
  "tokenizer.py:fmnist_vq",
  "tokenizer.py:fmnist_kl",
  "var.py:fmnist",
  "raster.py:fmnist",
  "mar.py:fmnist",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _initial_tokenizer(config, mesh):
  """(family, params) of a generator's tokenizer at the state its own training would start from."""
  # `arvision train` hands the generator the tokenizer config read back from the checkpoint's
  # JSON; the round trip turns tuples into lists, so do the same.
  tok_config = config_util.from_json(config_util.to_json(config.tokenizer.config))
  with config.unlocked():
    config.tokenizer.config = tok_config
  tok_family = families.build(tok_config)
  setup = train.build(tok_config, tok_family, {}, mesh)
  state = setup.init(setup.init_rng)
  return tok_family, jax.device_get(state.get("ema", state["params"]))


def recipe_losses(spec: str, steps: int, overrides: dict | None = None) -> dict:
  """Losses of the first `steps` train steps of the recipe `spec` (`file.py:variant`), with
  dotted config `overrides` (e.g. `{"model.dtype": "bfloat16"}`, experiments/precision_check.py)."""
  config = config_util.load_config_file(os.path.join(ROOT, "configs", spec))
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value  # the config is locked: a misspelt field raises
  mesh = parallel.make_mesh(config.mesh)
  frozen, tokenizer = {}, None
  if families.needs_tokenizer(config):
    tokenizer, frozen["tokenizer"] = _initial_tokenizer(config, mesh)
  family = families.build(config, tokenizer=tokenizer)
  train_iter = data.make_train_iter(config.data, seed=config.seed)
  setup = train.build(config, family, frozen, mesh)
  state = setup.init(setup.init_rng)
  losses = []
  t0 = time.time()
  for _ in range(steps):
    batch = parallel.global_batch(next(train_iter), mesh)
    state, metrics = setup.step(state, batch)
    losses.append(float(jax.device_get(metrics["loss"])))
  return dict(
    family=config.family,
    seed=config.seed,
    batch_size=config.data.batch_size,
    tokenizer="seeded init of config.tokenizer.config (not trained)" if tokenizer else None,
    losses=losses,
    seconds=round(time.time() - t0, 1),
  )


def _provenance(argv) -> dict:
  def git(*args):
    try:
      out = subprocess.run(
        ["git", "-C", ROOT, *args], capture_output=True, text=True, check=True, timeout=30
      )
      return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  import flax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  status = git("status", "--porcelain", "--untracked-files=no")
  return dict(
    device=str(jax.devices()[0]),
    device_count=jax.device_count(),
    cpu=cpu,
    platform=platform.platform(),
    versions=dict(
      python=platform.python_version(),
      jax=jax.__version__,
      flax=flax.__version__,
      optax=optax.__version__,
      numpy=np.__version__,
    ),
    git_commit=git("rev-parse", "HEAD"),
    git_dirty=None if status is None else bool(status),
    command=" ".join([os.path.basename(sys.executable), *argv]),
    time=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC",
  )


def main(argv=None):
  argv = sys.argv if argv is None else argv
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--recipes", default="", help=f"comma-separated subset of {','.join(RECIPES)}")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--compare", default="", help="a JSON this program wrote before: rerun, diff")
  ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. which tree)")
  ap.add_argument("--out", default="", help="where the JSON goes")
  args = ap.parse_args(argv[1:])

  baseline = None
  if args.compare:
    with open(args.compare) as f:
      baseline = json.load(f)
  if args.recipes:
    recipes = tuple(args.recipes.split(","))
  elif baseline is not None:
    recipes = tuple(baseline["recipes"])
  else:
    recipes = RECIPES
  unknown = [r for r in recipes if r not in RECIPES]
  if unknown:
    raise SystemExit(f"--recipes: {unknown} unknown; accepted: {','.join(RECIPES)}")
  steps = baseline["steps"] if baseline is not None and args.steps == 20 else args.steps
  out = args.out or (
    os.path.join(ROOT, "experiments/results/recipe_losses_after.json") if baseline else ""
  )
  if not out:
    raise SystemExit("--out is required without --compare (where the JSON goes)")

  result = dict(
    what=f"per-step training losses of the first {steps} steps of the Fashion-MNIST recipes",
    steps=steps,
    label=args.label,
    provenance=_provenance(argv),
    recipes={},
  )
  for spec in recipes:
    print(f"{spec}: building and running {steps} steps", flush=True)
    result["recipes"][spec] = recipe_losses(spec, steps)
    print(f"  losses[:3]={result['recipes'][spec]['losses'][:3]}", flush=True)

  failed = False
  if baseline is not None:
    result["compared_with"] = args.compare
    result["max_abs_diff"] = {}
    for spec in recipes:
      ref = baseline["recipes"].get(spec, {}).get("losses")
      now = result["recipes"][spec]["losses"]
      if ref is None or len(ref) != len(now):
        diff = None
      else:
        diff = float(np.max(np.abs(np.asarray(now) - np.asarray(ref))))
      result["max_abs_diff"][spec] = diff
      same = diff == 0.0
      failed |= not same
      shown = "missing in the baseline / other length" if diff is None else f"{diff:.3e}"
      print(f"{spec:28s} max |loss - baseline| = {shown}  {'same' if same else 'DIFFERENT'}")

  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

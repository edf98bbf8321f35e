"""Where a quickstart training step's time goes: data pipeline, tokenizer encode, model forward,
forward+backward, optimizer, host sync, and how many cores the loop keeps busy.

    python experiments/profile_quickstart.py --out experiments/results/profile_quickstart.json
    python experiments/profile_quickstart.py --config configs/var.py:fmnist,... --label after

Each part is jitted (or, for data, iterated) on its own and timed over `--steps` calls after a
warm-up, on the config's real shapes; the tokenizer has random weights (speed does not depend on
them). "tokens" rows read a `tokens:` directory of random codes with the real record layout
(`arvision tokenize`'s), written to a temporary dir. Core utilisation = process CPU seconds (all
threads: XLA, grain) / wall seconds of the same loop; 2.0 means both cores of a 2-core machine.
Wall times on a shared machine are inflated: the JSON records the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arvision import config_util, data, families, parallel  # noqa: E402
from arvision import train as train_lib  # noqa: E402
from arvision.data import tokens as tokens_lib  # noqa: E402


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed(fn, n: int, warmup: int = 2) -> dict:
  """Mean wall ms per call of `fn` (which must block) and the cores it kept busy."""
  for _ in range(warmup):
    fn()
  c0, t0 = _cpu_s(), time.perf_counter()
  for _ in range(n):
    fn()
  wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
  return dict(
    ms=round(1e3 * wall / n, 2),
    cpu_ms=round(1e3 * cpu / n, 2),  # CPU time of all threads: what a step costs on a busy machine
    cores_busy=round(cpu / max(wall, 1e-9), 2),
  )


def write_random_tokens(directory: str, meta: dict, n: int, num_views: int, seed: int = 0) -> None:
  """A `tokens:` dir of `n` random records per split with `arvision tokenize`'s layout."""
  from array_record.python import array_record_module

  rng = np.random.default_rng(seed)
  seq = int(np.prod(meta["grid"]))
  os.makedirs(directory, exist_ok=True)
  for split in ("train", "test"):
    w = array_record_module.ArrayRecordWriter(
      os.path.join(directory, f"{split}.array_record"), "group_size:1"
    )
    for i in range(n):
      codes = rng.integers(0, meta["vocab_size"], (num_views, seq)).astype(np.uint16)
      w.write(np.int32(i % 10).tobytes() + codes.tobytes())
    w.close()
  meta = dict(meta, views="center_flip", num_views=num_views, splits={"train": n, "test": n})
  with open(os.path.join(directory, tokens_lib.META), "w") as f:
    json.dump(meta, f)


def profile(config, steps: int, tmp: str, step_only: bool = False) -> dict:
  tok_cfg = config_util.from_json(config_util.to_json(config.tokenizer.config))
  tok_family = families.build(tok_cfg)
  tok_params = tok_family.init(jax.random.key(0))
  family = families.build(config, tokenizer=tok_family)
  frozen = {"tokenizer": tok_params}
  mesh = parallel.make_mesh(config.mesh)
  b = int(config.data.batch_size)
  out = dict(batch_size=b)

  # --- data pipeline: images (the default source) and pre-extracted codes ----------------------
  img_iter = data.make_train_iter(config.data, seed=0)
  if not step_only:
    out["data_images"] = timed(lambda: next(img_iter), steps * 2)
  if tok_family.type not in ("msvq", "vq"):  # continuous latents: no `tokens:` source
    tok_iter = tok_data = None
  else:
    side = tok_family.image_size // tok_family.downsample
    grid = [sum(p * p for p in tok_family.patch_nums)] if tok_family.type == "msvq" else [side] * 2
    tok_dir = os.path.join(tmp, "tokens")
    meta = dict(grid=grid, vocab_size=int(tok_family.vocab_size), dtype="uint16")
    write_random_tokens(tok_dir, meta, 6000, 2)
    tok_data = config_util.from_json(config_util.to_json(config.data))
    with tok_data.unlocked():
      tok_data.source = f"tokens:{tok_dir}"
    tok_iter = data.make_train_iter(tok_data, seed=0)
  if step_only:
    return _steps(config, family, frozen, mesh, img_iter, tok_iter, tok_data, steps, out)
  if tok_iter is not None:
    out["data_tokens"] = timed(lambda: next(tok_iter), steps * 2)

  img_batch = jax.tree.map(jnp.asarray, next(img_iter))
  # The model-only rows run on codes (pre-extracted) when the tokenizer is discrete, else on
  # images (the encode is then part of them; the `encode` row says how much).
  model_batch = img_batch if tok_iter is None else jax.tree.map(jnp.asarray, next(tok_iter))

  # --- tokenizer encode (what a `tokens:` source removes from every step) ------------------------
  enc_fn = tok_family.encode_codes if tok_iter is not None else tok_family.encode_f
  encode = jax.jit(lambda p, x: enc_fn(p, x))
  out["encode"] = timed(lambda: encode(tok_params, img_batch["image"]).block_until_ready(), steps)

  # --- the model alone, on codes ---------------------------------------------------------------
  params = family.init(jax.random.key(1))
  rng = jax.random.key(2)

  def loss_fn(p, batch):
    return family.loss({**p, **frozen}, dict(batch, step=jnp.int32(0)), rng, True)[0]

  fwd = jax.jit(loss_fn)
  out["forward"] = timed(lambda: fwd(params, model_batch).block_until_ready(), steps)
  grad = jax.jit(jax.value_and_grad(loss_fn))
  out["forward_backward"] = timed(lambda: jax.block_until_ready(grad(params, model_batch)), steps)
  tx, _ = __import__("arvision.optim", fromlist=["make"]).make(
    config.optim, config.total_steps, config.data.batch_size
  )
  opt = tx.init(params)

  @jax.jit
  def opt_step(p, o, g):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  out["optimizer"] = timed(lambda: jax.block_until_ready(opt_step(params, opt, params)), steps)

  _steps(config, family, frozen, mesh, img_iter, tok_iter, tok_data, steps, out)
  s = out["step_image"]["ms"]
  out["share_of_image_step"] = dict(
    encode=round(out["encode"]["ms"] / s, 3),
    forward_backward=round(out["forward_backward"]["ms"] / s, 3),
    optimizer=round(out["optimizer"]["ms"] / s, 3),
    data_images=round(out["data_images"]["ms"] / s, 3),
    host_sync=round(max(s - out["step_image_async"]["ms"], 0.0) / s, 3),
  )
  # The same shares in CPU time (all threads): stable on a busy machine, where wall times are not.
  c = out["step_image"]["cpu_ms"]
  out["cpu_share_of_image_step"] = {
    k: round(out[k]["cpu_ms"] / c, 3)
    for k in ("encode", "forward", "forward_backward", "optimizer", "data_images")
  }
  return out


def _steps(config, family, frozen, mesh, img_iter, tok_iter, tok_data, steps, out):
  """The loop's real step (train.build), images vs codes; sync every step vs not."""
  for name, batch_src in (("image", img_iter), ("tokens", tok_iter)):
    if batch_src is None:
      continue
    dcfg = config.data if name == "image" else tok_data
    example = jax.tree.map(jnp.asarray, next(batch_src))
    setup = train_lib.build(config, family, frozen, mesh, example=example)
    state = [setup.init(setup.init_rng)]
    batch = parallel.global_batch(example, mesh)

    def step_only(setup=setup, state=state, batch=batch):
      state[0], m = setup.step(state[0], batch)
      jax.block_until_ready(m)

    out[f"step_{name}"] = timed(step_only, steps)

    def step_no_sync(setup=setup, state=state, batch=batch):
      state[0], m = setup.step(state[0], batch)
      return m

    def run_no_sync(n=steps):
      for _ in range(n):
        m = step_no_sync()
      jax.block_until_ready(m)

    r = timed(lambda: run_no_sync(), 1, warmup=0)
    out[f"step_{name}_async"] = dict(ms=round(r["ms"] / steps, 2), cores_busy=r["cores_busy"])

    # The loop as train.py runs it: next batch from the pipeline, step, fetch last step's metrics.
    it = data.make_train_iter(dcfg, seed=1)
    pending = [None]

    def loop_step(setup=setup, state=state, it=it, pending=pending):
      b_ = parallel.global_batch(next(it), mesh)
      state[0], m = setup.step(state[0], b_)
      if pending[0] is not None:
        jax.device_get(pending[0])
      pending[0] = m

    out[f"loop_{name}"] = timed(loop_step, steps)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/var.py:fmnist")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--label", default="", help="e.g. before / after")
  ap.add_argument("--out", default="experiments/results/profile_quickstart.json")
  ap.add_argument("--step_only", action="store_true", help="only the loop's step rows")
  ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (json values)")
  args = ap.parse_args()
  config = config_util.load_config_file(args.config)
  config = config_util.from_json(config_util.to_json(config))
  with config.unlocked():
    for kv in args.set:
      k, v = kv.split("=", 1)
      node = config
      *head, last = k.split(".")
      for h in head:
        node = node[h]
      node[last] = json.loads(v)
  with tempfile.TemporaryDirectory() as tmp:
    result = profile(config, args.steps, tmp, args.step_only)
  record = dict(
    label=args.label,
    config=args.config,
    overrides=args.set,
    steps=args.steps,
    command="python experiments/profile_quickstart.py " + " ".join(sys.argv[1:]),
    load_avg_1min=os.getloadavg()[0],
    cpu_count=os.cpu_count(),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
    device=str(jax.devices()[0]),
    num_devices=jax.device_count(),
    **result,
  )
  print(json.dumps(record, indent=1))
  old = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      old = json.load(f)
  old[args.label or "run"] = record
  with open(args.out, "w") as f:
    json.dump(old, f, indent=1)


if __name__ == "__main__":
  main()

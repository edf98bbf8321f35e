"""THE train/eval loop, for every family and for tokenizers.

    arvision train --config configs/tokenizer.py:fmnist_msvq --workdir runs/tok

Resume order: the workdir's own latest checkpoint > `config.resume_from` > `config.init_from` >
scratch. Re-running the same command continues with the identical batch sequence and loss curve
(data iterator state is checkpointed; the step rng is `fold_in(seed, step)`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import config_util, data, families, optim, parallel
from arvision.metrics_writer import MetricsWriter

# Fields that may change when a run resumes (everything else must match the saved config).
RESUMABLE_FIELDS = (
  "total_steps",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "keep_checkpoints",
  "eval",
  "resume_from",
  "init_from",
)


class NonFiniteLossError(RuntimeError):
  pass


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def check_resumable(saved, config) -> None:
  """A workdir belongs to one experiment: refuse to continue it with a different model or data."""
  a = {
    k: v for k, v in _flatten(saved.to_dict()).items() if k.split(".")[0] not in RESUMABLE_FIELDS
  }
  b = {
    k: v
    for k, v in _flatten(json.loads(config_util.to_json(config))).items()
    if k.split(".")[0] not in RESUMABLE_FIELDS
  }
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  diff = sorted(k for k in set(a) | set(b) if norm(a.get(k)) != norm(b.get(k)))
  if diff:
    shown = ", ".join(f"{k}: saved {a.get(k)!r} vs now {b.get(k)!r}" for k in diff[:8])
    raise ValueError(
      f"the workdir already holds a run with a different config ({shown}). Only "
      f"{RESUMABLE_FIELDS} may change on resume; use a new --workdir. Nothing was changed."
    )


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    with contextlib.suppress(ValueError):  # not the main thread: no handler
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, *_):
    logging.warning("SIGTERM: saving a checkpoint and exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------------
# Stages: a generator trains (or loads) its tokenizer first.
# ---------------------------------------------------------------------------------------------------
def prepare_tokenizer(config, workdir: str):
  """Returns (tokenizer family, tokenizer params) for a generator config; trains it if needed."""
  tok_cfg = config.tokenizer
  path = tok_cfg.checkpoint
  if not path:
    path = os.path.join(workdir, "tokenizer")
    train(config_util.from_json(config_util.to_json(tok_cfg.config)), path)
  tok_config = ckpt_lib.read_config(path)
  loaded = ckpt_lib.load_params(path)
  params = loaded.get("ema", loaded["params"])
  with config.unlocked():  # record the tokenizer that was really used
    config.tokenizer.config = tok_config
  return families.build(tok_config), params


def build_family(config, workdir: str):
  """The family plus the frozen params the loop supplies to it (e.g. {"tokenizer": ...})."""
  frozen = {}
  tokenizer = None
  if families.needs_tokenizer(config):
    tokenizer, frozen["tokenizer"] = prepare_tokenizer(config, workdir)
  return families.build(config, tokenizer=tokenizer), frozen


# ---------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------
def train(config, workdir: str, *, stop_after: int | None = None) -> dict:
  """Trains `config` in `workdir` up to `config.total_steps`; returns the final eval metrics.

  Args:
    stop_after: stop (with a checkpoint) after this many steps of this call, as on preemption.
  """
  os.makedirs(workdir, exist_ok=True)
  cfg_path = os.path.join(workdir, "config.json")
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  if ckpt.latest_step() is not None and os.path.exists(cfg_path):
    with open(cfg_path) as f:
      check_resumable(config_util.from_json(f.read()), config)

  # --- Family (and its tokenizer stage) ---------------------------------------------------------
  family, frozen = build_family(config, workdir)
  if jax.process_index() == 0:
    with open(cfg_path, "w") as f:
      f.write(config_util.to_json(config))
  writer = MetricsWriter(workdir)

  # --- Mesh and data ----------------------------------------------------------------------------
  mesh = parallel.make_mesh(config.mesh)
  train_iter = data.make_train_iter(config.data, seed=config.seed)
  example = data.input_spec(config.data)

  # --- Optimizer and sharded train state --------------------------------------------------------
  tx, lr_fn = optim.make(config.optim, config.total_steps, config.data.batch_size)
  use_ema = config.optim.ema_decay > 0

  def init_state(rng):
    params = family.init(rng, example)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt=tx.init(params))
    if use_ema:
      state["ema"] = params
    return state

  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  abstract = jax.eval_shape(init_state, init_rng)
  shardings = parallel.state_shardings(abstract, mesh, config.sharding)
  # Frozen params (e.g. the tokenizer) live in the state, so checkpoints are self-contained and
  # the step receives them as arguments (never as constants baked into the compiled program).
  abstract["frozen"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), frozen)
  shardings["frozen"] = jax.tree.map(lambda _: parallel.replicated(mesh), frozen)

  # --- Restore ----------------------------------------------------------------------------------
  if ckpt.latest_step() is not None:
    state = ckpt.restore(_with_shardings(abstract, shardings), data_iter=train_iter)
    logging.info("resumed from %s at step %d", ckpt.directory, int(state["step"]))
  elif config.resume_from:
    other = ckpt_lib.Checkpointer(config.resume_from, keep=1)
    state = other.restore(_with_shardings(abstract, shardings), data_iter=train_iter)
    logging.info("resumed from config.resume_from=%s", config.resume_from)
  else:
    trainable = {k: v for k, v in shardings.items() if k != "frozen"}
    state = jax.jit(init_state, out_shardings=trainable)(init_rng)
    state["frozen"] = jax.device_put(frozen, shardings["frozen"])
    if config.init_from:
      state["params"] = _init_from(config.init_from, state["params"])
      if use_ema:
        state["ema"] = state["params"]

  # --- Update step ------------------------------------------------------------------------------
  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(step_rng, step)
    batch = dict(batch, step=step)

    def loss_fn(params):
      return family.loss({**params, **state["frozen"]}, batch, rng, True)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=step + 1, params=params, opt=opt)
    if use_ema:
      new["ema"] = optax.incremental_update(params, state["ema"], 1 - config.optim.ema_decay)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=lr_fn(step))
    return new, metrics

  p_step = jax.jit(
    train_step,
    in_shardings=(shardings, parallel.batch_sharding(mesh)),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )

  # --- Loop -------------------------------------------------------------------------------------
  from arvision import evaluator  # late: evaluation imports the loop for its domain classifier

  start = int(state["step"])
  total = config.total_steps
  last_saved = start
  pending, acc, t0 = None, [], time.time()
  last_good = None

  def drain():
    nonlocal pending
    if pending is not None:
      step, m = pending
      m = jax.device_get(m)
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(
          f"loss became {m['loss']} at step {step}; stopped. The last good checkpoint "
          f"(step {last_saved}) in {ckpt.directory} is kept. Lower optim.lr, raise "
          f"optim.warmup_steps or check the data."
        )
      acc.append(m)
      pending = None

  def save(step):
    nonlocal last_saved
    drain()  # never save a state whose loss was not checked
    ckpt.save(step, state, config, data_iter=train_iter)
    last_saved = step

  from tqdm import tqdm

  bar = tqdm(
    total=total,
    initial=start,
    desc=f"train {config.family}",
    unit="step",
    disable=jax.process_index() != 0,
    dynamic_ncols=True,
    mininterval=0.5 if sys.stderr.isatty() else 30,
  )  # keep CI logs short
  eval_metrics = {}
  try:
    with _Preemption() as preempt:
      for step in range(start, total):
        batch = parallel.global_batch(next(train_iter), mesh)
        state, metrics = p_step(state, batch)
        drain()
        pending = (step + 1, metrics)
        bar.update(1)
        done = step + 1
        if done % config.log_every == 0 or done == total:
          drain()
          mean = {k: float(np.mean([m[k] for m in acc])) for k in acc[0]}
          mean["steps_per_s"] = len(acc) / max(time.time() - t0, 1e-9)
          writer.write(done, mean, prefix="train/")
          bar.set_postfix(loss=f"{mean['loss']:.4f}")
          acc, t0 = [], time.time()
        if config.checkpoint_every and done % config.checkpoint_every == 0:
          save(done)
        if config.eval_every and done % config.eval_every == 0 and done != total:
          evaluator.run(family, _eval_params(state), config, workdir, step=done, writer=writer)
        stopping = preempt.requested or (stop_after is not None and done - start >= stop_after)
        if stopping:
          save(done)
          logging.info("stopped at step %d (checkpoint saved)", done)
          return {}
      drain()
      if last_saved != total and start < total:
        save(total)
      last_good = total
  finally:
    bar.close()
    ckpt.close()
    writer.flush()
  if last_good is not None and start < total:
    eval_metrics = evaluator.run(
      family, _eval_params(state), config, workdir, step=total, writer=writer
    )
  writer.close()
  return eval_metrics


def _with_shardings(abstract, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _eval_params(state):
  return {**state.get("ema", state["params"]), **state["frozen"]}


def _init_from(path: str, params):
  """Loads matching params from another checkpoint (fine-tuning); shapes must match."""
  loaded = ckpt_lib.load_params(path)
  src = loaded.get("ema", loaded["params"])
  flat_src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(src)}

  def pick(key_path, leaf):
    key = jax.tree_util.keystr(key_path)
    if key not in flat_src:
      raise ValueError(f"config.init_from={path!r}: checkpoint has no param {key}")
    if flat_src[key].shape != leaf.shape:
      raise ValueError(
        f"config.init_from: {key} has shape {flat_src[key].shape}, model expects {leaf.shape}"
      )
    return jax.device_put(jnp.asarray(flat_src[key], leaf.dtype), leaf.sharding)

  return jax.tree_util.tree_map_with_path(pick, params)

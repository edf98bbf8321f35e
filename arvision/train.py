"""THE train/eval loop, for every family and for tokenizers.

    arvision train --config configs/tokenizer.py:fmnist_msvq --workdir runs/tok

Resume order: the workdir's own latest checkpoint > `config.resume_from` > `config.init_from` >
scratch. Re-running the same command continues with the identical batch sequence and loss curve
(data iterator state is checkpointed; the step rng is `fold_in(seed, step)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from arvision import config_util, data, errors, families, optim, parallel, precision
from arvision.family import Family
from arvision.metrics_writer import MetricsWriter
from arvision.models import scan_layers
from arvision.workdir_lock import WorkdirLock

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
  # The layout, not the math: a checkpoint restores onto any mesh / strategy (resharding restore).
  "mesh",
  "sharding",
  # Rematerialisation changes what the backward pass recomputes, not the numbers.
  "remat",
)


class NonFiniteLossError(errors.UserError, RuntimeError):
  """The loss became NaN/Inf: the run stops; the last good checkpoint is kept."""


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def check_resumable(saved, config) -> None:
  """A workdir belongs to one experiment: refuse to continue it with a different model or data.

  A field absent from the saved config was added to arvision after the run started: the run
  could not have set it, so it takes the current value (logged).
  """
  a = {
    k: v for k, v in _flatten(saved.to_dict()).items() if k.split(".")[0] not in RESUMABLE_FIELDS
  }
  b = {
    k: v
    for k, v in _flatten(json.loads(config_util.to_json(config))).items()
    if k.split(".")[0] not in RESUMABLE_FIELDS
  }
  new = sorted(k for k in set(b) - set(a) if not any(k.startswith(p + ".") for p in a))
  if new:
    logging.info("config fields newer than the saved run: %s", {k: b[k] for k in new})
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  diff = sorted(k for k in set(a) | set(b) if k not in new and norm(a.get(k)) != norm(b.get(k)))
  if diff:
    shown = ", ".join(f"{k}: saved {a.get(k)!r} vs now {b.get(k)!r}" for k in diff[:8])
    raise errors.UserError(
      f"the workdir already holds a run with a different config ({shown}). Only "
      f"{RESUMABLE_FIELDS} may change on resume; use a new --workdir. Nothing was changed."
    )


class _Preemption:
  """Decides, the same way on every process, the step after which the run saves and exits.

  A preemption notice (SIGTERM) reaches one host, not all of them, and the save is collective:
  every process must stop after the same step. Multi-process with JAX's preemption service (on
  by default after `jax.distributed.initialize`), JAX's own SIGTERM handler propagates the notice
  and Orbax's `CheckpointManager.reached_preemption(step)` returns True on every process at the
  same agreed step. Without the service but with several processes, each process's SIGTERM
  flag is all-gathered every step (any process preempted: all stop). A single process keeps its
  flag to itself. `reached(step)` must be called after every step, on every process.
  """

  def __init__(self, manager):
    self._manager = manager
    self._requested = False
    self._previous = None
    self._service = _preemption_service_active()

  def __enter__(self):
    if not self._service:  # the service's handler must stay: installing ours would replace it
      with contextlib.suppress(ValueError):  # not the main thread: no handler
        self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, *_):
    logging.warning("SIGTERM: saving a checkpoint and exiting")
    self._requested = True

  def reached(self, step: int) -> bool:
    if self._service:
      return self._manager.reached_preemption(step)
    if jax.process_count() == 1:
      return self._requested
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(self._requested))))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _preemption_service_active() -> bool:
  """JAX's preemption sync manager runs (jax.distributed initialised with the service on)."""
  try:  # private state; if it moves, the all-gathered SIGTERM flag is still correct (slower)
    from jax._src.distributed import global_state
  except ImportError:
    return False
  client = getattr(global_state, "client", None)
  return client is not None and getattr(global_state, "preemption_sync_manager", None) is not None


# ---------------------------------------------------------------------------------------------------
# Stages: a generator trains (or loads) its tokenizer first.
# ---------------------------------------------------------------------------------------------------
def prepare_tokenizer(config, workdir: str):
  """Returns (tokenizer family, tokenizer params) for a generator config; trains it if needed."""
  from arvision.tokenizers import shipped

  tok_cfg = config.tokenizer
  path = tok_cfg.checkpoint
  if shipped.is_shipped(path):
    if shipped.resolve(path, tok_cfg.config):  # else (config changed): train it below
      tok_config, params = shipped.load(path)
      with config.unlocked():
        config.tokenizer.config = tok_config
      return families.build(tok_config), params
    path = ""
  if not path:
    path = os.path.join(workdir, "tokenizer")
    train(config_util.from_json(config_util.to_json(tok_cfg.config)), path)
  loaded = ckpt_lib.load_params(path)
  tok_config = ckpt_lib.read_config(path, loaded["step"])
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
    _check_tokens_match(config, frozen["tokenizer"])
  family = families.build(config, tokenizer=tokenizer)
  frozen.update(family.load_frozen(workdir))  # e.g. a fine-tuning stage's frozen base model
  return family, frozen


def _check_tokens_match(config, tokenizer_params) -> None:
  """Pre-extracted codes (`tokens:<dir>`) must come from the tokenizer the model decodes with."""
  name, _, arg = str(config.data.source).partition(":")
  if name != "tokens":
    return
  from arvision.data import tokens

  meta = tokens.read_meta(arg)
  if meta["tokenizer_digest"] != tokens.tokenizer_digest(tokenizer_params):
    raise errors.UserError(
      f"config.data.source={config.data.source!r} holds codes of the tokenizer in "
      f"{meta['tokenizer_workdir']!r} (params digest {meta['tokenizer_digest']}), but this run's "
      f"tokenizer differs; set --config.tokenizer.checkpoint to the tokenizer that wrote them"
    )


# ---------------------------------------------------------------------------------------------------
# Sharded state and the jitted step (also what experiments/bench_sharding.py drives).
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """Everything the loop (or a benchmark) needs to run sharded steps of one config.

  Attributes:
    mesh: the device mesh.
    rules: the strategy's rules table (`parallel.get_rules(config.sharding.strategy)`).
    abstract_state: `{"step", "params", "opt", "ema"?, "frozen"}` as `ShapeDtypeStruct`s carrying
      their shardings (the restore target).
    shardings: the same tree of `NamedSharding`s.
    batch_sharding: sharding of every batch leaf (leading dim over the rules' `batch` axes).
    init: jitted `rng -> state`, created directly sharded (frozen params placed by their rules).
    step: jitted, state-donating `(state, batch) -> (state, metrics)`.
    init_rng, step_rng: the run's rngs (`split(key(config.seed))`); step k uses
      `fold_in(step_rng, k)`.
    tx, lr_fn: the optimizer and its learning-rate schedule.
  """

  mesh: jax.sharding.Mesh
  rules: tuple
  abstract_state: dict
  shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  init: object
  step: object
  init_rng: jax.Array
  step_rng: jax.Array
  tx: optax.GradientTransformation
  lr_fn: object


def _frozen_shardings(family, frozen, rules, mesh):
  """Frozen params (e.g. `frozen["tokenizer"]`) are split by the rules of the family that owns
  them (`family.<key>`, e.g. `family.tokenizer`); leaves without names are replicated."""
  out = {}
  for key, tree in frozen.items():
    owner = getattr(family, key, None)
    logical = owner.logical_axes(None) if isinstance(owner, Family) else {}
    out[key] = parallel.tree_shardings(tree, logical, rules, mesh)
  return out


def _check_batch_splits(config, mesh, accum: int) -> None:
  """The (micro-)batch must split evenly over the mesh's batch axes; say so before tracing."""
  shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
  micro = int(config.data.batch_size) // accum
  if micro % shards:
    raise errors.UserError(
      f"config.data.batch_size={config.data.batch_size} (micro-batch {micro} with "
      f"optim.accum_steps={accum}) does not split over the {shards} devices of the mesh's batch "
      f"axes {dict((a, int(mesh.shape[a])) for a in parallel.BATCH_AXES)}: use a batch size "
      f"divisible by {shards}, or fewer devices (on CPU arvision makes 2 by default; "
      "XLA_FLAGS=--xla_force_host_platform_device_count=1 makes 1)"
    )


def build(config, family, frozen: dict, mesh=None, *, example=None) -> Setup:
  """Builds the sharded train state and step of `config` for `family` on `mesh`.

  Args:
    config: the run's config (`optim`, `sharding.strategy`, `seed`, `total_steps`, `data`).
    family: the built family.
    frozen: params the loop supplies and never trains (`build_family`'s second output).
    mesh: defaults to `parallel.make_mesh(config.mesh)`.
    example: a batch with the training shapes (defaults to `data.input_spec(config.data)`).
  """
  precision.validate(config)  # model.dtype, remat, optim.accum_steps: fail before any tracing
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  rules = parallel.get_rules(config.sharding.strategy)
  example = data.input_spec(config.data) if example is None else example
  tx, lr_fn = optim.make(config.optim, config.total_steps, config.data.batch_size)
  use_ema = config.optim.ema_decay > 0
  accum = precision.accum_steps(config)
  _check_batch_splits(config, mesh, accum)
  rep = parallel.replicated(mesh)

  def init_state(rng):
    params = family.init(rng, example)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt=tx.init(params))
    if use_ema:
      state["ema"] = params
    return state

  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  abstract = jax.eval_shape(init_state, init_rng)
  params_sh = parallel.tree_shardings(abstract["params"], family.logical_axes(example), rules, mesh)
  shardings = dict(
    step=rep, params=params_sh, opt=parallel.match_by_path(abstract["opt"], params_sh, mesh)
  )
  if use_ema:
    shardings["ema"] = params_sh
  # Frozen params (e.g. the tokenizer) live in the state, so checkpoints are self-contained and
  # the step receives them as arguments (never as constants baked into the compiled program).
  abstract["frozen"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), frozen)
  shardings["frozen"] = _frozen_shardings(family, abstract["frozen"], rules, mesh)
  trainable = {k: v for k, v in shardings.items() if k != "frozen"}
  init_jit = jax.jit(init_state, out_shardings=trainable)

  def init(rng):
    state = init_jit(rng)
    # Fresh buffers (via host): the step donates the state, which must not delete the caller's
    # frozen arrays (a device_put onto a sharding over the same device may alias them).
    host = jax.tree.map(
      lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", False) else x, frozen
    )
    state["frozen"] = jax.device_put(host, shardings["frozen"])
    return state

  def train_step(state, batch):
    # The rules context is active while this is traced: `logical.constrain` takes effect.
    with parallel.use_rules(mesh, rules):
      step = state["step"]
      rng = jax.random.fold_in(step_rng, step)
      batch = dict(batch, step=step)

      def loss_fn(params, batch, rng):
        return family.loss({**params, **state["frozen"]}, batch, rng, True)

      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      if accum == 1:
        (loss, metrics), grads = grad_fn(state["params"], batch, rng)
      else:
        (loss, metrics), grads = _accumulate(grad_fn, state["params"], batch, rng, accum)
      updates, opt = tx.update(grads, state["opt"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      new = dict(state, step=step + 1, params=params, opt=opt)
      if use_ema:
        new["ema"] = optax.incremental_update(params, state["ema"], 1 - config.optim.ema_decay)
      metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=lr_fn(step))
      return new, metrics

  batch_sh = parallel.batch_sharding(mesh)
  step = jax.jit(
    train_step,
    in_shardings=(shardings, batch_sh),
    out_shardings=(shardings, rep),
    donate_argnums=(0,),
  )
  return Setup(
    mesh=mesh,
    rules=rules,
    abstract_state=_with_shardings(abstract, shardings),
    shardings=shardings,
    batch_sharding=batch_sh,
    init=init,
    step=step,
    init_rng=init_rng,
    step_rng=step_rng,
    tx=tx,
    lr_fn=lr_fn,
  )


def _accumulate(grad_fn, params, batch, rng, accum: int):
  """`grad_fn` over `accum` microbatches inside the step (`lax.scan`): the mean of their losses,
  metrics and gradients, which for a loss that is a mean over equal-sized examples is the loss and
  gradient of the whole batch (`tests/test_precision.py`).

  Microbatch i holds examples i, i + accum, i + 2 accum, ...: `[B] -> [B / accum, accum]` keeps the
  batch sharding of the leading axis, so every microbatch is spread over the same devices. Scalar
  leaves (the step) go to every microbatch; microbatch i draws its randomness from
  `fold_in(rng, i)`.
  """
  sizes = {x.shape[0] for x in jax.tree.leaves(batch) if np.ndim(x) > 0}

  def split(x):
    if np.ndim(x) == 0:
      return None
    return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)

  if len(sizes) != 1:
    raise errors.UserError(f"batch leaves have different leading sizes {sorted(sizes)}")
  scalars = {k: v for k, v in batch.items() if np.ndim(v) == 0}
  micro = {k: split(v) for k, v in batch.items() if np.ndim(v) > 0}
  zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro) | scalars, rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)

  def body(total, xs):
    i, mb = xs
    out = grad_fn(params, dict(mb, **scalars), jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, total, out), None

  total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
  return jax.tree.map(lambda x: x / accum, total)


# ---------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------
def train(config, workdir: str, *, stop_after: int | None = None) -> dict:
  """Trains `config` in `workdir` up to `config.total_steps`; returns the final eval metrics.

  Holds the workdir's lock (`workdir_lock.py`) while it runs: one writer per workdir.

  Args:
    stop_after: stop (with a checkpoint) after this many steps of this call, as on preemption.
  """
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:  # multi-host: process 0 holds the lock for the run
    return _train(config, workdir, stop_after)
  with WorkdirLock(workdir):
    return _train(config, workdir, stop_after)


def _train(config, workdir: str, stop_after: int | None) -> dict:
  cfg_path = os.path.join(workdir, "config.json")
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  if ckpt.latest_step() is not None and os.path.exists(cfg_path):
    with open(cfg_path) as f:
      check_resumable(config_util.from_json(f.read()), config)

  # --- Family (and its tokenizer stage) ---------------------------------------------------------
  family, frozen = build_family(config, workdir)
  if jax.process_index() == 0:  # one writer; Orbax writes checkpoints collectively
    # Atomically: the other processes of a resumed multi-host run read it meanwhile (above).
    with open(cfg_path + ".tmp", "w") as f:
      f.write(config_util.to_json(config))
    os.replace(cfg_path + ".tmp", cfg_path)
  writer = MetricsWriter(workdir)

  # --- Mesh, data, sharded state and step -------------------------------------------------------
  mesh = parallel.make_mesh(config.mesh)
  train_iter = data.make_train_iter(config.data, seed=config.seed)
  setup = build(config, family, frozen, mesh)
  use_ema = config.optim.ema_decay > 0

  # --- Restore (onto this run's mesh and strategy, whatever the checkpoint was saved under) -----
  if ckpt.latest_step() is not None:
    # The newest step that restores; damaged newer steps are moved aside with a warning.
    state, _ = ckpt.restore_newest(setup.abstract_state, data_iter=train_iter)
    logging.info("resumed from %s at step %d", ckpt.directory, int(state["step"]))
  elif config.resume_from:
    other = ckpt_lib.Checkpointer(config.resume_from, keep=1)
    state = other.restore(setup.abstract_state, data_iter=train_iter)
    logging.info("resumed from config.resume_from=%s", config.resume_from)
  else:
    state = setup.init(setup.init_rng)
    if config.init_from:
      state["params"] = _init_from(config.init_from, state["params"])
      if use_ema:
        state["ema"] = state["params"]
  p_step = setup.step

  # --- Loop -------------------------------------------------------------------------------------
  from arvision.evaluation import evaluate

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
  failing = False
  try:
    with _Preemption(ckpt.manager) as preempt:
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
          if jax.process_index() == 0 and (skipped := data.sources.write_skipped_images(workdir)):
            mean["skipped_images"] = skipped  # folder: images that did not decode (listed)
          writer.write(done, mean, prefix="train/")
          bar.set_postfix(loss=f"{mean['loss']:.4f}")
          acc, t0 = [], time.time()
        if config.checkpoint_every and done % config.checkpoint_every == 0:
          save(done)
        if config.eval_every and done % config.eval_every == 0 and done != total:
          evaluate.run(family, _eval_params(state), config, workdir, step=done, writer=writer)
        preempted = preempt.reached(done)  # every process, every step (an agreed step)
        stopping = preempted or (stop_after is not None and done - start >= stop_after)
        if stopping:
          if last_saved != done:
            save(done)
          logging.info(
            "%s at step %d (checkpoint saved)", "preempted" if preempted else "stopped", done
          )
          return {}
      drain()
      if last_saved != total and start < total:
        save(total)
      last_good = total
  except BaseException:
    failing = True
    raise
  finally:
    bar.close()
    ckpt.close()
    # A full disk fails the metrics flush too; the error already propagating says more.
    with contextlib.suppress(OSError) if failing else contextlib.nullcontext():
      writer.flush()
  if last_good is not None and start < total:
    eval_metrics = evaluate.run(
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
  # Unrolled blocks (e.g. converted official weights) into a scanned model, or the reverse.
  src = scan_layers.to_layout(dict(src), params)
  flat_src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(src)}

  def pick(key_path, leaf):
    key = jax.tree_util.keystr(key_path)
    if key not in flat_src:
      raise errors.UserError(f"config.init_from={path!r}: checkpoint has no param {key}")
    if flat_src[key].shape != leaf.shape:
      raise errors.UserError(
        f"config.init_from: {key} has shape {flat_src[key].shape}, model expects {leaf.shape}"
      )
    return jax.device_put(jnp.asarray(flat_src[key], leaf.dtype), leaf.sharding)

  return jax.tree_util.tree_map_with_path(pick, params)

"""The Orbax layer: train state + data iterator + config, saved together, restored onto any mesh.

Layout: `WORKDIR/checkpoints/<step>/{state, data, config}` (Orbax commits each step atomically:
it writes `<step>.orbax-checkpoint-tmp-*` and renames it, so a half-written step is never picked
up). `state` is `{"step", "params", "opt", "frozen", "ema"?}`. A params-only export (what
`arvision convert` writes) is the same layout with `state = {"step", "params", "frozen"}` and no
`data` item.

Atomic commits do not protect a committed step that was damaged later (a disk error, a copy or
sync mistake). Every read here therefore goes through `restore_newest`: when the newest step does
not restore but an older one does, the failing steps are moved aside to
`<step>.damaged-<time>` (never deleted) with a one-line warning each, and the older step is used.
When no step restores, nothing is moved (the cause is then more likely the code or the config
than the files) and a `CheckpointError` lists what was tried. `verify` reads every step.
Orbax keeps no checksum of array bytes, so steps saved here also get a file digest
(`checkpoint_digest.py`) that every read checks first.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from arvision import checkpoint_digest, config_util, errors

CHECKPOINT_DIR = "checkpoints"
DAMAGED = ".damaged-"  # a step moved aside: `<step>.damaged-<UTC time>`


def checkpoint_dir(path: str) -> str:
  """Accepts a workdir or its `checkpoints/` dir."""
  path = os.path.abspath(path)
  if os.path.basename(path.rstrip("/")) == CHECKPOINT_DIR:
    return path
  return os.path.join(path, CHECKPOINT_DIR)


def committed_steps(path: str) -> list[int]:
  """Ascending steps under `path` (a workdir or its checkpoints dir) that Orbax committed.

  Uncommitted saves (`<step>.orbax-checkpoint-tmp-*`) and steps moved aside are not steps.
  """
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    return []
  return sorted(
    int(d)
    for d in os.listdir(directory)
    if d.isdigit() and os.path.exists(os.path.join(directory, d, "state"))
  )


def _reason(exc: BaseException) -> str:
  """One line saying why a step failed: the root cause (Orbax wraps TensorStore's error in a
  long message about the array's spec; the cause says which file and what was wrong)."""
  seen = {id(exc)}
  while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
    seen.add(id(inner))
    exc = inner
  text = " ".join(str(exc).split())
  text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
  return text if len(text) <= 300 else text[:297] + "..."


def move_aside(path: str, step: int) -> str:
  """Renames step `step` to `<step>.damaged-<UTC time>` next to it; returns the new path."""
  directory = checkpoint_dir(path)
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  dest = os.path.join(directory, f"{step}{DAMAGED}{stamp}")
  n = 1
  while os.path.exists(dest):  # two moves within a second
    dest = os.path.join(directory, f"{step}{DAMAGED}{stamp}-{n}")
    n += 1
  os.rename(os.path.join(directory, str(step)), dest)
  return dest


def _no_checkpoint(path: str) -> errors.NotFound:
  directory = checkpoint_dir(path)
  if not os.path.exists(path):
    what = f"{path!r} does not exist"
  elif not os.path.isdir(directory):
    what = f"{path!r} holds no arvision checkpoints (expected {directory}/<step>/)"
  else:
    aside = sorted(d for d in os.listdir(directory) if DAMAGED in d)
    what = f"{directory} holds no complete checkpoint step" + (
      f" (moved aside as damaged: {', '.join(aside)})" if aside else ""
    )
  return errors.NotFound(
    f"{what}; pass the --workdir of a run (`arvision train --workdir`) or the --out dir of "
    "`arvision convert`"
  )


def restore_newest(path: str, restore_step: Callable[[int], Any]) -> tuple[Any, int]:
  """`(restore_step(step), step)` for the newest step of `path` that restores.

  Steps newer than the one that restores are moved aside as damaged (see the module docstring);
  when none restores, nothing is moved and a `CheckpointError` names every step tried and why.
  """
  steps = committed_steps(path)
  if not steps:
    raise _no_checkpoint(path)
  directory = checkpoint_dir(path)
  failed = []
  for step in reversed(steps):
    try:
      checkpoint_digest.check(os.path.join(directory, str(step)))
      out = restore_step(step)
    except Exception as e:  # noqa: BLE001 -- a damaged file surfaces as many exception types
      failed.append((step, _reason(e)))
      logging.warning(
        "checkpoint step %d in %s does not restore (%s); trying an older step",
        step,
        directory,
        failed[-1][1],
      )
      continue
    for bad, _ in failed:
      logging.warning(
        "moved damaged checkpoint step %d aside to %s (nothing deleted); using step %d, the "
        "newest step that restores",
        bad,
        move_aside(directory, bad) if jax.process_index() == 0 else "<moved by process 0>",
        step,
      )
    return out, step
  tried = "; ".join(f"step {s}: {r}" for s, r in failed)
  raise errors.CheckpointError(
    f"no checkpoint step in {directory} restores ({tried}); nothing was moved or deleted. "
    "Check that this arvision version wrote them, run `arvision verify --workdir`, or restore "
    "the directory from a copy"
  )


class Checkpointer:
  """Keeps the newest `keep` checkpoints of one run; saves asynchronously."""

  def __init__(self, path: str, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(path)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
      ),
    )
    self._failed = False  # a save failed and was reported
    # Steps this process saved whose digest is not written yet (written once Orbax commits them,
    # in a background thread: it reads the files back).
    self._undigested: set[int] = set()
    self._digester = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-digest")
    self._digests: list[concurrent.futures.Future] = []

  def _digest_committed(self) -> None:
    if jax.process_index() != 0:
      return
    for step in sorted(self._undigested & set(committed_steps(self.directory))):
      self._undigested.discard(step)
      self._digests.append(
        self._digester.submit(checkpoint_digest.write, os.path.join(self.directory, str(step)))
      )

  def _finish_digests(self, wait: bool = True) -> None:
    pending = []
    for fut in self._digests:
      if not wait and not fut.done():
        pending.append(fut)
        continue
      try:
        fut.result()
      except OSError as e:  # e.g. keep-N deleted the step meanwhile; the step itself is fine
        logging.warning("no digest written for a checkpoint step in %s: %s", self.directory, e)
    self._digests = pending

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _save_failed(self, e: BaseException) -> errors.CheckpointError | None:
    """A `CheckpointError` when `e` is a storage failure (disk full, permissions, ...), else None
    (a bug: it keeps its traceback). Async saves report a failure at the next save or wait, so
    the message does not name a step; the reason names the file."""
    if not _is_storage_error(e):
      return None
    self._failed = True
    kept = committed_steps(self.directory)
    full = any(m in str(x) for x in _chain(e) for m in ("No space left", "Disk quota"))
    full = full or any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for x in _chain(e))
    return errors.CheckpointError(
      f"saving a checkpoint to {self.directory} failed ({_reason(e)}); the newest complete step "
      f"({kept[-1] if kept else 'none'}) is kept.{' Free some space, then' if full else ''} "
      "rerun the same command to resume from it"
    )

  def save(self, step: int, state, config, data_iter=None) -> None:
    """Saves (asynchronously); an OSError (disk full, ...) becomes a `CheckpointError`."""
    items = dict(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(json.loads(config_util.to_json(config))),
    )
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # the previous async save's failure surfaces here too
      if (failed := self._save_failed(e)) is None:
        raise
      raise failed from e
    self._undigested.add(step)
    self._digest_committed()  # the previous save has committed by now
    self._finish_digests(wait=False)

  def restore(self, abstract_state, step: int | None = None, data_iter=None):
    """Restores `state` onto the shardings of `abstract_state` (and the iterator in place).

    Without `step`: the newest step that restores (damaged newer steps are moved aside).
    """
    if step is None:
      return self.restore_newest(abstract_state, data_iter)[0]
    return self._restore(step, abstract_state, data_iter)

  def _restore(self, step: int, abstract_state, data_iter):
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_newest(self, abstract_state, data_iter=None) -> tuple[Any, int]:
    """`(state, step)` of the newest step that restores (see `restore_newest`)."""
    try:
      return restore_newest(
        self.directory, lambda step: self._restore(step, abstract_state, data_iter)
      )
    finally:
      self.manager.reload()  # forget steps moved aside (keep-N must not try to delete them)

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      if (failed := self._save_failed(e)) is None:
        raise
      raise failed from e
    self._digest_committed()
    self._finish_digests()

  def close(self) -> None:
    if self._failed:  # already reported; do not bury that error under the same one
      with contextlib.suppress(Exception):
        self.manager.close()
      self._digester.shutdown(wait=True)
      return
    try:
      self.wait()
    finally:
      self.manager.close()
      self._digester.shutdown(wait=True)


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _is_storage_error(e: BaseException) -> bool:
  """An OSError anywhere in the chain, or TensorStore's report of one (a ValueError whose text
  carries `os_error_code` or a status such as RESOURCE_EXHAUSTED, as TensorStore 0.1 writes)."""
  marks = ("os_error_code", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "No space left")
  return any(isinstance(x, OSError) or any(m in str(x) for m in marks) for x in _chain(e))


def read_config(path: str, step: int | None = None):
  """The config saved with `step` (default: the newest step whose config reads) under `path`."""
  directory = checkpoint_dir(path)

  def read(s):
    with open(os.path.join(directory, str(s), "config", "metadata")) as f:
      return config_util.from_json(f.read())

  if step is not None:
    return read(step)
  steps = committed_steps(path)
  if not steps:
    raise _no_checkpoint(path)
  for s in reversed(steps):
    try:
      return read(s)
    except (OSError, ValueError) as e:
      logging.warning("config of checkpoint step %d in %s does not read: %s", s, directory, e)
  raise errors.CheckpointError(f"no checkpoint step in {directory} has a readable config")


def _read_state(directory: str, step: int):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(directory, str(step), "state"))


def load_params(path: str, keys=("params", "frozen", "ema")) -> dict:
  """Host copies of selected state entries of the newest step under `path` that restores."""
  directory = checkpoint_dir(path)
  state, step = restore_newest(path, lambda s: _read_state(directory, s))
  out = {k: state[k] for k in keys if k in state and state[k] is not None}
  out["step"] = step
  return out


def verify(path: str) -> list[dict]:
  """Reads every committed step under `path` (state arrays, config, data-iterator state).

  Returns one dict per step, oldest first: `{"step", "ok", "arrays", "bytes", "error", "digest"}`
  (`digest`: the files matched a digest written at save time; False: the step has none), plus one
  `{"step": None, "ok": None, "ignored": name}` per uncommitted or moved-aside directory.
  Nothing is moved or changed.
  """
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise _no_checkpoint(path)
  report = []
  for step in committed_steps(directory):
    row = dict(step=step, ok=True, arrays=0, bytes=0, error="", digest=False)
    try:
      row["digest"] = checkpoint_digest.check(os.path.join(directory, str(step)))
      leaves = jax.tree.leaves(_read_state(directory, step))
      row["arrays"] = len(leaves)
      row["bytes"] = int(sum(np.asarray(x).nbytes for x in leaves))  # reads every array
      read_config(directory, step)
      data_dir = os.path.join(directory, str(step), "data")
      for name in sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []:
        if name.endswith(".json"):
          with open(os.path.join(data_dir, name)) as f:
            json.load(f)
    except Exception as e:  # noqa: BLE001 -- report every failure, whatever its type
      row.update(ok=False, error=_reason(e))
    report.append(row)
  steps = {str(s) for s in committed_steps(directory)}
  for name in sorted(os.listdir(directory)):
    if name not in steps and os.path.isdir(os.path.join(directory, name)):
      report.append(dict(step=None, ok=None, ignored=name))
  return report


def save_export(path: str, params, frozen, config, step: int = 0) -> None:
  """Writes a params-only checkpoint (for converted weights) that `arvision.load` reads."""
  ckpt = Checkpointer(path, keep=1, async_save=False)
  ckpt.save(step, dict(step=step, params=params, frozen=frozen), config)
  ckpt.close()

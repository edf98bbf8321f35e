"""The Orbax layer: train state + data iterator + config, saved together, restored onto any mesh.

Layout: `WORKDIR/checkpoints/<step>/{state, data, config}` (Orbax commits each step atomically; a
half-written step is never picked up). `state` is `{"step", "params", "opt", "frozen", "ema"?}`.
A params-only export (what `arvision convert` writes) is the same layout with
`state = {"step", "params", "frozen"}` and no `data` item.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from arvision import config_util

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(path: str) -> str:
  """Accepts a workdir or its `checkpoints/` dir."""
  path = os.path.abspath(path)
  if os.path.basename(path.rstrip("/")) == CHECKPOINT_DIR:
    return path
  return os.path.join(path, CHECKPOINT_DIR)


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

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, config, data_iter=None) -> None:
    items = dict(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(json.loads(config_util.to_json(config))),
    )
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, step: int | None = None, data_iter=None):
    """Restores `state` onto the shardings of `abstract_state` (and the iterator in place)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _latest_step_dir(path: str) -> tuple[str, int]:
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"{path!r} holds no arvision checkpoints (expected {directory}/<step>/); train with "
      f"`arvision train --workdir` or convert official weights with `arvision convert`"
    )
  steps = [
    int(d)
    for d in os.listdir(directory)
    if d.isdigit() and os.path.exists(os.path.join(directory, d, "state"))
  ]
  if not steps:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint step")
  step = max(steps)
  return os.path.join(directory, str(step)), step


def read_config(path: str):
  """The config saved with the newest checkpoint under `path` (a workdir or export dir)."""
  step_dir, _ = _latest_step_dir(path)
  with open(os.path.join(step_dir, "config", "metadata")) as f:
    return config_util.from_json(f.read())


def load_params(path: str, keys=("params", "frozen", "ema")) -> dict:
  """Host (numpy) copies of selected state entries of the newest checkpoint under `path`."""
  step_dir, step = _latest_step_dir(path)
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(step_dir, "state"))
  out = {k: state[k] for k in keys if k in state and state[k] is not None}
  out["step"] = step
  return jax.tree.map(lambda x: x, out)


def save_export(path: str, params, frozen, config, step: int = 0) -> None:
  """Writes a params-only checkpoint (for converted weights) that `arvision.load` reads."""
  ckpt = Checkpointer(path, keep=1, async_save=False)
  ckpt.save(step, dict(step=step, params=params, frozen=frozen), config)
  ckpt.close()

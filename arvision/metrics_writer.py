"""Metrics to `WORKDIR/metrics.jsonl` (one JSON object per line, with `step`) and TensorBoard."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else None


class MetricsWriter:
  """Writes on process 0 only; other processes get a no-op writer."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter  # lazy: pulls in protobuf

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    if not self.active:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      s = _scalar(v)
      if s is None:
        continue
      row[prefix + k] = s if math.isfinite(s) else str(s)
      if self._tb is not None:
        self._tb.add_scalar(prefix + k, s, int(step))
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]

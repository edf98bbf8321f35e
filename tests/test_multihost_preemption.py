"""Multi-host preemption: two `arvision train` processes (jax.distributed on localhost, one CPU
device each) share a workdir; SIGTERM reaches one of them only. Both must stop after the same
step, save it collectively, exit 0, and a restart must continue the loss curve of an
uninterrupted two-process run exactly."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from arvision import checkpoint, metrics_writer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, total_steps, cache_dir, service=True):
  """Starts the two processes of one job; returns their Popen objects (process 0 first).

  `service=False` turns JAX's preemption service off: the loop then all-gathers each process's
  SIGTERM flag every step instead."""
  port = _free_port()
  procs = []
  for pid in (0, 1):
    env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="",  # one CPU device per process
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(pid),
      # The second and third jobs reuse the first one's compilations (the test's own cache).
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      JAX_ENABLE_PREEMPTION_SERVICE=str(service).lower(),
    )
    cmd = [sys.executable, "-m", "arvision.cli", "train", "--config"]
    cmd += [os.path.join(HERE, "toy_family.py"), "--workdir", workdir]
    # The toy config's learning rate is constant: total_steps changes nothing but where it stops.
    cmd += [f"--config.total_steps={total_steps}", "--config.checkpoint_every=0"]
    cmd += ["--config.log_every=1", "--config.eval_every=0"]
    log = f"{workdir}.{time.monotonic_ns()}.p{pid}.log"  # a file: a full pipe would block
    with open(log, "w") as f:
      procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
    procs[-1].log = log
  return procs


def _output(proc) -> str:
  with open(proc.log) as f:
    return f.read()


def _finish(procs, timeout=900):
  """Waits for every process; all must exit 0. On a failure or timeout, kills the rest (SIGKILL:
  JAX's preemption handler turns SIGTERM into a notice) and shows every process's output."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      failed = any(p.returncode not in (None, 0) for p in procs)
      assert not failed and time.time() < deadline, "a process failed or the job timed out"
      time.sleep(0.1)
  except AssertionError as e:
    for p in procs:
      p.kill()
      p.wait()
    outs = [_output(p) for p in procs]
    raise AssertionError(f"{e}:\n" + "\n---\n".join(o[-3000:] for o in outs)) from None
  outs = [_output(p) for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-4000:]
  return outs


def _losses(workdir):
  rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.parametrize(
  "service", [True, pytest.param(False, marks=pytest.mark.slow, id="no_service")]
)
def test_sigterm_on_one_host_stops_all_at_one_step_and_resumes_exactly(tmp_path, service):
  cache = str(tmp_path / "jax_cache")
  run, ref = str(tmp_path / "run"), str(tmp_path / "ref")

  # 1. A long run; SIGTERM to process 1 only, once a few steps are logged.
  procs = _launch(run, 100_000, cache, service)
  metrics, deadline = os.path.join(run, "metrics.jsonl"), time.time() + 900
  while not (os.path.exists(metrics) and len(_losses(run)) >= 3):
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      _finish(procs, timeout=0)  # raises with the outputs
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs)

  # Both processes stopped after the same step and saved it; that step is the newest one.
  stopped = [re.findall(r"preempted at step (\d+) \(checkpoint saved\)", out) for out in outs]
  assert all(len(s) == 1 for s in stopped), outs
  step = int(stopped[0][0])
  assert int(stopped[1][0]) == step
  # ... through Orbax's `reached_preemption` when JAX's preemption service runs.
  assert all(("Reached preemption sync point" in out) == service for out in outs)
  assert checkpoint.committed_steps(run) == [step]
  data_dir = os.path.join(checkpoint.checkpoint_dir(run), str(step), "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  assert max(_losses(run)) == step

  # 2. The same command again resumes at `step`; an uninterrupted run (the reference) runs
  #    alongside it to the same end.
  total = step + 3
  resumed = _launch(run, total, cache, service)
  reference = _launch(ref, total, cache, service)
  _finish(resumed + reference)
  got, want = _losses(run), _losses(ref)
  assert sorted(got) == sorted(want) == list(range(1, total + 1))
  np.testing.assert_array_equal([got[s] for s in sorted(got)], [want[s] for s in sorted(want)])

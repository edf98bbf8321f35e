"""The persistent compilation cache: on by default under the arvision cache root, written by the
first run and read by the next, off with `--no_compile_cache` / `ARVISION_COMPILE_CACHE=0`."""

import os
import subprocess
import sys

import jax
from cli_runner import run_cli

from arvision import compile_cache

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# `arvision <args>` in a fresh process that reports the persistent-cache hits JAX counted and the
# cache directory it ended with.
CHILD = """
import sys, jax
hits = []
jax.monitoring.register_event_listener(
  lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
sys.argv = ["arvision", *sys.argv[1:]]
from arvision import cli
try:
  cli.run()
finally:
  print("CACHE", len(hits), jax.config.jax_compilation_cache_dir)
"""


def _arvision(*args, cache_root):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]), JAX_PLATFORMS="cpu")
  env.pop(compile_cache.ENV)  # conftest turns it off for the tests; here it takes its default
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.update(ARVISION_CACHE=cache_root, XLA_FLAGS="")
  # Every compile is written (the toy model compiles faster than the default threshold).
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  proc = subprocess.run(
    [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=900
  )
  last = [line for line in proc.stdout.splitlines() if line.startswith("CACHE ")][-1].split()
  return proc.returncode, int(last[1]), last[2], proc.stderr


def test_second_run_reads_what_the_first_compiled(tmp_path):
  root = str(tmp_path / "cache")
  train = ["train", "--config", os.path.join(HERE, "toy_family.py"), "--config.total_steps=1"]
  code, hits, where, err = _arvision(*train, "--workdir", str(tmp_path / "a"), cache_root=root)
  assert code == 0, err[-3000:]
  assert where == os.path.join(root, "jax") and hits == 0
  written = set(os.listdir(where))
  assert written
  code, hits, where, err = _arvision(*train, "--workdir", str(tmp_path / "b"), cache_root=root)
  assert code == 0, err[-3000:]
  assert hits >= 1  # the train step, init, eval: loaded, not compiled


def test_no_compile_cache_flag_keeps_it_off(tmp_path):
  # In this process (conftest's "0" lifted): the command fails early (no such workdir), after the
  # point where the cache would have been turned on.
  env = {compile_cache.ENV: "", "ARVISION_CACHE": str(tmp_path)}
  code, _, err = run_cli("sample", "--no_compile_cache", "--workdir", str(tmp_path / "no"), env=env)
  assert code == 2 and "does not exist" in err, err
  assert jax.config.jax_compilation_cache_dir is None
  assert not os.path.exists(tmp_path / "jax")


def test_off_by_env_keeps_jax_untouched(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV, "0")
  assert compile_cache.enable(str(tmp_path / "jax")) is None
  assert jax.config.jax_compilation_cache_dir is None
  assert not os.path.exists(tmp_path / "jax")


def test_default_dir_follows_the_arvision_cache_root(monkeypatch, tmp_path):
  monkeypatch.setenv("ARVISION_CACHE", str(tmp_path / "a"))
  assert compile_cache.default_dir() == str(tmp_path / "a" / "jax")
  monkeypatch.delenv("ARVISION_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert compile_cache.default_dir() == str(tmp_path / "x" / "arvision" / "jax")

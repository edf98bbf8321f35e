"""arvision's default XLA flags: added before jax starts, never over the user's own."""

import os

from arvision import xla_flags


def test_adds_defaults_when_absent(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10))
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = xla_flags.apply_defaults(env)
  assert out.startswith("--xla_force_host_platform_device_count=8 ")
  for k, v in xla_flags.CPU_DEFAULTS.items():
    assert f"--{k}={v}" in out
  assert xla_flags.apply_defaults(env) == out  # idempotent


def test_user_flag_wins_and_opt_out(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10))
  (name,) = xla_flags.CPU_DEFAULTS
  env = {"XLA_FLAGS": f"--{name}=dot,reduce"}
  out = xla_flags.apply_defaults(env)
  assert out.startswith(f"--{name}=dot,reduce") and out.count(f"--{name}") == 1
  env = {"ARVISION_XLA_DEFAULTS": "0"}
  assert xla_flags.apply_defaults(env) == "" and "XLA_FLAGS" not in env


def test_older_jaxlib_gets_nothing(monkeypatch):
  # An XLA that does not know a flag aborts the process: older jaxlibs get none.
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 4))
  env = {}
  assert xla_flags.apply_defaults(env) == "" and env == {}


def test_two_cpu_devices_only_on_hosts_with_two_cores(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10))
  monkeypatch.setattr(xla_flags, "_cores", lambda: 2)
  assert "--xla_force_host_platform_device_count=2" in xla_flags.apply_defaults({})
  monkeypatch.setattr(xla_flags, "_cores", lambda: 1)
  assert "xla_force_host_platform_device_count" not in xla_flags.apply_defaults({})
  # The user's own count (e.g. the test suite's 8 virtual devices) wins.
  monkeypatch.setattr(xla_flags, "_cores", lambda: 2)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.apply_defaults(env).count("device_count") == 1


def test_a_fresh_process_gets_the_default_cpu_devices():
  # What a user's `import arvision` gives (the suite itself pins one device in conftest).
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ARVISION_XLA_DEFAULTS")}
  env["JAX_PLATFORMS"] = "cpu"
  code = "import arvision, jax; print(jax.device_count())"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  want = xla_flags.CPU_DEVICES if xla_flags._cores() >= xla_flags.CPU_DEVICES else 1
  assert int(out.stdout.strip().splitlines()[-1]) == want

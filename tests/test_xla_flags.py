"""arvision's default XLA flags: added before jax starts, never over the user's own."""

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
  assert xla_flags.apply_defaults(env) == f"--{name}=dot,reduce"
  env = {"ARVISION_XLA_DEFAULTS": "0"}
  assert xla_flags.apply_defaults(env) == "" and "XLA_FLAGS" not in env


def test_older_jaxlib_gets_nothing(monkeypatch):
  # An XLA that does not know a flag aborts the process: older jaxlibs get none.
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 4))
  env = {}
  assert xla_flags.apply_defaults(env) == "" and env == {}

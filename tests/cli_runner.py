"""`run_cli`: the `arvision` command run inside the test process (no interpreter start-up per call).

A helper module beside `toy_family.py` and `standin_hub.py`, not a test.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from unittest import mock


def run_cli(*args, env=None) -> tuple[int, str, str]:
  """Runs `arvision *args` in this process; returns (exit status, stdout, stderr)."""
  from absl import flags

  from arvision import cli

  flags.FLAGS.unparse_flags()  # absl keeps the previous call's values otherwise
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # ml_collections defines one flag per override, once per process
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with (
    mock.patch.object(sys, "argv", ["arvision", *map(str, args)]),
    mock.patch.dict(os.environ, env or {}),
    contextlib.redirect_stdout(out),
    contextlib.redirect_stderr(err),
  ):
    try:
      cli.run()
    except SystemExit as e:
      code = e.code or 0
  return code, out.getvalue(), err.getvalue()

"""Errors the user can fix (bad config, paths, labels, data, a damaged checkpoint, a full disk).

The library raises them for bad input; `arvision <cmd>` prints them as one line
(`arvision <cmd>: error: <message>`, exit code 2) instead of a traceback. Any other exception is
a bug and keeps its traceback. Messages say what was wrong and what is accepted or what to do.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input or a condition outside the program that the user can fix.

  A `ValueError`, so callers that caught `ValueError` for bad input keep working.
  """


class NotFound(UserError, FileNotFoundError):
  """A path the user named does not hold what was expected (workdir, config file, dataset)."""


class CheckpointError(UserError):
  """No checkpoint step could be restored, or a save failed (e.g. the disk is full)."""


class WorkdirInUse(UserError):
  """Another live `arvision train` holds the workdir's lock."""

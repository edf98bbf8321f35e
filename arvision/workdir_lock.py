"""One writer per workdir: `arvision train` holds `WORKDIR/train.lock` while it runs.

The lock file holds the owner's host, pid and start time (JSON). A second run on the same
workdir is refused while the owner lives; a lock left by a dead process on this host (a SIGKILL,
a crash, a reboot) is taken over with a warning. A lock from another host cannot be checked from
here: it is refused, and the message names the file to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time

from absl import logging

from arvision import errors

LOCK_NAME = "train.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the lock; re-entrant for nested stages of one process."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._held = False

  def _owner(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):  # half-written by a process killed while writing it
      return {}

  def acquire(self) -> None:
    me = dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%dT%H:%M:%S"))
    for _ in range(3):  # create exclusively; retry after removing a stale lock
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        if owner is None:
          continue  # released between our open and read
        if owner.get("host") == me["host"] and owner.get("pid") == me["pid"]:
          return  # this process already holds it (a stage of the same run)
        if owner.get("host") not in (None, me["host"]):
          raise errors.WorkdirInUse(
            f"{os.path.dirname(self.path)} is locked by a run on host {owner.get('host')!r} "
            f"(pid {owner.get('pid')}, since {owner.get('since')}); use another --workdir, or "
            f"delete {self.path} if that run is gone"
          ) from None
        if owner.get("pid") and _alive(int(owner["pid"])):
          raise errors.WorkdirInUse(
            f"{os.path.dirname(self.path)} is in use by a live run (pid {owner['pid']} on this "
            f"host, since {owner.get('since')}); wait for it to finish, stop it, or use another "
            "--workdir"
          ) from None
        logging.warning(
          "taking over %s: its owner (pid %s, since %s) is no longer running",
          self.path,
          owner.get("pid", "?"),
          owner.get("since", "?"),
        )
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self._held = True
      return
    raise errors.WorkdirInUse(f"could not take {self.path}: other processes keep creating it")

  def release(self) -> None:
    if self._held:
      self._held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

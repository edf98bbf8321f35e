"""Size and CRC32 of every file of a committed checkpoint step, to catch damage Orbax cannot.

Orbax/TensorStore store no checksum of array bytes: a step whose file was overwritten in place
with the same size restores without error, with wrong values. `Checkpointer` therefore writes
`<step>/arvision_digest.json` (`{relative path: [size, crc32]}` for the step's `state`, `data` and
`config` files) once Orbax has committed a step it saved, and every read checks it first
(`check`). Steps written without a digest (older arvision, `arvision convert` before it) are read
as before, unchecked.
"""

from __future__ import annotations

import json
import os
import zlib

from arvision import errors

DIGEST = "arvision_digest.json"
ITEMS = ("state", "data", "config")  # Orbax's item dirs; the step's own metadata may be rewritten
_CHUNK = 1 << 24


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):  # zlib releases the GIL on large buffers
      crc = zlib.crc32(chunk, crc)
  return crc


def compute(step_dir: str) -> dict[str, list[int]]:
  out = {}
  for item in ITEMS:
    for root, _, files in os.walk(os.path.join(step_dir, item)):
      for name in files:
        path = os.path.join(root, name)
        out[os.path.relpath(path, step_dir)] = [os.path.getsize(path), _crc32(path)]
  return dict(sorted(out.items()))


def write(step_dir: str) -> None:
  """Writes the digest of a committed step (atomically: a reader never sees half of it)."""
  tmp = os.path.join(step_dir, DIGEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(compute(step_dir), f)
  os.replace(tmp, os.path.join(step_dir, DIGEST))


def check(step_dir: str) -> bool:
  """True when the step's files match its digest, False when it has none.

  Raises:
    CheckpointError: a file is missing, or its size or CRC32 differs, naming the first ones.
  """
  path = os.path.join(step_dir, DIGEST)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  now = compute(step_dir)
  bad = [
    f"{rel} ({'missing' if rel not in now else 'size or crc32 differs'})"
    for rel in saved
    if now.get(rel) != saved[rel]
  ]
  if bad:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise errors.CheckpointError(f"files changed since the step was saved: {shown}")
  return True

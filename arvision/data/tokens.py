"""The `tokens:<dir>` source: tokenizer codes pre-extracted by `arvision tokenize`.

`arvision tokenize` (`arvision/pretokenize.py`) writes the codes of a few fixed augmented views of
each image once; training picks one view per example at random, evaluation takes view 0.

Layout of `<dir>`:
  - `meta.json`: grid, vocab size, views, dtype, the tokenizer it came from, and the image source
    (evaluation still needs real images: `image_source` replaces `tokens:` for those).
  - `<split>.array_record`: one record per example: int32 label (little endian) followed by the
    codes, `[num_views, L]` in `meta["dtype"]` (`TokenizerFamily.encode_codes` layout).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import grain
import numpy as np

META = "meta.json"


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, META)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"config.data.source='tokens:{directory}': {path} does not exist; write a tokens dir with "
      "`arvision tokenize --workdir TOKENIZER_WORKDIR --out DIR`"
    )
  with open(path) as f:
    return json.load(f)


class TokensSource:
  """Records of `<dir>/<split>.array_record`: `{"tokens": [num_views, h*w] int32, "label": int}`."""

  def __init__(self, directory: str, split: str):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.meta = read_meta(self.directory)
    self.split = split
    path = os.path.join(self.directory, f"{split}.array_record")
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"tokens:{directory} has no split {split!r} ({path}); it holds "
        f"{sorted(self.meta.get('splits', {}))}"
      )
    self._records = grain.sources.ArrayRecordDataSource([path])
    self._dtype = np.dtype(self.meta["dtype"])
    self._shape = (int(self.meta["num_views"]), int(np.prod(self.meta["grid"])))
    self.num_classes = self.meta.get("num_classes")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = self._records[int(index)]
    label = int(np.frombuffer(raw[:4], "<i4")[0])
    codes = np.frombuffer(raw[4:], self._dtype).reshape(self._shape).astype(np.int32)
    return {"tokens": codes, "label": label}

  def __repr__(self) -> str:
    return f"TokensSource(dir={self.directory!r}, split={self.split!r}, n={len(self)})"


class TrainTokens(grain.transforms.RandomMap):
  """Picks one of the extracted views at random (the official random augmentation index)."""

  def random_map(self, element, rng: np.random.Generator):
    tokens = element["tokens"]
    return {
      "tokens": tokens[int(rng.integers(0, len(tokens)))],
      "label": np.int32(element["label"]),
    }


class EvalTokens(grain.transforms.Map):
  """View 0 (the center crop); other keys pass through."""

  def map(self, element):
    out = dict(element)
    out["tokens"] = element["tokens"][0]
    out["label"] = np.int32(element["label"])
    return out


def tokenizer_digest(params) -> str:
  """A short hash of the tokenizer params, stored in meta.json to catch mismatched tokens."""
  import jax

  h = hashlib.sha256()
  for x in jax.tree.leaves(params):
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()[:16]

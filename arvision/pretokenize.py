"""`arvision tokenize`: a discrete tokenizer's codes of a dataset, written once for `tokens:<dir>`.

Large raster/VAR runs do not re-encode every image at every step: like the official LlamaGen
`extract_codes_c2i.py`, the codes of a few fixed augmented views of each image are extracted once,
and training picks one view per example at random. The layout of `<dir>` (`meta.json` and one
`<split>.array_record` per split) and its reader are in `arvision/data/tokens.py`; this module
loads the tokenizer (a run, a converted tokenizer or a generator run holding its frozen tokenizer)
and writes the records with `TokenizerFamily.encode_codes`.

Views (`--views`): `center` (1), `center_flip` (2: center crop and its mirror), `five_crop_flip`
(10: center + four corner crops of the `resize_ratio`-enlarged image, each also mirrored; the
official `--ten-crop`). Crops are taken exactly as the training transforms take them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from arvision import api
from arvision.data import sources, tokens, transforms

VIEWS = ("center", "center_flip", "five_crop_flip")


def _crops(image: np.ndarray, size: int, five: bool) -> list[np.ndarray]:
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2  # the same rounding as transforms.center_crop
  corners = [(top, left)]
  if five:
    corners += [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
  return [image[t : t + size, s : s + size] for t, s in corners]


def view_images(image_u8: np.ndarray, data_config, views: str) -> np.ndarray:
  """The augmented views of one image, uint8 `[num_views, S, S, C]`, in the order documented above."""
  if views not in VIEWS:
    raise ValueError(f"views={views!r} is unknown; accepted: {VIEWS}")
  pre = transforms.EvalTransform.from_config(data_config, as_uint8=True)
  resized = pre._resized({"image": image_u8})
  crops = _crops(resized, pre.image_size, five=views == "five_crop_flip")
  if views != "center":
    crops = [v for c in crops for v in (c, c[:, ::-1])]
  return np.stack([np.ascontiguousarray(c) for c in crops])


def num_views(views: str) -> int:
  return {"center": 1, "center_flip": 2, "five_crop_flip": 10}[views]


def write(
  encode_fn, data_config, out_dir: str, *, split: str, views: str, batch_size: int, meta: dict
) -> int:
  """Encodes every example of `split` in all `views` with `encode_fn` and writes the records.

  Args:
    encode_fn: float32 images `[B, S, S, C]` in [-1, 1] -> int codes `[B, L]`.
    meta: fields for `meta.json` (grid, vocab_size, tokenizer info); split sizes are added.

  Returns:
    The number of examples written.
  """
  from array_record.python import array_record_module

  source = sources.get_source(data_config, split)
  nv = num_views(views)
  dtype = np.dtype(meta["dtype"])
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{split}.array_record")
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  n = len(source)
  for start in range(0, n, batch_size):
    idx = range(start, min(start + batch_size, n))
    examples = [source[i] for i in idx]
    images = np.concatenate(
      [view_images(np.asarray(e["image"]), data_config, views) for e in examples]
    )
    codes = np.asarray(encode_fn(transforms.normalize(images)))
    codes = codes.reshape(len(examples), nv, -1)
    if codes.max() > np.iinfo(dtype).max:
      raise ValueError(f"codes up to {codes.max()} do not fit {dtype}")
    for e, c in zip(examples, codes, strict=True):
      writer.write(np.int32(e["label"]).tobytes() + c.astype(dtype).tobytes())
  writer.close()
  os.replace(tmp, path)  # a crash never leaves a truncated split behind
  meta = dict(meta, views=views, num_views=nv)
  meta.setdefault("splits", {})
  meta_path = os.path.join(out_dir, tokens.META)
  old = tokens.read_meta(out_dir) if os.path.exists(meta_path) else {}
  meta["splits"] = dict(old.get("splits", {}), **{split: n})
  with open(meta_path + ".tmp", "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  os.replace(meta_path + ".tmp", meta_path)
  return n


def _tokenizer_of(model, workdir):
  """(family, params, data config) of a tokenizer run or of a generator run's frozen tokenizer."""
  if model.config.family == "tokenizer":
    return model.family, model.params, model.config.data
  elif getattr(model.family, "tokenizer", None) is not None:
    return model.family.tokenizer, model.params["tokenizer"], model.config.data
  raise ValueError(f"{workdir} holds a {model.config.family!r} model without a tokenizer")


def tokenize(workdir: str, out_dir: str, *, views: str = "center_flip", batch_size: int = 256,
             splits: tuple[str, ...] | None = None) -> dict:  # fmt: skip
  """`arvision tokenize`: codes of a discrete tokenizer for the train and eval splits of its data.

  Args:
    workdir: a tokenizer run (or converted tokenizer) dir, a generator run whose checkpoint holds
      its frozen tokenizer, or a shipped tokenizer (`shipped:<name>`).
    splits: default: the config's train and eval splits.

  Returns:
    The meta.json contents.
  """
  from arvision import families
  from arvision.tokenizers import shipped

  if shipped.is_shipped(workdir):  # e.g. shipped:fmnist_msvq
    tok_config, params = shipped.load(workdir)
    family, data_config = families.build(tok_config), tok_config.data
  else:
    family, params, data_config = _tokenizer_of(api.load(workdir), workdir)
  if str(data_config.source).startswith("tokens:"):
    raise ValueError(f"{workdir} was trained on tokens ({data_config.source}); give its image run")
  if family.type == "vq":
    grid = [family.image_size // family.downsample] * 2
  elif family.type == "msvq":
    grid = [sum(p * p for p in family.patch_nums)]
  else:
    raise ValueError(
      f"arvision tokenize needs a discrete tokenizer (model.type vq or msvq); {workdir} has "
      f"{family.type!r} (continuous latents are encoded on the fly)"
    )
  encode_jit = jax.jit(lambda x: family.encode_codes(params, x))
  vocab = int(family.vocab_size)
  meta = dict(
    grid=grid,
    vocab_size=vocab,
    dtype="uint16" if vocab <= 65536 else "int32",
    tokenizer_type=family.type,
    tokenizer_workdir=workdir if shipped.is_shipped(workdir) else os.path.abspath(workdir),
    tokenizer_digest=tokens.tokenizer_digest(params),
    image_source=str(data_config.source),
    image_size=int(data_config.image_size),
    channels=int(data_config.channels),
    resize_ratio=float(data_config.resize_ratio),
    num_classes=int(data_config.num_classes),
  )
  for split in splits or (data_config.train_split, data_config.eval_split):
    write(encode_jit, data_config, out_dir, split=split, views=views, batch_size=batch_size,
          meta=meta)  # fmt: skip
  return tokens.read_meta(out_dir)

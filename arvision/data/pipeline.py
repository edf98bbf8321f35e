"""grain input pipelines: an infinite shuffled train iterator and a finite padded eval iterator.

Both shard per process by slicing the source (`[process_index::process_count]`) and return grain
`DatasetIterator`s: `get_state()`/`set_state()` and Orbax's `grain.checkpoint.CheckpointSave` /
`CheckpointRestore` resume them exactly. Batch sizes in the config are GLOBAL; each process yields
`batch_size // process_count` examples per batch.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from arvision.data import sources, tokens, transforms


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def local_batch_size(
  global_batch_size: int, process_count: int, what: str = "config.data.batch_size"
) -> int:
  """`global_batch_size // process_count`; an error if it does not divide or is not positive."""
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f"{what}={global_batch_size} must be a positive multiple of the process count "
      f"({process_count}): it is the global batch, split evenly over processes"
    )
  return global_batch_size // process_count


def _seed(*parts: int) -> int:
  # Mixes the seeds into one 32-bit value so that (seed, shuffle_seed) pairs do not collide.
  return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _read_options(data_config) -> grain.ReadOptions:
  return grain.ReadOptions(
    num_threads=int(data_config.num_threads), prefetch_buffer_size=int(data_config.prefetch)
  )


def _source(data_config, split: str):
  source = sources.get_source(data_config, split)
  known = getattr(source, "num_classes", None)
  if known is not None and known > data_config.num_classes:
    raise ValueError(
      f"config.data.num_classes={data_config.num_classes} is smaller than the {known} classes of "
      f"{source!r}; set config.data.num_classes={known}"
    )
  if len(source) == 0:
    raise ValueError(f"{source!r} has no examples")
  return source


def make_train_iter(
  data_config, *, seed: int, process_index: int | None = None, process_count: int | None = None
) -> grain.DatasetIterator:
  """The training iterator: infinite, reshuffled every epoch, augmented, sharded per process.

  Each process reads the same number of examples per epoch (the split is cut to a multiple of
  `process_count`, then sliced `[process_index::process_count]`), so epochs stay aligned.

  Args:
    data_config: `config.data` (source, train_split, image_size, channels, batch_size, ...).
    seed: the run's seed; mixed with `data_config.shuffle_seed` for the shuffle and augmentations.
    process_index: this process's shard (default `jax.process_index()`).
    process_count: number of shards (default `jax.process_count()`).

  Returns:
    A grain `DatasetIterator` of `{"image": float32 [b, H, W, C] in [-1, 1], "label": int32 [b]}`
    with `b = data_config.batch_size // process_count`.
  """
  pi, pc = _processes(process_index, process_count)
  b = local_batch_size(data_config.batch_size, pc)
  source = _source(data_config, data_config.train_split)
  if isinstance(source, tokens.TokensSource):
    transform = tokens.TrainTokens()
  else:
    transform = transforms.TrainTransform.from_config(data_config)
  per_process = len(source) // pc
  if per_process == 0:
    raise ValueError(f"{source!r} has {len(source)} examples, fewer than {pc} processes")
  ds = grain.MapDataset.source(source)[: per_process * pc][pi::pc]
  ds = (
    ds.shuffle(seed=_seed(seed, data_config.shuffle_seed, 0))
    .repeat()  # reseeds the shuffle every epoch
    .random_map(transform, seed=_seed(seed, data_config.shuffle_seed, 1, pi))
    .batch(b, drop_remainder=True)
  )
  return iter(ds.to_iter_dataset(_read_options(data_config)))


class _PaddedShard:
  """Process `pi`'s eval examples `pi, pi + pc, ...` (< n), padded to `length` with `mask=False`.

  Padding repeats a real example (so shapes always match) and is flagged by `mask`.
  """

  def __init__(self, source, n: int, pi: int, pc: int, length: int):
    self.source, self.n, self.pi, self.pc, self.length = source, n, pi, pc, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    j = self.pi + self.pc * int(index)
    valid = j < self.n
    example = dict(self.source[j if valid else 0])
    example["mask"] = np.bool_(valid)
    return example

  def __repr__(self) -> str:
    return (
      f"_PaddedShard({self.source!r}, n={self.n}, shard={self.pi}/{self.pc}, length={self.length})"
    )


def _eval_dataset(
  data_config, split, batch_size, num_examples, process_index, process_count, as_uint8
) -> grain.MapDataset:
  pi, pc = _processes(process_index, process_count)
  global_b = data_config.eval_batch_size if batch_size is None else batch_size
  b = local_batch_size(
    global_b, pc, "config.data.eval_batch_size" if batch_size is None else "batch_size"
  )
  split = data_config.eval_split if split is None else split
  source = _source(data_config, split)
  if isinstance(source, tokens.TokensSource):
    transform = tokens.EvalTokens()
  else:
    transform = transforms.EvalTransform.from_config(data_config, as_uint8=as_uint8)
  n = len(source)
  if num_examples is not None:
    if num_examples < 1:
      raise ValueError(f"num_examples={num_examples} must be >= 1 (or None for the whole split)")
    n = min(n, int(num_examples))
  # Every process yields the same number of batches (collectives in the eval step need that).
  per_process = -(-n // pc)
  num_batches = -(-per_process // b)
  shard = _PaddedShard(source, n, pi, pc, num_batches * b)
  return grain.MapDataset.source(shard).map(transform).batch(b)


def make_eval_iter(
  data_config,
  *,
  split: str | None = None,
  batch_size: int | None = None,
  num_examples: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """A finite, unshuffled, deterministic iterator over an eval split (center crop, no flip).

  Every example of the (first `num_examples` of the) split appears exactly once over all processes,
  process `p` taking examples `p, p + process_count, ...`. The last batches are padded to full size
  with `mask=False`, so shapes stay static for jit, and all processes yield the same number of
  batches.

  Args:
    data_config: `config.data`.
    split: defaults to `data_config.eval_split`.
    batch_size: GLOBAL batch size; defaults to `data_config.eval_batch_size`.
    num_examples: use only the first this-many examples (at most the split's size); None = all.
    process_index: this process's shard (default `jax.process_index()`).
    process_count: number of shards (default `jax.process_count()`).

  Returns:
    A grain `DatasetIterator` of `{"image": float32 [b, H, W, C], "label": int32 [b],
    "mask": bool [b]}` with `b = batch_size // process_count`.
  """
  ds = _eval_dataset(
    data_config, split, batch_size, num_examples, process_index, process_count, as_uint8=False
  )
  return iter(ds.to_iter_dataset(_read_options(data_config)))


def num_examples(data_config, split: str) -> int:
  """The number of examples in `split` of `data_config.source` (all processes together)."""
  return len(sources.get_source(data_config, split))


def image_data_config(data_config):
  """`data_config` itself, or for a `tokens:` source the image source the codes were made from.

  Evaluation compares samples with real images, which a tokens dir does not hold.
  """
  name, _, arg = str(data_config.source).partition(":")
  if name != "tokens":
    return data_config
  meta = tokens.read_meta(arg)
  out = data_config.copy_and_resolve_references()
  with out.unlocked():
    out.source = meta["image_source"]
  return out


def load_images(data_config, split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The first `n` (default all) examples of `split`, center-cropped like eval, in this process.

  For evaluation code that needs real-data statistics (FID reference, classifier features).

  Returns:
    `(images uint8 [N, H, W, C], labels int32 [N])`.
  """
  data_config = image_data_config(data_config)
  ds = _eval_dataset(
    data_config, split, data_config.eval_batch_size, n, 0, 1, as_uint8=True
  ).to_iter_dataset(_read_options(data_config))
  images, labels = [], []
  for batch in ds:
    images.append(batch["image"][batch["mask"]])
    labels.append(batch["label"][batch["mask"]])
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def input_spec(data_config, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """A batch of zeros with the training batch's shapes and dtypes (for `init` / `jax.eval_shape`).

  Args:
    data_config: `config.data`.
    batch_size: leading dimension; defaults to the global `data_config.batch_size`.
  """
  transforms.check_config(data_config)
  b = data_config.batch_size if batch_size is None else batch_size
  name, _, arg = str(data_config.source).partition(":")
  if name == "tokens":
    grid = tokens.read_meta(arg)["grid"]
    return {
      "tokens": np.zeros((b, int(np.prod(grid))), np.int32),
      "label": np.zeros((b,), np.int32),
    }
  size, c = data_config.image_size, data_config.channels
  return {
    "image": np.zeros((b, size, size, c), np.float32),
    "label": np.zeros((b,), np.int32),
  }

"""Tests for arvision.data: sources, VAR-recipe transforms, grain pipelines, sharding, resume."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from arvision import data
from arvision.config_util import base_config
from arvision.data import fashion_mnist, sources, transforms


def _config(**kw):
  c = base_config("test").data
  c.update(
    dict(source="synthetic", image_size=16, channels=3, batch_size=32, eval_batch_size=48,
         num_threads=1, prefetch=2)
  )  # fmt: skip
  c.update(kw)
  return c


def _to_u8(x):
  return np.round((np.asarray(x) + 1.0) * 127.5).astype(np.uint8)


def _index_by_bytes(source):
  return {source[i]["image"].tobytes(): i for i in range(len(source))}


def _take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# Train iterator.


@pytest.mark.parametrize("channels", [1, 3])
def test_train_batch_shapes_dtypes_range(channels):
  c = _config(channels=channels, hflip=True)
  it = data.make_train_iter(c, seed=0, process_index=0, process_count=2)
  for batch in _take(it, 3):
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (16, 16, 16, channels)  # local batch = 32 / 2
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].max() - batch["image"].min() > 1.0  # real content, not constant
    assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()


def test_input_spec_matches_train_batch():
  c = _config()
  spec = data.input_spec(c)
  batch = next(data.make_train_iter(c, seed=0, process_index=0, process_count=1))
  assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
    k: (v.shape, v.dtype) for k, v in batch.items()
  }
  assert not spec["image"].any()
  assert data.input_spec(c, batch_size=3)["label"].shape == (3,)


def test_batch_size_must_divide_process_count():
  with pytest.raises(ValueError, match=r"batch_size=30 must be a positive multiple .*\(4\)"):
    data.make_train_iter(_config(batch_size=30), seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index=2"):
    data.make_train_iter(_config(), seed=0, process_index=2, process_count=2)


def test_determinism_and_seeds():
  c = _config(hflip=True)
  first = _take(data.make_train_iter(c, seed=3, process_index=0, process_count=1), 3)
  again = _take(data.make_train_iter(c, seed=3, process_index=0, process_count=1), 3)
  other = _take(data.make_train_iter(c, seed=4, process_index=0, process_count=1), 3)
  c2 = _config(hflip=True, shuffle_seed=1)
  other_shuffle = _take(data.make_train_iter(c2, seed=3, process_index=0, process_count=1), 3)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])
  assert not np.array_equal(first[0]["image"], other_shuffle[0]["image"])


def test_epochs_cover_all_examples_and_reshuffle():
  # No resize, no crop randomness: every batch image maps back to exactly one source example.
  c = _config(resize_ratio=1.0, random_crop=False, batch_size=64)
  lookup = _index_by_bytes(sources.get_source(c, "train"))
  it = data.make_train_iter(c, seed=0, process_index=0, process_count=1)
  epochs = []
  for _ in range(2):  # 512 examples / 64 = 8 batches per epoch
    epochs.append([lookup[im.tobytes()] for b in _take(it, 8) for im in _to_u8(b["image"])])
  assert sorted(epochs[0]) == list(range(512)) and sorted(epochs[1]) == list(range(512))
  assert epochs[0] != epochs[1]  # reshuffled every epoch
  assert epochs[0] != list(range(512))  # shuffled at all


def test_per_process_shards_are_disjoint_and_cover_the_epoch():
  c = _config(resize_ratio=1.0, random_crop=False, batch_size=64)
  lookup = _index_by_bytes(sources.get_source(c, "train"))
  seen = []
  for p in range(2):  # 256 examples per process / 32 local = 8 batches
    it = data.make_train_iter(c, seed=0, process_index=p, process_count=2)
    seen.append({lookup[im.tobytes()] for b in _take(it, 8) for im in _to_u8(b["image"])})
    assert len(seen[p]) == 256  # a whole epoch of the shard, no repeats
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(512))
  assert all(i % 2 == 0 for i in seen[0])  # sliced [process_index::process_count]


def test_iterator_state_round_trip():
  c = _config(hflip=True)  # random crop + flip: augmentations must be reproduced too
  it = data.make_train_iter(c, seed=1, process_index=0, process_count=1)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 3)
  it2 = data.make_train_iter(c, seed=1, process_index=0, process_count=1)
  it2.set_state(state)
  for a, b in zip(expected, _take(it2, 3), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  fresh = next(data.make_train_iter(c, seed=1, process_index=0, process_count=1))
  assert not np.array_equal(fresh["image"], expected[0]["image"])


def test_orbax_checkpoint_round_trip(tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  c = _config()
  it = data.make_train_iter(c, seed=0, process_index=0, process_count=1)
  _take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 2)
    it2 = data.make_train_iter(c, seed=0, process_index=0, process_count=1)
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  for a, b in zip(expected, _take(it2, 2), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])


# ------------------------------------------------------------------------------------------------
# Eval iterator and helpers.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_iter_covers_every_example_once(process_count):
  c = _config(resize_ratio=1.0)
  source = sources.get_source(c, "test")
  lookup = _index_by_bytes(source)
  n = 100
  per_process, counts = [], []
  for p in range(process_count):
    batches = list(
      data.make_eval_iter(c, num_examples=n, process_index=p, process_count=process_count)
    )
    counts.append(len(batches))
    ids = []
    for b in batches:
      assert b["image"].shape == (48 // process_count, 16, 16, 3)
      assert b["mask"].dtype == np.bool_ and b["label"].dtype == np.int32
      for im, label in zip(_to_u8(b["image"][b["mask"]]), b["label"][b["mask"]], strict=True):
        ids.append(lookup[im.tobytes()])
        assert label == source[ids[-1]]["label"]
    per_process.append(ids)
  assert len(set(counts)) == 1  # every process runs the same number of eval steps
  assert counts[0] == 3  # ceil(ceil(100 / p) / (48 / p)) for p = 1, 2
  all_ids = [i for ids in per_process for i in ids]
  assert sorted(all_ids) == list(range(n))  # each of the first n exactly once
  if process_count == 1:
    assert all_ids == list(range(n))  # unshuffled, in order
  last = list(data.make_eval_iter(c, num_examples=n, process_index=0, process_count=1))[-1]
  assert last["mask"].sum() == n - 2 * 48 and not last["mask"][n - 2 * 48 :].any()


def test_eval_iter_is_deterministic_center_crop():
  c = _config(image_size=12, resize_ratio=1.5)
  a = next(data.make_eval_iter(c, batch_size=8, process_index=0, process_count=1))
  b = next(data.make_eval_iter(c, batch_size=8, process_index=0, process_count=1))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (8, 12, 12, 3) and a["mask"].all()
  raw = sources.get_source(c, "test")[0]["image"]  # 12x12 synthetic -> 18x18 -> center 12x12
  want = transforms.center_crop(transforms.resize_short_side(raw, 18), 12)
  np.testing.assert_array_equal(_to_u8(a["image"][0]), want)


def test_load_images_and_num_examples():
  c = _config(image_size=12, resize_ratio=1.25)
  assert data.num_examples(c, "train") == 512 and data.num_examples(c, "test") == 128
  x, y = data.load_images(c, "test", n=50)
  assert x.shape == (50, 12, 12, 3) and x.dtype == np.uint8
  assert y.dtype == np.int32 and list(y[:12]) == [i % 10 for i in range(12)]
  batch = next(data.make_eval_iter(c, batch_size=64, process_index=0, process_count=1))
  np.testing.assert_array_equal(x, _to_u8(batch["image"][:50]))
  assert len(data.load_images(c, "test")[0]) == 128


# ------------------------------------------------------------------------------------------------
# Transforms.


def test_resize_sizing_and_center_crop_follow_torchvision():
  img = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
  out = transforms.resize_short_side(img, 36)
  assert out.shape == (36, int(36 * 41 / 30), 3)  # torchvision: long = int(short * long / short_in)
  tall = transforms.resize_short_side(img.transpose(1, 0, 2), 36)
  assert tall.shape == (int(36 * 41 / 30), 36, 3)
  crop = transforms.center_crop(np.arange(37 * 40).reshape(37, 40, 1), 32)
  assert crop[0, 0, 0] == 2 * 40 + 4  # top = round(2.5) = 2 (Python rounding), left = 4
  assert transforms.resize_short_side(img[:30, :30], 30) is not None
  np.testing.assert_array_equal(transforms.resize_short_side(img, 30), img)  # no-op at size
  want = np.asarray(Image.fromarray(img).resize((49, 36), Image.Resampling.LANCZOS))
  np.testing.assert_array_equal(out, want)


def test_normalize_and_channels():
  x = transforms.normalize(np.array([0, 128, 255], np.uint8))
  np.testing.assert_allclose(x, [-1.0, 128 / 255 * 2 - 1, 1.0], rtol=0, atol=1e-7)
  assert x[0] == -1.0 and x[2] == 1.0
  assert x.dtype == np.float32
  grey = np.arange(12, dtype=np.uint8).reshape(2, 6, 1)
  rgb = transforms.convert_channels(grey, 3)
  assert rgb.shape == (2, 6, 3) and (rgb == grey).all()
  back = transforms.convert_channels(rgb, 1)
  np.testing.assert_array_equal(back, grey)  # L of equal R=G=B is that value
  with pytest.raises(ValueError, match="channels=2"):
    transforms.convert_channels(rgb, 2)


def test_train_transform_uses_grain_rng():
  t = transforms.TrainTransform(
    image_size=8, resize_ratio=1.5, channels=1, random_crop=True, hflip=True
  )
  ex = {"image": np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8), "label": 3}
  a = t.random_map(ex, np.random.default_rng(7))
  b = t.random_map(ex, np.random.default_rng(7))
  np.testing.assert_array_equal(a["image"], b["image"])
  outs = {t.random_map(ex, np.random.default_rng(s))["image"].tobytes() for s in range(20)}
  assert len(outs) > 5  # crops/flips vary with the rng
  assert a["label"] == 3 and a["label"].dtype == np.int32


def test_bad_data_config_fields():
  with pytest.raises(ValueError, match=r"resize_ratio=0.5"):
    data.make_train_iter(_config(resize_ratio=0.5), seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"channels=2 .*accepted: 1, 3"):
    data.make_train_iter(_config(channels=2), seed=0, process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------------
# Sources and the registry.


def test_bad_source_name_lists_accepted():
  with pytest.raises(
    ValueError,
    match=r"'nope' is unknown; accepted: .*fashion_mnist.*synthetic.*tfds:<name>.*folder:<path>",
  ):
    data.get_source(_config(source="nope"), "train")
  with pytest.raises(ValueError, match="needs an argument"):
    data.get_source(_config(source="folder:"), "train")
  with pytest.raises(ValueError, match="takes no argument"):
    data.get_source(_config(source="synthetic:x"), "train")
  with pytest.raises(ValueError, match="synthetic split 'dev' is unknown"):
    data.get_source(_config(), "dev")


def test_synthetic_is_deterministic_and_class_dependent():
  a = sources.SyntheticSource("train", 16, 3, 4)
  b = sources.SyntheticSource("train", 16, 3, 4)
  np.testing.assert_array_equal(a[5]["image"], b[5]["image"])
  assert repr(a) == repr(b) and "0x" not in repr(a)
  assert a[5]["image"].shape == (16, 16, 3) and a[5]["image"].dtype == np.uint8
  # Class structure: images are closer to their own class mean than to other classes' means.
  ims = np.stack([a[i]["image"].astype(np.float32).ravel() for i in range(len(a))])
  labels = np.array([a[i]["label"] for i in range(len(a))])
  feats = np.abs(np.fft.rfft2(ims.reshape(-1, 16, 16, 3).mean(-1))).reshape(
    len(a), -1
  )  # phase-free
  means = np.stack([feats[labels == k].mean(0) for k in range(4)])
  pred = np.argmin(((feats[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == labels).mean() > 0.9
  assert np.bincount(labels).tolist() == [128] * 4


def _write_png(path, size, mode, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, np.uint8)
  Image.fromarray(arr, mode).save(path)


def test_folder_source_with_split_dirs(tmp_path):
  for split, n in (("train", 3), ("test", 2)):
    for k, cls in enumerate(("zebra", "ant", "mole")):
      for i in range(n):
        mode = "L" if i % 2 else "RGB"
        _write_png(str(tmp_path / split / cls / f"{i}.png"), (20 + i, 18), mode, 40 * k + i)
  (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
  c = _config(source=f"folder:{tmp_path}", image_size=16, channels=3, batch_size=3)
  src = data.get_source(c, "train")
  assert len(src) == 9 and src.classes == ["ant", "mole", "zebra"]
  ex = src[0]  # ant/0.png, RGB
  assert ex["label"] == 0 and ex["image"].shape == (18, 20, 3) and (ex["image"] == 40).all()
  assert src[4]["image"].shape == (18, 21, 3)  # grey file converted to RGB
  assert src[8]["label"] == 2 and (src[8]["image"] == 2).all()  # zebra/2.png, value 40*0+2
  assert len(data.get_source(c, "test")) == 6
  grey = data.get_source(_config(source=f"folder:{tmp_path}", channels=1), "test")
  assert grey[0]["image"].shape == (18, 20, 1)
  batch = next(data.make_train_iter(c, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (3, 16, 16, 3)
  evals = list(data.make_eval_iter(c, batch_size=4, process_index=0, process_count=1))
  assert sum(int(b["mask"].sum()) for b in evals) == 6
  with pytest.raises(ValueError, match=r"num_classes=2 .*3 classes"):
    data.make_train_iter(
      _config(source=f"folder:{tmp_path}", num_classes=2), seed=0, process_index=0, process_count=1
    )


def test_folder_source_flat_layout_95_5(tmp_path):
  for i in range(21):
    _write_png(str(tmp_path / "cat" / f"{i:02d}.jpg"), (8, 8), "RGB", i)
  for i in range(3):
    _write_png(str(tmp_path / "dog" / f"{i}.PNG"), (8, 8), "RGB", 100 + i)
  c = _config(source=f"folder:{tmp_path}")
  train, test = data.get_source(c, "train"), data.get_source(c, "test")
  assert len(train) == 23 and len(test) == 1  # cat/19.jpg is held out
  assert test[0]["label"] == 0 and abs(int(test[0]["image"].mean()) - 19) <= 2
  with pytest.raises(ValueError, match="accepted splits are 'train'"):
    data.get_source(c, "holdout")


def test_folder_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_source(_config(source=f"folder:{tmp_path / 'missing'}"), "train")
  (tmp_path / "empty_class").mkdir()
  with pytest.raises(FileNotFoundError, match="no images"):
    data.get_source(_config(source=f"folder:{tmp_path}"), "train")


def test_decode_image_bytes_and_arrays():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PNG")
  np.testing.assert_array_equal(sources.decode_image(buf.getvalue()), rgb)
  np.testing.assert_array_equal(sources.decode_image(np.array(buf.getvalue(), dtype=object)), rgb)
  assert sources.decode_image(rgb[..., 0]).shape == (5, 7, 1)
  with pytest.raises(ValueError, match="uint8"):
    sources.decode_image(rgb.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST (the embedded default) and tfds:<name>.


def _require_fmnist():
  if os.environ.get("ARVISION_SKIP_FMNIST") == "1":
    pytest.skip("ARVISION_SKIP_FMNIST=1")
  if not os.path.exists(os.path.join(fashion_mnist.idx_dir(), "t10k-images-idx3-ubyte.gz")):
    pytest.fail(
      f"Fashion-MNIST IDX files missing in {fashion_mnist.idx_dir()}: run "
      "`sudo apt-get install -y dataset-fashion-mnist` (or set ARVISION_SKIP_FMNIST=1 to skip)"
    )


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  _require_fmnist()
  root = str(tmp_path_factory.mktemp("tfds"))
  fashion_mnist.clear_cache()
  fashion_mnist.prepare(root)
  yield root
  fashion_mnist.clear_cache()


def test_fashion_mnist_builds_with_counts_and_balance(fmnist_dir):
  x, y = fashion_mnist.load(fmnist_dir, "train")
  assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
  assert np.bincount(y).tolist() == [6000] * 10
  xt, yt = fashion_mnist.load(fmnist_dir, "test")
  assert len(xt) == 10000 and np.bincount(yt).tolist() == [1000] * 10
  idx_x, idx_y = fashion_mnist.read_idx_split("test")
  np.testing.assert_array_equal(xt, idx_x)  # same pixels, canonical order
  np.testing.assert_array_equal(yt, idx_y)
  c = _config(source="fashion_mnist", data_dir=fmnist_dir, channels=1, image_size=32)
  assert data.num_examples(c, "train") == 60000
  batch = next(data.make_train_iter(c, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (32, 32, 32, 1) and batch["image"].dtype == np.float32
  assert "tensorflow" not in __import__("sys").modules


def test_fashion_mnist_second_open_is_cached(fmnist_dir, monkeypatch):
  files = sorted(
    os.path.join(d, f) for d, _, fs in os.walk(fmnist_dir) for f in fs if "array_record" in f
  )
  assert len(files) >= 2
  mtimes = [os.path.getmtime(f) for f in files]
  fashion_mnist.clear_cache()

  def no_rebuild(split):
    raise AssertionError("the IDX files were read again: the dataset was rebuilt")

  monkeypatch.setattr(fashion_mnist, "read_idx_split", no_rebuild)
  t0 = time.perf_counter()
  x, _ = fashion_mnist.load(fmnist_dir, "test")
  assert len(x) == 10000 and time.perf_counter() - t0 < 30
  assert [os.path.getmtime(f) for f in files] == mtimes


def test_tfds_source_reads_prepared_dataset(fmnist_dir):
  c = _config(source="tfds:arvision_fashion_mnist", data_dir=fmnist_dir, channels=1)
  src = data.get_source(c, "test")
  assert len(src) == 10000 and src.num_classes == 10
  x, y = fashion_mnist.load(fmnist_dir, "test")
  np.testing.assert_array_equal(src[7]["image"], x[7])
  assert src[7]["label"] == y[7]
  assert repr(src) == repr(data.get_source(c, "test"))
  with pytest.raises(ValueError, match="split 'dev' is unknown"):
    data.get_source(c, "dev")


def test_tfds_source_missing_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"tfds build mnist --file_format=array_record"):
    data.get_source(_config(source="tfds:mnist", data_dir=str(tmp_path)), "train")


def test_fashion_mnist_missing_idx_files(tmp_path, monkeypatch):
  monkeypatch.setenv(fashion_mnist.IDX_ENV, str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
    fashion_mnist.prepare(str(tmp_path / "tfds"))
  assert not os.path.exists(tmp_path / "tfds" / fashion_mnist.NAME / "1.0.0")


def test_data_dir_resolution(monkeypatch):
  monkeypatch.setenv(fashion_mnist.DATA_DIR_ENV, "/x/y")
  assert fashion_mnist.resolve_data_dir("") == "/x/y"
  assert fashion_mnist.resolve_data_dir("/a/b") == "/a/b"
  monkeypatch.delenv(fashion_mnist.DATA_DIR_ENV)
  assert fashion_mnist.resolve_data_dir("").endswith(os.path.join(".cache", "arvision", "tfds"))

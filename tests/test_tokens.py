"""`arvision tokenize` (`arvision/pretokenize.py`) + the `tokens:` source: codes equal the tokenizer's
(`encode_codes`), views are the documented crops, the pipelines pick views as documented,
evaluation falls back to the image source."""

import json
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from arvision import checkpoint as ckpt_lib
from arvision import config_util, data, families, pretokenize
from arvision.data import tokens, transforms


def _tokenizer_dir(tmp_path, kind: str) -> str:
  config = config_util.load_config_file("tokenizer.py:smoke")
  with config.unlocked():
    if kind == "vq":
      config.model.type = "vq"
      config.model.l2_norm = True
  family = families.build(config)
  params = family.init(jax.random.key(0), None)
  out = str(tmp_path / f"tok_{kind}")
  ckpt_lib.save_export(out, params, {}, config)
  return out


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
  return _tokenizer_dir(tmp_path_factory.mktemp("tok"), "vq")


def test_view_images_are_the_documented_crops():
  config = config_util.load_config_file("tokenizer.py:smoke").data
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 20, 1), dtype=np.uint8)
  pre = transforms.EvalTransform.from_config(config, as_uint8=True)
  center = pre.map({"image": image, "label": 0})["image"]
  v = pretokenize.view_images(image, config, "center_flip")
  assert v.shape == (2, 16, 16, 1)
  np.testing.assert_array_equal(v[0], center)  # view 0 == the eval transform
  np.testing.assert_array_equal(v[1], center[:, ::-1])
  ten = pretokenize.view_images(image, config, "five_crop_flip")
  assert ten.shape == (10, 16, 16, 1)
  np.testing.assert_array_equal(ten[0], center)
  resized = transforms.resize_short_side(image, pre.mid_size)
  np.testing.assert_array_equal(ten[2], resized[:16, :16])  # top-left corner
  np.testing.assert_array_equal(ten[9], resized[-16:, -16:][:, ::-1])  # bottom-right, mirrored
  with pytest.raises(ValueError, match="accepted"):
    pretokenize.view_images(image, config, "six_crop")


def test_tokenize_writes_the_tokenizers_codes(vq_dir, tmp_path):
  out = str(tmp_path / "codes")
  meta = pretokenize.tokenize(vq_dir, out, views="center_flip", batch_size=64)
  config = ckpt_lib.read_config(vq_dir)
  family = families.build(config)
  params = ckpt_lib.load_params(vq_dir)["params"]
  assert meta["grid"] == [8, 8] and meta["num_views"] == 2 and meta["image_source"] == "synthetic"
  assert meta["splits"] == {"train": 512, "test": 128}
  src = tokens.TokensSource(out, "test")
  assert len(src) == 128
  images, labels = data.load_images(config.data, "test", 10)
  flipped = images[:, :, ::-1]
  want = np.asarray(family.encode_idx(params, transforms.normalize(images)))
  want_flip = np.asarray(family.encode_idx(params, transforms.normalize(flipped)))
  for i in range(10):
    ex = src[i]
    assert ex["label"] == labels[i]
    np.testing.assert_array_equal(ex["tokens"][0], want[i])
    np.testing.assert_array_equal(ex["tokens"][1], want_flip[i])
  # The file format: int32 LE label, then [views, h*w] codes as little-endian uint16, nothing else.
  raw = grain.sources.ArrayRecordDataSource([str(tmp_path / "codes" / "test.array_record")])
  for i in range(3):
    codes = np.stack([want[i], want_flip[i]]).astype("<u2")
    assert raw[i] == np.asarray(labels[i], "<i4").tobytes() + codes.tobytes()


def test_tokens_source_pipelines(vq_dir, tmp_path):
  out = str(tmp_path / "codes")
  pretokenize.tokenize(vq_dir, out, views="center_flip", batch_size=128)
  config = ckpt_lib.read_config(vq_dir).data
  with config.unlocked():
    config.source = f"tokens:{out}"
  assert data.input_spec(config, 4)["tokens"].shape == (4, 64)
  src = tokens.TokensSource(out, "train")
  batch = next(data.make_train_iter(config, seed=0, process_index=0, process_count=1))
  assert batch["tokens"].shape == (config.batch_size, 64) and batch["tokens"].dtype == np.int32
  # Every row is one of its example's two views (which one is random).
  all_views = {tuple(v) for i in range(len(src)) for v in src[i]["tokens"]}
  assert all(tuple(row) in all_views for row in batch["tokens"])
  ev = next(data.make_eval_iter(config, batch_size=8, process_index=0, process_count=1))
  test_src = tokens.TokensSource(out, "test")
  np.testing.assert_array_equal(
    ev["tokens"], np.stack([test_src[i]["tokens"][0] for i in range(8)])
  )
  # Evaluation needs real images: load_images falls back to the image source of the codes.
  images, _ = data.load_images(config, "test", 4)
  assert images.shape == (4, 16, 16, 1) and images.dtype == np.uint8


def test_tokenize_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="arvision tokenize"):
    tokens.TokensSource(str(tmp_path / "nothing"), "train")
  config = config_util.load_config_file("tokenizer.py:smoke")
  with config.unlocked():
    config.model.type = "kl"
  family = families.build(config)
  out = str(tmp_path / "kl")
  ckpt_lib.save_export(out, family.init(jax.random.key(0), None), {}, config)
  with pytest.raises(ValueError, match="discrete tokenizer"):
    pretokenize.tokenize(out, str(tmp_path / "codes"))


def test_cli_tokenize(vq_dir, tmp_path):
  out = str(tmp_path / "cli_codes")
  cmd = [sys.executable, "-m", "arvision.cli", "tokenize", "--workdir", vq_dir, "--out", out,
         "--views", "center"]  # fmt: skip
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert tokens.read_meta(out)["num_views"] == 1
  assert len(tokens.TokensSource(out, "train")) == 512


def test_tokenize_msvq_concatenates_scales(tmp_path):
  tok = _tokenizer_dir(tmp_path, "msvq")
  meta = pretokenize.tokenize(tok, str(tmp_path / "codes"), views="center", splits=("test",))
  assert meta["grid"] == [1 + 4 + 16 + 64]
  config = ckpt_lib.read_config(tok)
  family = families.build(config)
  params = ckpt_lib.load_params(tok)["params"]
  images, _ = data.load_images(config.data, "test", 3)
  want = np.concatenate(family.encode_idx(params, transforms.normalize(images)), axis=1)
  got = np.stack([tokens.TokensSource(str(tmp_path / "codes"), "test")[i]["tokens"][0]
                  for i in range(3)])  # fmt: skip
  np.testing.assert_array_equal(got, want)


def test_raster_trains_from_tokens_and_refuses_other_tokenizers(vq_dir, tmp_path):
  from arvision.train import train

  out = str(tmp_path / "codes")
  pretokenize.tokenize(vq_dir, out, views="center_flip", batch_size=128)
  config = config_util.load_config_file("raster.py:smoke")
  with config.unlocked():
    config.data.source = f"tokens:{out}"
    config.tokenizer.checkpoint = vq_dir
    config.total_steps = 2
    config.eval.num_samples = 8
  train(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert losses and all(np.isfinite(losses))
  # The same architecture with other weights: its codes would be meaningless to this model.
  other = str(tmp_path / "other_tok")
  params = jax.tree.map(lambda x: x + 1.0, ckpt_lib.load_params(vq_dir)["params"])
  ckpt_lib.save_export(other, params, {}, ckpt_lib.read_config(vq_dir))
  with config.unlocked():
    config.tokenizer.checkpoint = other
  with pytest.raises(ValueError, match="holds codes of the tokenizer"):
    train(config, str(tmp_path / "run2"))


def test_encode_codes_is_flat_for_vq_and_msvq(vq_dir, tmp_path):
  images = data.load_images(ckpt_lib.read_config(vq_dir).data, "test", 4)[0]
  x = transforms.normalize(images)
  for path in (vq_dir, _tokenizer_dir(tmp_path, "msvq")):
    family = families.build(ckpt_lib.read_config(path))
    params = ckpt_lib.load_params(path)["params"]
    codes = family.encode_codes(params, x)
    idx = family.encode_idx(params, x)
    want = np.concatenate(idx, axis=1) if family.type == "msvq" else np.asarray(idx)
    assert codes.dtype == np.int32 and codes.shape == want.shape and codes.ndim == 2
    np.testing.assert_array_equal(codes, want)
  config = config_util.load_config_file("tokenizer.py:smoke")
  with config.unlocked():
    config.model.type = "kl"
  kl = families.build(config)
  with pytest.raises(ValueError, match="encode_codes needs model.type"):
    kl.encode_codes(kl.init(jax.random.key(0), None), x)

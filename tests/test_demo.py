"""`arvision demo`: the Gradio app on loopback, driven through its HTTP API with gradio_client,
over the tiny `var-d16` of the stand-in Hub (tests/standin_hub.py)."""

import os
import shutil
import subprocess

import jax
import ml_collections
import numpy as np
import portpicker
import pytest
import standin_hub
from PIL import Image

from arvision import api, config_util, errors, families
from arvision import demo as demo_lib

pytest.importorskip("torch")
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(ROOT, "experiments", "results", "demo_screenshot.png")


@pytest.fixture(scope="module")
def monkeymodule():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.fixture(scope="module")
def hub(tmp_path_factory, monkeymodule):
  """The stand-in Hub (tests/standin_hub.py) with a var-d16 whose logits are spread out (weights
  at the official init's 0.02), so that the seed and the knobs change the samples."""
  server = standin_hub.start(tmp_path_factory.mktemp("hub"), monkeymodule, var_std=0.02)
  yield server
  server.close()


@pytest.fixture(scope="module")
def app(hub, monkeymodule):
  """(url, Demo) of `arvision demo --model var-d16` served on a free loopback port (one server
  for the module: loading and the first compile are most of the time)."""
  monkeymodule.setenv("GRADIO_ANALYTICS_ENABLED", "False")
  monkeymodule.setenv("NO_PROXY", "127.0.0.1,localhost")  # the client must not go through a proxy
  port = portpicker.pick_unused_port()
  server, demo = demo_lib.serve("var-d16", host="127.0.0.1", port=port, block=False)
  yield f"http://127.0.0.1:{port}/", demo
  server.close()


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path))


def test_generate_and_inpaint_through_the_http_api(app, tmp_path):
  url, demo = app
  assert list(demo.knobs) == ["cfg", "top_k", "top_p"]  # VAR's traced knobs; no temperature
  assert demo.knobs["top_k"][2] == 64  # top_k's maximum: the stand-in's vocabulary
  assert demo.knobs["cfg"][-1] == 1.5 and demo.knobs["top_p"][-1] == 0.96  # the zoo's settings
  client = gradio_client.Client(url, verbose=False)
  traces = demo.family.trace_count

  def generate(label, seed, batch=4, cfg=1.5, top_k=20, top_p=0.9):
    out = client.predict(label, batch, seed, cfg, top_k, top_p, api_name="/generate")
    return _png(out[0] if isinstance(out, (list, tuple)) else out)

  a = generate(3, seed=0)
  side = 2 * (64 + 2) + 2  # a 2x2 grid of 64 px samples with 2 px padding
  assert a.shape == (side, side, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(generate(3, seed=0), a)  # the same seed reproduces it
  assert not np.array_equal(generate(3, seed=1), a)  # another seed changes it
  assert not np.array_equal(generate(3, seed=0, cfg=4.0, top_k=5), a)  # the knobs reach it
  assert demo.family.trace_count == traces  # compiled once at start-up; knobs are traced

  # Inpainting: keep the left half of a sample, regenerate the right half.
  source = a[2 : 2 + 64, 2 : 2 + 64]  # the grid's first sample
  Image.fromarray(source).save(tmp_path / "source.png")
  brush = np.zeros((64, 64, 4), np.uint8)
  brush[:, 32:] = (255, 0, 255, 255)
  Image.fromarray(brush).save(tmp_path / "brush.png")
  editor = {
    "background": gradio_client.handle_file(str(tmp_path / "source.png")),
    "layers": [gradio_client.handle_file(str(tmp_path / "brush.png"))],
    "composite": None,
  }
  painted, info = client.predict(editor, 5, 2, 7, 1.5, 20, 0.9, api_name="/inpaint")
  assert _png(painted).shape == (2 + 66, 2 * 66 + 2, 3)  # two samples in a row
  pn = info["finest_scale"]
  kept = np.asarray(info["kept"], bool)
  expected = np.zeros((pn, pn), bool)
  expected[:, : pn // 2] = True  # the left half, downsampled to the finest grid
  np.testing.assert_array_equal(kept, expected)
  # The input's tokens as this test computes them (not the app's own encoding).
  own = demo.family.scales.targets(demo.model.params["tokenizer"], source[None] / 127.5 - 1.0)
  want = np.asarray(own[-1]).reshape(pn, pn)
  np.testing.assert_array_equal(np.asarray(info["input_tokens"]), want)
  got = np.asarray(info["sample_tokens"])
  assert got.shape == (2, pn, pn)
  np.testing.assert_array_equal(got[:, kept], np.broadcast_to(want[kept], (2, kept.sum())))
  assert (got[:, ~kept] != want[~kept]).any()  # the painted half is sampled, not copied


def test_bad_input_is_an_error_message(app, tmp_path):
  url, demo = app
  client = gradio_client.Client(url, verbose=False)
  with pytest.raises(Exception, match="not in the list of choices"):
    client.predict(11, 1, 0, 1.5, 20, 0.9, api_name="/generate")  # 10 classes + unconditional
  with pytest.raises(Exception, match="upload an image"):
    client.predict(None, 0, 1, 0, 1.5, 20, 0.9, api_name="/inpaint")
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "black.png")
  editor = {"background": gradio_client.handle_file(str(tmp_path / "black.png")), "layers": []}
  with pytest.raises(Exception, match="the mask is empty"):
    client.predict(editor, 0, 1, 0, 1.5, 20, 0.9, api_name="/inpaint")
  with pytest.raises(errors.UserError, match="out of range.*accepted: 0..9, or 10"):
    demo.generate(11, 1, 0)


def test_class_names_and_masks(hub):
  import arvision

  model = arvision.load("var-d16")
  # The stand-in's converted config says ImageNet, but it has 10 classes: indices only.
  assert demo_lib.class_names(model.config, 10) == [f"class {i}" for i in range(10)]
  fmnist = ml_collections.ConfigDict(dict(data=dict(source="fashion_mnist")))
  assert demo_lib.class_names(fmnist, 10)[:2] == ["t-shirt/top", "trouser"]
  names = demo_lib.imagenet_names()
  assert names is not None and names[207] == "Golden Retriever" and len(set(names)) == 1000
  assert demo_lib.class_names(model.config, 1000)[360] == "otter"
  # Kept: the first column of a 4x4 grid. A token is kept when half or more of its cell is.
  masks = demo_lib.keep_masks(np.arange(16).reshape(4, 4) % 4 < 1, (1, 2, 4))
  assert [m.tolist() for m in masks[:2]] == [[False], [True, False, True, False]]
  assert masks[2].reshape(4, 4)[:, 0].all() and not masks[2].reshape(4, 4)[:, 1:].any()


@pytest.mark.parametrize(
  "config, knobs",
  [
    ("raster.py:smoke", ["cfg", "top_k", "top_p", "temperature"]),
    ("mar.py:smoke", ["cfg", "temperature"]),
  ],
)
def test_each_family_gets_the_knobs_its_sampler_takes(config, knobs):
  c = config_util.load_config_file(config)
  family = families.build(c, tokenizer=families.build(c.tokenizer.config))
  demo = demo_lib.Demo(api.Model(family, None, c, 0))  # the knobs need no params
  assert list(demo.knobs) == knobs
  assert demo.can_inpaint == (c.family == "raster")  # MAR's sampler takes no known tokens
  if "top_k" in knobs:  # up to the tokenizer's vocabulary
    assert demo.knobs["top_k"][2] == c.tokenizer.config.model.vocab_size


def test_raster_inpainting_keeps_the_input_tokens_outside_the_paint():
  """RandAR's random decoding order (LlamaGen's raster one is its identity case): the image's
  tokens go to the sampler permuted like the order it decodes in."""
  c = config_util.load_config_file("raster.py:smoke")
  with c.unlocked():
    c.model.order = "random"
  tokenizer = families.build(c.tokenizer.config)
  family = families.build(c, tokenizer=tokenizer)
  params = family.init(jax.random.key(0), None)
  params["tokenizer"] = tokenizer.init(jax.random.key(1), None)
  demo = demo_lib.Demo(api.Model(family, params, c, 0))
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  drawn = np.zeros((32, 32), bool)
  drawn[16:] = True  # regenerate the bottom half
  _, info = demo.inpaint(image, drawn, 1, 3, 5, **{k: v[-1] for k, v in demo.knobs.items()})
  side = family.grid_size
  kept = np.asarray(info["kept"], bool)
  assert kept.shape == (side, side) and kept[: side // 2].all() and not kept[side // 2 :].any()
  want = np.asarray(tokenizer.encode_idx(params["tokenizer"], demo.prepare(image)))[0]
  want = want.reshape(side, side)
  np.testing.assert_array_equal(np.asarray(info["input_tokens"]), want)
  got = np.asarray(info["sample_tokens"])
  np.testing.assert_array_equal(got[:, kept], np.broadcast_to(want[kept], (3, kept.sum())))
  assert (got[:, ~kept] != want[~kept]).any()


@pytest.mark.slow
def test_screenshot_with_headless_chromium(app, tmp_path):
  """The page as a browser draws it (the sample grid is filled on load). With
  ARVISION_WRITE_SCREENSHOT=1 the PNG also goes to experiments/results/demo_screenshot.png."""
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  if chromium is None:
    pytest.skip("needs Debian's chromium package (apt-get install chromium)")
  url, _ = app
  png = tmp_path / "shot.png"
  cmd = [
    chromium,
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--user-data-dir={tmp_path / 'profile'}",
    f"--screenshot={png}",
    "--window-size=1280,1000",
    "--virtual-time-budget=20000",
    url,
  ]
  subprocess.run(cmd, check=True, capture_output=True, timeout=120)
  shot = np.asarray(Image.open(png).convert("RGB"))
  assert shot.shape == (1000, 1280, 3)
  assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 500  # a drawn page, not a blank one
  if os.environ.get("ARVISION_WRITE_SCREENSHOT") == "1":
    shutil.copyfile(png, SCREENSHOT)

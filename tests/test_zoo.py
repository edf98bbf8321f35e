"""The zoo on a stand-in Hub: `arvision.load("var-d16")` downloads, converts once, caches.

No machine here reaches huggingface.co, so a small HTTP server on 127.0.0.1 serves the Hub's
file route (`/{repo}/resolve/{revision}/{filename}`, HEAD with X-Repo-Commit / ETag /
Content-Length, then GET) over official-format checkpoints generated here: seeded random weights
with the official key names and shapes (tests/data/var_official_keys.json `vae_small` /
`var_small`: a depth-2 VAR of the official classes). They are served under the real zoo file
names, so the real `var-d16` entry is exercised; the converters infer the tiny sizes from the
checkpoints' shapes. The server is tests/standin_hub.py, the `stand_in` fixture tests/conftest.py.
"""

import os

import jax
import numpy as np
import pytest
from cli_runner import run_cli
from PIL import Image

import arvision
from arvision import errors, hub, zoo

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _converted(tmp_path):
  d = tmp_path / "arvision" / "converted"
  return sorted(os.listdir(d)) if d.is_dir() else []


def test_load_var_d16_downloads_and_converts_once_then_reads_the_cache(stand_in, tmp_path):
  before = hub.conversions
  model = arvision.load("var-d16")
  images = model.sample([1, 7], jax.random.key(0))
  assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
  assert stand_in.gets() == 2, stand_in.file_requests()
  assert hub.conversions == before + 2  # VAE + transformer
  assert model.config.model.depth == 2 and model.config.data.num_classes == 10
  assert len(_converted(tmp_path)) == 2
  assert hub.cached(zoo.get("var-d16")) == "converted"

  again = arvision.load("var-d16")
  assert stand_in.gets() == 2 and hub.conversions == before + 2  # neither touched
  np.testing.assert_array_equal(again.sample([1, 7], jax.random.key(0)), images)


def test_offline_with_a_warm_cache_makes_no_request(stand_in, tmp_path, monkeypatch):
  arvision.load("var-d16")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  n = len(stand_in.file_requests())
  model = arvision.load("var-d16")
  assert len(stand_in.file_requests()) == n
  assert model.sample([3], jax.random.key(1)).shape == (1, 64, 64, 3)


def test_offline_with_a_cold_cache_names_the_file(stand_in, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(errors.NotFound, match="var_d16.pth is not in the Hub cache.*HF_HUB_OFFLINE"):
    arvision.load("var-d16")
  assert stand_in.file_requests() == []


def test_truncated_download_is_an_error_naming_the_file_and_leaves_the_cache_clean(
  stand_in, tmp_path
):
  stand_in.truncate["var_d16.pth"] = 1000
  with pytest.raises(errors.UserError, match="var_d16.pth"):
    arvision.load("var-d16")
  assert [n for n in _converted(tmp_path) if n.startswith("var-")] == []
  snapshots = tmp_path / "hf" / "hub" / "models--FoundationVision--var"
  names = [os.path.basename(p) for p, _, fs in os.walk(snapshots) for p in [p] + fs]
  assert "var_d16.pth" not in names and not any(n.endswith(".incomplete") for n in names)
  del stand_in.truncate["var_d16.pth"]  # the network is back: the next load works
  assert arvision.load("var-d16").config.model.depth == 2


def test_wrong_hash_is_an_error_naming_the_file_and_leaves_the_cache_clean(stand_in, tmp_path):
  stand_in.wrong_etag.add("var_d16.pth")
  with pytest.raises(
    errors.UserError, match=r"var-d16 \(FoundationVision/var/var_d16.pth\).*sha256"
  ):
    arvision.load("var-d16")
  assert [n for n in _converted(tmp_path) if n.startswith("var-")] == []
  hf = tmp_path / "hf" / "hub" / "models--FoundationVision--var"
  assert not any("var_d16.pth" in fs for _, _, fs in os.walk(hf / "snapshots"))
  assert len(os.listdir(hf / "blobs")) == 1  # only the VAE's blob is left
  stand_in.wrong_etag.clear()
  assert arvision.load("var-d16").config.model.depth == 2


def test_hf_url_detects_the_kind_and_uses_the_default_tokenizer(stand_in):
  model = arvision.load("hf://FoundationVision/var/var_d16.pth")
  assert model.config.family == "var" and model.config.model.num_heads == 2
  assert model.config.tokenizer.config.model.vocab_size == 64


def test_unknown_names_and_non_hub_entries_say_what_to_do(stand_in):
  with pytest.raises(errors.NotFound, match="no zoo model 'var-d17'.*var-d16"):
    arvision.load("var-d17")
  with pytest.raises(
    errors.UserError, match="mar-b is not on the Hugging Face Hub.*dropbox.*--ema"
  ):
    arvision.load("mar-b")
  with pytest.raises(errors.UserError, match="hf://<owner>/<repo>"):
    arvision.load("hf://justone")


def test_zoo_table_is_complete():
  names = set(zoo.ENTRIES)
  assert {f"var-d{d}" for d in (16, 20, 24, 30, 36)} <= names
  assert {"llamagen-b", "llamagen-l", "llamagen-xl", "llamagen-xxl", "llamagen-3b"} <= names
  assert {"mar-b", "mar-l", "mar-h", "var-vae", "llamagen-vq16", "mar-kl16"} <= names
  for e in zoo.ENTRIES.values():
    assert e.tokenizer is None or e.tokenizer in zoo.ENTRIES, e.name
    assert (e.repo is None) == (e.url is not None), e.name
    assert e.license and e.source, e.name


def test_cli_sample_by_model_name_and_zoo_listing(stand_in, tmp_path):
  code, out, err = run_cli("zoo")
  assert code == 0, err
  row = next(line for line in out.splitlines() if line.startswith("var-d16 "))
  assert "3.55" in row and "hf://FoundationVision/var/var_d16.pth" in row and " - " in row

  grid = tmp_path / "grid.png"
  args = ["--model", "var-d16", "--labels", "1,7", "--per_label", "2", "--out", grid]
  code, out, err = run_cli("sample", *args, "--sample_kw", "cfg=1.5,top_k=5")
  assert code == 0, err
  side = 2 * (2 * (64 + 2) + 2)  # 2x2 images of 64 px, 2 px padding, scaled 2x
  assert Image.open(grid).size == (side, side)
  assert "compile" in err and "sample 4" in err  # the progress bar's phases

  code, out, err = run_cli("zoo")
  row = next(line for line in out.splitlines() if line.startswith("var-d16 "))
  assert "converted" in row

  code, _, err = run_cli("sample", "--model", "var-d16", "--workdir", tmp_path, "--out", grid)
  assert code == 2 and "one of --model and --workdir" in err.strip().splitlines()[-1]

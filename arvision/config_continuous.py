"""Config blocks the continuous-token families share (MAR and its successors on a KL tokenizer).

configs/mar.py, xar.py, flowar.py and arflow.py build on the same pieces: a frozen KL tokenizer
config, ImageNet 256x256 data, MAR's official ImageNet recipe (LTH14/mar `main_mar.py`, which
xAR and FlowAR keep but for epochs, base lr and clipping) and the CPU-sized recipe of their small
variants. Each config keeps its own values (tables, sampling, model fields) and calls these for
the blocks that are the same.
"""

from __future__ import annotations

import math

import ml_collections as mlc

from arvision.config_util import load_config_file, set_run_length

IMAGENET_TRAIN_SIZE = 1_281_167


def kl_tokenizer(spec: str) -> mlc.ConfigDict:
  """`tokenizer` block: the config `spec` (unlocked copy), to be trained first unless given."""
  tok = mlc.ConfigDict(load_config_file(spec).to_dict())  # unlocked copy
  if spec.endswith(":smoke"):
    tok.model.type = "kl"  # the tiny tokenizer as a KL autoencoder
  return mlc.ConfigDict(dict(config=tok, checkpoint=""))


def encoder_decoder(v: dict) -> dict:
  """MAR-style encoder = decoder sizes from a table row's `depth`, `width`, `heads`."""
  return dict(
    encoder_embed_dim=v["width"],
    encoder_depth=v["depth"],
    encoder_num_heads=v["heads"],
    decoder_embed_dim=v["width"],
    decoder_depth=v["depth"],
    decoder_num_heads=v["heads"],
  )


def imagenet_data(c: mlc.ConfigDict, batch_size: int) -> None:
  """ImageNet 256x256 (TFDS), hflip, center crop (the official ADM crop approximated)."""
  c.data.source = "tfds:imagenet2012"
  c.data.image_size = 256
  c.data.channels = 3
  c.data.num_classes = 1000
  c.data.batch_size = batch_size
  c.data.hflip = True
  c.data.resize_ratio = 1.0
  c.data.random_crop = False


def mar_imagenet_recipe(c: mlc.ConfigDict, *, epochs: int, blr: float, clip_norm: float) -> None:
  """MAR's official ImageNet recipe: batch 2048, lr = blr * batch / 256 after 100 warmup epochs
  then constant, EMA 0.9999, 50k evaluation samples; `epochs`, `blr` and `clip_norm` vary."""
  imagenet_data(c, batch_size=2048)
  steps_per_epoch = IMAGENET_TRAIN_SIZE / c.data.batch_size
  c.total_steps = math.ceil(epochs * steps_per_epoch)
  c.optim.lr = blr
  c.optim.lr_scaling = "batch256"
  c.optim.schedule = "constant"
  c.optim.warmup_steps = round(100 * steps_per_epoch)
  c.optim.clip_norm = clip_norm
  c.optim.ema_decay = 0.9999
  c.log_every = 100
  c.checkpoint_every = 5000
  c.eval.num_samples = 50_000
  c.eval.batch_size = 256


def small_recipe(c: mlc.ConfigDict, v: dict, *, clip_norm: float, smoke: bool) -> None:
  """The small variants' recipe: data as the tokenizer's (set `c.tokenizer` first), the table
  row's batch / steps / lr / warmup / EMA, cosine to 0.1x, a short end-of-training eval (`smoke`:
  one tiny batch, for tests)."""
  tok_data = c.tokenizer.config.data
  c.data.source = tok_data.source
  c.data.image_size = tok_data.image_size
  c.data.channels = tok_data.channels
  c.data.num_classes = tok_data.num_classes
  c.data.batch_size = v["batch_size"]
  set_run_length(c, v["total_steps"])
  c.optim.lr = v["lr"]
  c.optim.lr_scaling = "none"
  c.optim.schedule = "cosine"
  c.optim.end_lr_factor = 0.1
  c.optim.warmup_steps = v["warmup_steps"]
  c.optim.clip_norm = clip_norm
  c.optim.ema_decay = v["ema_decay"]
  if smoke:
    c.eval.num_batches = 1
    c.eval.num_samples = 16
    c.eval.batch_size = 16
    c.data.eval_batch_size = 16
  else:
    c.eval.num_samples = 200  # at the end of training; `arvision eval` does the full evaluation
    c.eval.batch_size = 250

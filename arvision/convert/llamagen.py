"""FoundationVision/LlamaGen checkpoints -> arvision: `vq_ds16_c2i.pt`, `c2i_{B,L,XL,XXL,3B}_*.pt`.

Any size converts: layers, width, vocabulary, classes, GQA heads and the SwiGLU width are read
from the shapes; the number of heads is the official variant's when (layers, width) match one,
else `--num_heads` (default head dim 64). What was inferred is logged.

    arvision convert llamagen_vq vq_ds16_c2i.pt --out runs/llamagen_vq
    arvision convert llamagen c2i_L_256.pt [--vae runs/llamagen_vq] --out runs/llamagen_L

Without `--vae` the generator export has no tokenizer params and can't decode; pass the converted
VQ dir (or the official `vq_ds16_c2i.pt`).

Key layout. The VQ model names its modules `conv_blocks.<i>.res.<j>` / `.attn.<j>` and
`mid.<0|1|2>`; they are renamed to the LDM tree of `arvision/tokenizers/autoencoder.py` (encoder
`conv_blocks.<i>` -> `down_<i>`, decoder `conv_blocks.<k>` -> `up_<L-1-k>`, `res` -> `block`,
`mid.0/1/2` -> `mid/block_1`, `mid/attn_1`, `mid/block_2`), then the common rules apply (Linear
[out, in] -> [in, out], conv OIHW -> HWIO). The GPT's names map 1:1 (`layers.3.attention.wqkv` ->
`layers_3/attention/wqkv/kernel`). Skipped buffers: `quantize.codebook_used` (usage statistics),
`freqs_cis`, KV caches and `causal_mask` (recomputed).

Checkpoint layouts: weights under "model" (DDP), "module" (DeepSpeed), "state_dict", or a raw state
dict (FSDP), as the official sampling scripts read them.
"""

from __future__ import annotations

import os
import re

import ml_collections as mlc
import numpy as np
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import config_util, errors, families
from arvision.convert import common


def vq_renames(num_levels: int) -> tuple:
  """Renames of the LlamaGen VQ keys to the LDM tree (`num_levels` = len(ch_mult))."""
  return (
    (r"^encoder\.conv_blocks\.(\d+)\.", r"encoder.down.\1."),
    (
      r"^decoder\.conv_blocks\.(\d+)\.",
      lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.",
    ),
    (r"\.res\.(\d+)\.", r".block.\1."),
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2."),
    (r"^quantize\.embedding\.weight$", r"quantize.embedding"),
  )


VQ_SKIP = (r"quantize\.codebook_used",)
GPT_SKIP = (r"freqs_cis", r"causal_mask", r"layers\.\d+\.attention\.kv_cache\.(k|v)_cache")


def vq_config(variant: str = "llamagen_vq16", image_size: int | None = None) -> mlc.ConfigDict:
  c = config_util.load_config_file(f"tokenizer.py:{variant}")
  if image_size:
    with c.unlocked():
      c.data.image_size = int(image_size)
  return c


def _count(state_dict: dict, prefix: str) -> int:
  idx = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
  return 1 + max(idx) if idx else 0


def infer_vq_config(state_dict: dict, image_size: int | None = None) -> mlc.ConfigDict:
  """The VQ config whose shapes match the checkpoint: channels and levels from the encoder's
  convs, residual blocks per level, latent and codebook sizes, and whether the last level
  attends (VQ-16's `using_sa`)."""
  for key in ("encoder.conv_in.weight", "quantize.embedding.weight", "encoder.conv_out.weight"):
    if key not in state_dict:
      raise errors.UserError(f"not a LlamaGen VQ checkpoint: key {key!r} is missing")
  c = mlc.ConfigDict(vq_config(image_size=image_size).to_dict())
  ch = int(state_dict["encoder.conv_in.weight"].shape[0])
  levels = _count(state_dict, "encoder.conv_blocks.")
  m = c.model
  m.ch = ch
  m.ch_mult = tuple(
    int(state_dict[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]) // ch
    for i in range(levels)
  )
  m.num_res_blocks = _count(state_dict, "encoder.conv_blocks.0.res.")
  m.z_channels = int(state_dict["encoder.conv_out.weight"].shape[0])
  m.vocab_size, m.embed_dim = (int(x) for x in state_dict["quantize.embedding.weight"].shape)
  m.quant_conv_ks = int(state_dict["quant_conv.weight"].shape[-1])
  m.using_sa = f"encoder.conv_blocks.{levels - 1}.attn.0.q.weight" in state_dict
  return c


def convert_vq(state_dict: dict, config=None) -> tuple[dict, mlc.ConfigDict]:
  """LlamaGen VQModel state dict -> (tokenizer params `{"ae": ...}`, tokenizer config); the
  config is inferred from the checkpoint's shapes unless given."""
  config = config or infer_vq_config(state_dict)
  family = families.build(config)
  ae = common.convert(
    state_dict,
    family.abstract_params()["ae"],
    renames=vq_renames(len(config.model.ch_mult)),
    skip=VQ_SKIP,
    what="LlamaGen VQ checkpoint",
  )
  return {"ae": ae}, config


def _image_size_from_name(path: str) -> int | None:
  m = re.search(r"_(\d{3,4})\.(pt|pth|bin|safetensors)$", os.path.basename(path))
  return int(m.group(1)) if m else None


def gpt_config(
  state_dict: dict, image_size: int | None = None, num_heads: int | None = None
) -> mlc.ConfigDict:
  """The raster config whose shapes match the checkpoint: layers from the block count, width and
  vocabulary from `tok_embeddings`, classes from `cls_embedding`, GQA key/value heads from
  `wqkv`, the SwiGLU width from `feed_forward.w1`. The number of heads is not in the shapes: the
  official variant's when (layers, width) match one, else `num_heads` (default: head dim 64).
  The recipe is the official variant's of the nearest width."""
  if "tok_embeddings.weight" not in state_dict:
    raise errors.UserError(
      "LlamaGen GPT checkpoint: no 'tok_embeddings.weight' (is this a VQ checkpoint? use "
      "`arvision convert llamagen_vq`)"
    )
  n_layer = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
  vocab, dim = (int(x) for x in state_dict["tok_embeddings.weight"].shape)
  spec = _raster_module().RASTER_MODELS
  names = [n for n, v in spec.items() if v["n_layer"] == n_layer and v["dim"] == dim]
  base = names[0] if names else min(spec, key=lambda n: abs(spec[n]["dim"] - dim))
  heads = num_heads or (spec[base]["n_head"] if names else max(1, dim // 64))
  if dim % heads:
    raise errors.UserError(f"num_heads={heads} does not divide the checkpoint's width {dim}")
  head_dim = dim // heads
  qkv_rows = int(state_dict["layers.0.attention.wqkv.weight"].shape[0])
  kv_heads, rest = divmod(qkv_rows - dim, 2 * head_dim)
  if rest or kv_heads < 1 or heads % kv_heads:
    raise errors.UserError(
      f"wqkv has {qkv_rows} rows: with {heads} heads of {head_dim} that is no whole number of "
      "key/value heads; pass the checkpoint's --num_heads"
    )
  arg = base + (f",image_size={image_size}" if image_size else "")
  config = mlc.ConfigDict(config_util.load_config_file(f"raster.py:{arg}").to_dict())
  config.variant = base if names else "inferred"
  m = config.model
  m.n_layer, m.dim, m.n_head = n_layer, dim, heads
  m.n_kv_head = 0 if kv_heads == heads else kv_heads
  hidden = int(state_dict["layers.0.feed_forward.w1.weight"].shape[0])
  from arvision.models.raster import ffn_hidden  # noqa: PLC0415

  if ffn_hidden(dim, m.multiple_of) != hidden:
    # the official rule rounds up to `multiple_of`: a multiple that reproduces this width
    fits = [q for q in (256, 128, 64, 32, 16, 8, 1) if ffn_hidden(dim, q) == hidden]
    if not fits:
      raise errors.UserError(
        f"feed_forward.w1 has {hidden} rows; no multiple_of reproduces it for width {dim}"
      )
    m.multiple_of = fits[0]
  config.data.num_classes = int(state_dict["cls_embedding.embedding_table.weight"].shape[0]) - 1
  config.tokenizer.config.model.vocab_size = vocab
  return config


def describe_gpt(c) -> str:
  m = c.model
  return (
    f"LlamaGen GPT layers={m.n_layer} dim={m.dim} heads={m.n_head} "
    f"kv_heads={m.n_kv_head or m.n_head} multiple_of={m.multiple_of} classes={c.data.num_classes} "
    f"vocab={c.tokenizer.config.model.vocab_size} image_size={c.data.image_size}"
  )


def _raster_module():
  import importlib.util  # noqa: PLC0415

  path = os.path.join(config_util.CONFIG_DIR, "raster.py")
  spec = importlib.util.spec_from_file_location("arvision_config_raster_table", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def convert_gpt(state_dict: dict, config) -> dict:
  """LlamaGen GPT state dict -> raster params (the tokenizer is converted separately)."""
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(
    state_dict, family.abstract_params(), skip=GPT_SKIP, what="LlamaGen GPT checkpoint"
  )


def _tokenizer_from(vae: str, image_size: int):
  """`--vae` is an `arvision convert llamagen_vq` output dir or the official `.pt`."""
  if os.path.isdir(vae):
    loaded = ckpt_lib.load_params(vae)
    config = ckpt_lib.read_config(vae)
    with config.unlocked():
      config.data.image_size = image_size  # the conv tokenizer works at any multiple of 16
    return loaded["params"], config
  sd = common.load_torch_state_dict(vae)
  return convert_vq(sd, infer_vq_config(sd, image_size))


def main_llamagen_vq(path: str, out: str) -> str:
  params, config = convert_vq(common.load_torch_state_dict(path))
  ckpt_lib.save_export(out, params, {}, config)
  return out


def main_llamagen(
  path: str,
  out: str,
  vae: str | None = None,
  image_size: int | None = None,
  num_heads: int | None = None,
):
  sd = common.load_torch_state_dict(path)
  config = gpt_config(sd, image_size or _image_size_from_name(path), num_heads)
  logging.info("%s: inferred %s", path, describe_gpt(config))
  frozen = {}
  if vae:
    tok_params, tok_config = _tokenizer_from(vae, int(config.data.image_size))
    frozen["tokenizer"] = tok_params
    with config.unlocked():
      config.tokenizer.config = tok_config
      config.tokenizer.checkpoint = os.path.abspath(vae)
  params = convert_gpt(sd, config)
  ckpt_lib.save_export(out, params, frozen, config)
  return out


def vq_export_renames(num_levels: int) -> tuple:
  """The inverse of `vq_renames`: the LDM tree back to LlamaGen's VQ names."""
  return (
    (r"^(encoder|decoder)\.mid\.block\.1\.", r"\1.mid.0."),
    (r"^(encoder|decoder)\.mid\.attn\.1\.", r"\1.mid.1."),
    (r"^(encoder|decoder)\.mid\.block\.2\.", r"\1.mid.2."),
    (r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1."),
    (
      r"^decoder\.up\.(\d+)\.",
      lambda m: f"decoder.conv_blocks.{num_levels - 1 - int(m.group(1))}.",
    ),
    (r"\.block\.(\d+)\.", r".res.\1."),
    (r"^quantize\.weight$", "quantize.embedding.weight"),
  )


CODEBOOK_USED = 65536  # the official VQModel's usage buffer length


def to_official_vq(tok_params: dict, tok_config) -> dict:
  """Tokenizer params -> the official VQModel state dict (usage buffer as zeros)."""
  sd = common.to_state_dict(
    tok_params["ae"], renames=vq_export_renames(len(tok_config.model.ch_mult))
  )
  sd["quantize.codebook_used"] = np.zeros(CODEBOOK_USED, np.float32)
  return sd


def to_official_gpt(params: dict, config) -> dict:
  """Raster params -> the official GPT state dict (names map 1:1)."""
  return common.to_state_dict({k: v for k, v in params.items() if k != "tokenizer"})

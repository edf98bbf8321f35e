"""Parity with the official LlamaGen code: same random weights -> same codes, images, logits, tokens.

    python experiments/parity_llamagen_official.py --reference PATH_TO_FoundationVision_LlamaGen
    python experiments/parity_llamagen_official.py --reference PATH --dump_keys tests/data/llamagen_official_keys.json

Builds the official `VQModel` and GPT `Transformer` from a checkout of FoundationVision/LlamaGen
on the CPU with random weights (imported from --reference, never copied here), converts their
state dicts with `arvision.convert.llamagen`, and compares: VQ codes of the same images and the
decoded images; the teacher-forced logits (official training forward, dropouts off); greedy
(top_k=1) CFG generation with the official gpt-fast KV cache against arvision's sampler.
Writes experiments/results/parity_llamagen_official.json. `--dump_keys` only writes the official
key -> shape tables used by tests/test_convert_llamagen.py (built on the meta device: no memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

GPT_SIZES = {"B": "GPT-B", "L": "GPT-L", "XL": "GPT-XL", "XXL": "GPT-XXL", "3B": "GPT-3B"}
SMALL_GPT = dict(n_layer=2, n_head=4, dim=64, vocab_size=64, block_size=16, num_classes=10)


def _imports(reference: str):
  sys.path.insert(0, os.path.abspath(reference))
  from autoregressive.models import generate as gen  # noqa: PLC0415
  from autoregressive.models import gpt  # noqa: PLC0415
  from tokenizer.tokenizer_image import vq_model  # noqa: PLC0415

  return gpt, gen, vq_model


def _table(module) -> dict:
  return {k: list(v.shape) for k, v in module.state_dict().items()}


def dump_keys(reference: str, out: str):
  import torch  # noqa: PLC0415

  gpt, _, vq_model = _imports(reference)
  tables = {}
  linspace = torch.linspace  # the drop-path rates call .item(): keep them on the CPU
  torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
  with torch.device("meta"):
    tables["vq16_full"] = _table(vq_model.VQ_16())
    for name, ctor in GPT_SIZES.items():
      tables[f"gpt_{name}"] = _table(gpt.GPT_models[ctor](block_size=256))
  torch.linspace = linspace
  tables["vq_small"] = _table(
    vq_model.VQModel(
      vq_model.ModelArgs(
        encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], z_channels=32, codebook_size=64
      )
    )
  )
  tables["gpt_small"] = _table(gpt.Transformer(gpt.ModelArgs(**SMALL_GPT)))
  tables["gpt_small_gqa"] = _table(gpt.Transformer(gpt.ModelArgs(n_kv_head=2, **SMALL_GPT)))
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: " + ", ".join(f"{k} ({len(v)} keys)" for k, v in tables.items()))


def small_configs(n_kv_head: int = 0):
  """arvision configs with the shapes of the small official models above."""
  from arvision import config_util  # noqa: PLC0415

  tok = mlc.ConfigDict(config_util.load_config_file("tokenizer.py:llamagen_vq16").to_dict())
  tok.model.update(ch_mult=(1, 2), z_channels=32, vocab_size=SMALL_GPT["vocab_size"])
  tok.data.image_size = 8  # 4x4 codes = block_size 16
  c = mlc.ConfigDict(config_util.load_config_file("raster.py:smoke").to_dict())
  c.model.update(
    dim=SMALL_GPT["dim"],
    n_layer=SMALL_GPT["n_layer"],
    n_head=SMALL_GPT["n_head"],
    n_kv_head=n_kv_head,
    multiple_of=256,
    attn_impl="xla",
  )
  c.data.num_classes = SMALL_GPT["num_classes"]
  c.data.image_size, c.data.channels = 8, 3
  c.tokenizer.config = tok
  return c


def parity(reference: str, batch: int, out: str):
  import torch  # noqa: PLC0415

  from arvision import families  # noqa: PLC0415
  from arvision.convert import common  # noqa: PLC0415
  from arvision.convert import llamagen as cl  # noqa: PLC0415

  gpt, gen, vq_model = _imports(reference)
  torch.manual_seed(0)
  rec = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "torch": torch.__version__}
  rec["platform"] = platform.platform()

  # --- VQ: small official VQModel (ch 128, ch_mult (1, 2), z 32, V 64) --------------------------
  vq = vq_model.VQModel(
    vq_model.ModelArgs(
      encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], z_channels=32, codebook_size=64
    )
  ).eval()
  with torch.no_grad():
    for p in vq.parameters():  # non-trivial GroupNorm affine params too
      p.add_(0.05 * torch.randn_like(p))
  config = small_configs()
  tok_params, _ = cl.convert_vq(
    {k: v.numpy() for k, v in vq.state_dict().items()}, config.tokenizer.config
  )
  tok = families.build(config.tokenizer.config)
  x = torch.rand(batch, 3, 8, 8) * 2 - 1
  with torch.no_grad():
    _, _, (_, _, idx_t) = vq.encode(x)
    idx_t = idx_t.reshape(batch, -1)
    dec_t = vq.decode_code(idx_t, [batch, 8, 4, 4])
  x_j = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  idx_j = np.asarray(tok.encode_idx(tok_params, x_j))
  rec["vq_codes_equal_frac"] = float(np.mean(idx_j == idx_t.numpy()))
  dec_j = np.asarray(tok.decode_idx(tok_params, jnp.asarray(idx_t.numpy())))
  # arvision's decode clips to [-1, 1] (the official caller clamps when saving images).
  dec_t = np.clip(dec_t.permute(0, 2, 3, 1).numpy(), -1.0, 1.0)
  rec["vq_decode_max_abs_diff"] = float(np.abs(dec_j - dec_t).max())
  rec["vq_decode_unclipped_frac"] = float(np.mean(np.abs(dec_t) < 1.0))

  # --- GPT: teacher-forced logits --------------------------------------------------------------
  results = {}
  for n_kv in (0, 2):
    kw = dict(SMALL_GPT, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model = gpt.Transformer(gpt.ModelArgs(n_kv_head=n_kv or None, **kw))
    with torch.no_grad():  # the head is zero-initialised: give it weights
      model.output.weight.normal_(0, 0.02)
      for layer in model.layers:
        layer.attention_norm.weight.add_(0.1 * torch.randn_like(layer.attention_norm.weight))
    model.cls_embedding.dropout_prob = 0.0  # keep the table size (11), drop no labels
    cfg = small_configs(n_kv)
    fam = families.build(cfg, tokenizer=tok)
    params = cl.convert_gpt(common.unwrap_state_dict(model.state_dict()), cfg)
    params = {**params, "tokenizer": tok_params}
    N, V = SMALL_GPT["block_size"], SMALL_GPT["vocab_size"]
    labels = torch.randint(0, 10, (batch,))
    codes = torch.randint(0, V, (batch, N))
    model.train()
    with torch.no_grad():
      logits_t, _ = model(cond_idx=labels, idx=codes[:, :-1], targets=codes)
    logits_j = fam.apply(params, jnp.asarray(labels.numpy()), jnp.asarray(codes.numpy()))
    diff = float(np.abs(np.asarray(logits_j) - logits_t.numpy()).max())
    scale = float(np.abs(logits_t.numpy()).max())

    # greedy CFG generation through both KV caches
    row = dict(logits_max_abs_diff=diff, logits_max_abs=scale)
    if not n_kv:  # the official KV cache allocates n_head heads: its generate() fails under GQA
      model.eval()
      with torch.no_grad():
        seq_t = gen.generate(model, labels, N, cfg_scale=2.0, top_k=1, top_p=1.0)
      _, seq_j, _ = fam.sample_tokens(
        params, jnp.asarray(labels.numpy()), jax.random.key(0), cfg=2.0, top_k=1, top_p=1.0
      )
      row["greedy_cfg_tokens_equal_frac"] = float(np.mean(np.asarray(seq_j) == seq_t.numpy()))
    results[f"n_kv_head={n_kv or SMALL_GPT['n_head']}"] = row
  rec["gpt"] = results
  rec["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
  print(json.dumps(rec, indent=2))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(rec, f, indent=2)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--reference", required=True, help="a checkout of FoundationVision/LlamaGen")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--out", default="experiments/results/parity_llamagen_official.json")
  args = ap.parse_args()
  if args.dump_keys:
    dump_keys(args.reference, args.dump_keys)
  else:
    parity(args.reference, args.batch, args.out)


if __name__ == "__main__":
  main()

"""Parity with the official PAR code: same random weights -> same teacher-forced logits and tokens.

    python experiments/parity_par_official.py --reference PATH_TO_YuqingWang1029_PAR \
        --out experiments/results/parity_par_official.json

Builds the official PAR `Transformer` (`autoregressive/models/gpt.py`, imported from
--reference, never copied here) small, on the CPU in float32 with random weights (the
zero-initialised head given weights), converts its state dict with `arvision.convert.par` (every
key must map) and compares, for M = 4 regions (`-4x`) and 16 regions (`-16x`, an 8x8 grid):
- the teacher-forced logits of the official training forward (tokens in region order, the
  transition tokens, the group mask; dropouts off): max abs error;
- greedy (top_k=1) CFG generation, official `generate` (its KV cache, sequential then group
  calls) against `PARFamily.sample_tokens`: the fraction of equal tokens, and the model calls.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts are not a package
from parity_common import run_record, small_raster_config, write_record  # noqa: E402

SMALL = dict(n_layer=2, n_head=4, dim=64, vocab_size=64, num_classes=10)


def _imports(reference: str):
  sys.path.insert(0, os.path.abspath(reference))
  from autoregressive.models import generate as gen  # noqa: PLC0415
  from autoregressive.models import gpt  # noqa: PLC0415

  return gpt, gen


def small_config(grid: int, regions: int):
  """The arvision `par` config with the small official model's shapes (a VQ-16 tokenizer shape
  at `grid` x `grid` codes, random weights: only the transformer is compared)."""
  return small_raster_config("par", grid, SMALL, regions=regions)


def compare(gpt, gen, grid: int, regions: int, batch: int) -> dict:
  import torch  # noqa: PLC0415

  from arvision import families  # noqa: PLC0415
  from arvision.convert import common  # noqa: PLC0415
  from arvision.convert import par as cp  # noqa: PLC0415

  M, N = regions * regions, grid * grid
  args = gpt.ModelArgs(
    block_size=N,
    spe_token_num=M - 1,
    ar_token_num=M,
    token_dropout_p=0.0,
    resid_dropout_p=0.0,
    ffn_dropout_p=0.0,
    **SMALL,
  )
  model = gpt.Transformer(args)
  with torch.no_grad():  # the head is zero-initialised: give it weights
    model.output.weight.normal_(0, 0.05)
    for layer in model.layers:
      layer.attention_norm.weight.add_(0.1 * torch.randn_like(layer.attention_norm.weight))
  model.cls_embedding.dropout_prob = 0.0  # keep the table (with the null class), drop no labels
  config = small_config(grid, regions)
  tok = families.build(config.tokenizer.config)
  sd = common.unwrap_state_dict(model.state_dict())
  params = cp.convert_gpt(sd, config, tok)
  fam = families.build(config, tokenizer=tok)
  params = {**params, "tokenizer": tok.init(jax.random.key(0), None)}
  labels = torch.randint(0, SMALL["num_classes"], (batch,))
  codes = torch.randint(0, SMALL["vocab_size"], (batch, N))  # in region order
  model.train()  # the official training forward (dropouts are 0)
  with torch.no_grad():
    logits_t, _ = model(cond_idx=labels, idx=codes[:, :-1], targets=codes)
  logits_j = fam.apply(params, jnp.asarray(labels.numpy()), jnp.asarray(codes.numpy()))
  row = dict(
    grid=grid,
    regions=regions,
    groups_M=M,
    num_tokens=N,
    official_keys=len(sd),
    logits_max_abs_diff=float(np.abs(np.asarray(logits_j) - logits_t.numpy()).max()),
    logits_max_abs=float(np.abs(logits_t.numpy()).max()),
  )
  model.eval()
  with torch.no_grad():
    seq_t = gen.generate(
      model, labels, N, cfg_scale=2.0, top_k=1, top_p=1.0, ar_token_num=M, spe_token_num=M - 1
    )
  _, grid_j, _, stats = fam.sample_tokens(
    params,
    jnp.asarray(labels.numpy()),
    jax.random.key(0),
    cfg=2.0,
    top_k=1,
    top_p=1.0,
    return_stats=True,
  )
  seq_j = np.asarray(grid_j)[:, fam.order]  # raster grid -> region order (the official output)
  row["greedy_cfg_tokens_equal_frac"] = float(np.mean(seq_j == seq_t.numpy()))
  row["model_calls_per_image"] = int(stats["calls"][0])
  row["official_model_calls"] = M + N // M - 1  # prefill, M - 1 single, N/M - 1 group calls
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reference", required=True, help="a checkout of YuqingWang1029/PAR")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--out", default="experiments/results/parity_par_official.json")
  args = ap.parse_args()
  import torch  # noqa: PLC0415

  gpt, gen = _imports(args.reference)
  torch.manual_seed(0)
  rec = run_record(
    "python experiments/parity_par_official.py --reference PAR --batch "
    f"{args.batch} --out {args.out}"
  )
  rec["rows"] = [compare(gpt, gen, 4, 2, args.batch), compare(gpt, gen, 8, 4, args.batch)]
  write_record(args.out, rec)


if __name__ == "__main__":
  main()

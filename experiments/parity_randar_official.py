"""Parity with the official RandAR code: same random weights -> same logits and tokens.

    python experiments/parity_randar_official.py --reference PATH_TO_ziqipang_RandAR \
        --out experiments/results/parity_randar_official.json

Builds the official `RandARTransformer` (`RandAR/model/randar_gpt.py`, imported from --reference,
never copied here) small (4x4 and 8x8 token grids), on the CPU in float32 with random weights (the
zero-initialised head given weights), converts its state dict with `arvision.convert.randar`
(every key must map) and compares:
- teacher-forced logits of the official training forward in a random order per example
  (position instructions interleaved; dropouts off): max abs error;
- greedy (top_k=1) generation with the official linear guidance (`cfg_scales` 1.0 -> 4.0) in the
  same orders, official `generate` (its KV cache and parallel decoding) against
  `RandARFamily.sample_tokens`, for one token per call and for the official cosine schedule
  (`num_inference_steps` = N * 88 / 256): the fraction of equal tokens, and the model calls.
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
  from RandAR.model import randar_gpt  # noqa: PLC0415

  return randar_gpt


def small_config(grid: int, steps: int):
  """The arvision `randar` config with the small official model's shapes (a VQ-16 tokenizer
  shape at `grid` x `grid` codes, random weights: only the transformer is compared)."""
  return small_raster_config("randar", grid, SMALL, schedule_steps=steps)


def compare(randar_gpt, grid: int, batch: int) -> dict:
  import torch  # noqa: PLC0415

  from arvision import families  # noqa: PLC0415
  from arvision.convert import common  # noqa: PLC0415
  from arvision.convert import randar as cr  # noqa: PLC0415

  N = grid * grid
  steps = max(1, round(N * 88 / 256))
  model = randar_gpt.RandARTransformer(
    block_size=N,
    token_dropout_p=0.0,
    resid_dropout_p=0.0,
    ffn_dropout_p=0.0,
    num_inference_steps=steps,
    grad_checkpointing=False,
    **SMALL,
  )
  with torch.no_grad():  # the head is zero-initialised: give it weights
    model.output.weight.normal_(0, 0.05)
    for layer in model.layers:
      layer.attention_norm.weight.add_(0.1 * torch.randn_like(layer.attention_norm.weight))
  model.cls_embedding.dropout_prob = 0.0  # keep the table (with the null class), drop no labels
  config = small_config(grid, steps)
  tok = families.build(config.tokenizer.config)
  sd = common.unwrap_state_dict(model.state_dict())
  params = cr.convert_gpt(sd, config, tok)
  fam = families.build(config, tokenizer=tok)
  params = {**params, "tokenizer": tok.init(jax.random.key(0), None)}
  labels = torch.randint(0, SMALL["num_classes"], (batch,))
  codes = torch.randint(0, SMALL["vocab_size"], (batch, N))  # raster
  order = torch.stack([torch.randperm(N) for _ in range(batch)])
  model.train()  # the official training forward (dropouts are 0)
  with torch.no_grad():
    logits_t, _, _ = model(idx=codes, cond_idx=labels, token_order=order, targets=codes)
  seq = torch.gather(codes, 1, order)
  logits_j = fam.apply(
    params, jnp.asarray(labels.numpy()), jnp.asarray(seq.numpy()), order=order.numpy()
  )
  row = dict(
    grid=grid,
    num_tokens=N,
    official_keys=len(sd),
    logits_max_abs_diff=float(np.abs(np.asarray(logits_j) - logits_t.numpy()).max()),
    logits_max_abs=float(np.abs(logits_t.numpy()).max()),
  )
  model.eval()
  for name, official_steps in (("one_per_call", -1), ("official_parallel", steps)):
    with torch.no_grad():
      codes_t = model.generate(
        labels, order, cfg_scales=(1.0, 4.0), num_inference_steps=official_steps, top_k=1
      )
    schedule = (1,) * N if official_steps == -1 else None  # None: the model's (randar, steps)
    _, codes_j, _, stats = fam.sample_tokens(
      params,
      jnp.asarray(labels.numpy()),
      jax.random.key(0),
      order=jnp.asarray(order.numpy()),
      cfg=4.0,
      cfg_start=1.0,
      top_k=1,
      schedule=schedule,
      return_stats=True,
    )
    row[name] = dict(
      official_num_inference_steps=official_steps,
      greedy_cfg_tokens_equal_frac=float(np.mean(np.asarray(codes_j) == codes_t.numpy())),
      model_calls_per_image=int(stats["calls"][0]),
    )
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reference", required=True, help="a checkout of ziqipang/RandAR")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--out", default="experiments/results/parity_randar_official.json")
  args = ap.parse_args()
  import torch  # noqa: PLC0415

  randar_gpt = _imports(args.reference)
  torch.manual_seed(0)
  rec = run_record(
    "python experiments/parity_randar_official.py --reference RandAR --batch "
    f"{args.batch} --out {args.out}"
  )
  rec["rows"] = [compare(randar_gpt, 4, args.batch), compare(randar_gpt, 8, args.batch)]
  write_record(args.out, rec)


if __name__ == "__main__":
  main()

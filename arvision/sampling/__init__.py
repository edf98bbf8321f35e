"""Sampling helpers shared by the generator families: logit filtering, CFG, KV caches."""

from arvision.sampling.kv_cache import init_kv_caches, update_kv_cache
from arvision.sampling.topk import (
  cfg_mix,
  filter_top_k_top_p,
  gumbel_softmax,
  sample_top_k_top_p,
)

__all__ = [
  "cfg_mix",
  "filter_top_k_top_p",
  "gumbel_softmax",
  "init_kv_caches",
  "sample_top_k_top_p",
  "update_kv_cache",
]

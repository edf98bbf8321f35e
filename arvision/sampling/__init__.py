"""Sampling helpers shared by the generator families: logit filtering, guidance, KV caches."""

from arvision.sampling import guidance
from arvision.sampling.kv_cache import init_kv_caches, update_kv_cache
from arvision.sampling.topk import (
  filter_top_k_top_p,
  gumbel_softmax,
  sample_top_k_top_p,
)

__all__ = [
  "filter_top_k_top_p",
  "guidance",
  "gumbel_softmax",
  "init_kv_caches",
  "sample_top_k_top_p",
  "update_kv_cache",
]

"""Chunked attention: chunk-causal softmax (block-sparse) and the ARFlow-style hybrid.

See `kernel.py` (kernels) and `reference.py` (the exact definitions and pure-jnp references).
"""

from arvision.kernels.chunked.kernel import (
  chunk_causal_attention,
  gated_hybrid_chunk_attention,
  hybrid_chunk_attention,
)
from arvision.kernels.chunked.reference import (
  decayed_hybrid_reference,
  decayed_hybrid_scan,
  gated_decays,
  hybrid_chunk_attention_reference,
  hybrid_chunk_attention_scan,
)

__all__ = [
  "chunk_causal_attention",
  "decayed_hybrid_reference",
  "decayed_hybrid_scan",
  "gated_decays",
  "gated_hybrid_chunk_attention",
  "hybrid_chunk_attention",
  "hybrid_chunk_attention_reference",
  "hybrid_chunk_attention_scan",
]

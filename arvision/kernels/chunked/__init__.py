"""Chunked attention: chunk-causal softmax (block-sparse) and the ARFlow-style hybrid.

See `kernel.py` (kernels) and `reference.py` (the exact definitions and pure-jnp references).
"""

from arvision.kernels.chunked.kernel import chunk_causal_attention, hybrid_chunk_attention
from arvision.kernels.chunked.reference import (
  hybrid_chunk_attention_reference,
  hybrid_chunk_attention_scan,
)

__all__ = [
  "chunk_causal_attention",
  "hybrid_chunk_attention",
  "hybrid_chunk_attention_reference",
  "hybrid_chunk_attention_scan",
]

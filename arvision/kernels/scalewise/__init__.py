"""Scale-wise (block-causal) attention: block-sparse Pallas kernels for segment masks.

- `scalewise_attention` / `scalewise_decode` (kernel_gpu.py): `pl.pallas_call` flash attention with
  tile skipping from the mask spec; Triton on GPU, interpret mode on CPU.
- `splash_scalewise_attention` (kernel_tpu.py): splash attention with a computable mask (TPU).
- `reference.py`: dense and per-segment pure-jnp references.
"""

from arvision.kernels.scalewise.kernel_gpu import (
  TileTables,
  scalewise_attention,
  scalewise_decode,
  tile_tables,
)
from arvision.kernels.scalewise.reference import dense_reference, per_segment_reference

__all__ = [
  "TileTables",
  "dense_reference",
  "per_segment_reference",
  "scalewise_attention",
  "scalewise_decode",
  "splash_scalewise_attention",
  "tile_tables",
]


def __getattr__(name):
  # Splash imports TPU-only Pallas modules: load them on first use.
  if name == "splash_scalewise_attention":
    from arvision.kernels.scalewise.kernel_tpu import splash_scalewise_attention  # noqa: PLC0415

    return splash_scalewise_attention
  raise AttributeError(name)

"""Published per-chip peak numbers, for roofline estimates of a compiled step (`parallel.aot`).

Every row is the vendor's datasheet value for one chip (one TPU chip = what JAX calls one device
on v5p/v5e/v6e; one GPU). Units: FLOP/s (dense bf16, no sparsity), bytes, bytes/s. `ici_bw` is the
chip's total inter-chip bandwidth (all links, both directions, as published); a ring collective
over one axis sees at most half of it in each direction, so the roofline uses `ici_bw / 2` as
the per-chip send rate (`collective_bw`). GB is 10^9 bytes; the TPU pages give HBM capacity in
GiB (2^30 bytes), the GPU pages in GB.

Sources (read 2026-12):
- v5p: https://cloud.google.com/tpu/docs/v5p -- 459 TFLOP/s bf16, 95 GiB HBM, 2,765 GB/s HBM,
  4,800 Gbps ICI per chip.
- v5e: https://cloud.google.com/tpu/docs/v5e -- 197 TFLOP/s bf16, 16 GiB HBM, 819 GB/s HBM,
  1,600 Gbps ICI per chip.
- v6e (Trillium): https://cloud.google.com/tpu/docs/v6e -- 918 TFLOP/s bf16, 32 GiB HBM,
  1,640 GB/s HBM, 3,584 Gbps ICI per chip.
- H100 SXM: https://www.nvidia.com/en-us/data-center/h100/ -- 989 TFLOP/s dense bf16 (1,979 with
  sparsity), 80 GB HBM3, 3.35 TB/s, NVLink 900 GB/s.
- H200 SXM: https://www.nvidia.com/en-us/data-center/h200/ -- 989 TFLOP/s dense bf16, 141 GB
  HBM3e, 4.8 TB/s, NVLink 900 GB/s.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str  # "tpu" | "gpu"
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bw: float  # bytes/s
  ici_bw: float  # bytes/s, all links, both directions (NVLink for GPUs)
  source: str

  @property
  def collective_bw(self) -> float:
    """Bytes/s one chip sends in a bandwidth-optimal collective (half the bidirectional total)."""
    return self.ici_bw / 2

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {"collective_bw": self.collective_bw}


_G, _GiB = 1e9, 2**30
CHIPS = {
  "v5p": Chip("v5p", "tpu", 459e12, 95 * _GiB, 2765 * _G, 4800 * _G / 8, "cloud.google.com/tpu/docs/v5p"),
  "v5e": Chip("v5e", "tpu", 197e12, 16 * _GiB, 819 * _G, 1600 * _G / 8, "cloud.google.com/tpu/docs/v5e"),
  "v6e": Chip("v6e", "tpu", 918e12, 32 * _GiB, 1640 * _G, 3584 * _G / 8, "cloud.google.com/tpu/docs/v6e"),
  "h100": Chip("h100", "gpu", 989e12, 80 * _G, 3350 * _G, 900 * _G, "nvidia.com/en-us/data-center/h100"),
  "h200": Chip("h200", "gpu", 989e12, 141 * _G, 4800 * _G, 900 * _G, "nvidia.com/en-us/data-center/h200"),
}  # fmt: skip


def get(name: str) -> Chip:
  """The chip of a topology name's prefix (`v5p:4x4x8` -> v5p); case-insensitive."""
  key = name.split(":", 1)[0].lower()
  if key not in CHIPS:
    raise ValueError(f"unknown chip {key!r} (from {name!r}); known: {sorted(CHIPS)}")
  return CHIPS[key]

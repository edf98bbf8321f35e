"""Image tokenizers: a conv autoencoder with a quantizer (VQ, VAR multi-scale residual VQ, KL).

`arvision.tokenizers.family.build(config)` gives the Family the loop trains; `autoencoder`,
`quantizers`, `losses` and `metrics` are the pieces.
"""

from arvision.tokenizers.autoencoder import AttnBlock, Autoencoder, Decoder, Encoder, ResnetBlock
from arvision.tokenizers.quantizers import (
  DiagonalGaussian,
  MultiScaleVQ,
  VectorQuantizer,
  phi_index_table,
)

__all__ = [
  "AttnBlock",
  "Autoencoder",
  "Decoder",
  "DiagonalGaussian",
  "Encoder",
  "MultiScaleVQ",
  "ResnetBlock",
  "VectorQuantizer",
  "phi_index_table",
]

"""A VQ-like tokenizer stand-in for sampler tests of the token families (no weights to train)."""

import jax.numpy as jnp
import ml_collections as mlc


class TinyVQ:
  """A VQ-like tokenizer: code v is the grey level `levels[v]` of a `patch` x `patch` patch
  (with `codebook`: its 1-D codebook, for the samplers that read one)."""

  def __init__(self, vocab_size=16, latent_size=4, patch=2, codebook=False):
    self.config = mlc.ConfigDict(dict(model=dict(vocab_size=vocab_size)))
    self.latent_size, self.patch, self.vocab_size = latent_size, patch, vocab_size
    if codebook:
      self.codebook = lambda p: p["levels"][:, None]

  def init(self, rng):
    return {"levels": jnp.linspace(-1.0, 1.0, self.vocab_size)}

  def encode_idx(self, p, images):
    raise NotImplementedError  # sampling only

  def decode_idx(self, p, idx):
    s, P = self.latent_size, self.patch
    v = p["levels"][idx].reshape(-1, s, 1, s, 1, 1)
    return jnp.broadcast_to(v, (idx.shape[0], s, P, s, P, 1)).reshape(-1, s * P, s * P, 1)

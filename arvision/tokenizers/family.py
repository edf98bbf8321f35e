"""The tokenizer Family: conv autoencoder + quantizer (`model.type`: msvq | vq | kl | bsq) + losses.

```python
tok = build(config)                      # config = configs/tokenizer.py:fmnist_msvq
params = tok.init(rng, batch)            # {"ae": {...}} (+ "disc" when loss.gan_weight > 0)
loss, metrics = tok.loss(params, batch, rng, train=True)
recon, codes = tok.reconstruct(params, images)
```

Params layout: `params["ae"]` holds `encoder`, `decoder`, `quant_conv`, `post_quant_conv` and
`quantize` (see `autoencoder.py` for the torch key mapping); `params["disc"]` the PatchGAN.

Loss: `l1_weight*L1 + l2_weight*L2 + quant_weight*quantizer_loss` (VQ types) or
`+ kl_weight*KL` (kl), plus `perceptual_weight*perceptual_fn(...)` and the GAN terms
(`losses.gan_losses`) when on. The GAN starts at `loss.disc_start`; the step is read from
`batch["step"]` (a scalar the train loop adds) and taken as 0 when absent.

Generator-facing API (all take the tokenizer's params, all jit-able):
- msvq (VAR): `encode_idx` -> list of int32 [B, pn*pn]; `idx_to_var_input`; `next_input`;
  `decode_fhat`; `decode_idx`; `codebook`; attributes `patch_nums`, `vocab_size`, `embed_dim`.
  FlexVAR-style independent scales (`model.scales="independent"` of the var family):
  `encode_idx_independent`, `independent_input`.
- vq (LlamaGen; FlexVAR's FlexVAE is one with an l2-normalised 32-d codebook): `encode_idx` ->
  int32 [B, h*w]; `decode_idx`; `codebook`; `encode_idx_independent(patch_nums=)`,
  `independent_input` (FlexVAR's per-scale codes and next-scale inputs).
- bsq (Infinity's multi-scale binary spherical quantizer, `tokenizers/bsq.py`; codes are bits
  int32 [B, h*w, d] per scale): `encode_bits`, `bits_to_var_input`, `flip_requant` (bitwise
  self-correction), `bsq_next_input`, `decode_bits`, attributes `patch_nums` (the schedule),
  `bits` (d), `embed_dim` (= d).
- kl (MAR): `encode_latent(params, images, rng=None)` -> z * scale_factor [B, h, w, embed_dim]
  (posterior sample with `rng`, mode without); `decode_latent(params, z)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arvision.family import Family
from arvision.ops.resize import area, bicubic
from arvision.tokenizers import bsq as BSQ
from arvision.tokenizers import losses as L
from arvision.tokenizers import metrics as M
from arvision.tokenizers import quantizers as Q
from arvision.tokenizers.autoencoder import CONV_AXES, Autoencoder

TYPES = ("msvq", "vq", "kl", "bsq")


class TokenizerFamily(Family):
  """A tokenizer as a Family (kind "tokenizer"). See the module docstring for the API."""

  kind = "tokenizer"
  frozen_keys = ()

  def __init__(self, config, perceptual_fn: L.PerceptualFn | None = None):
    super().__init__(config)
    m, lc = config.model, config.loss
    self.type = str(m.type)
    if self.type not in TYPES:
      raise ValueError(f"model.type={self.type!r} is unknown; accepted: {TYPES}")
    self.image_size = int(config.data.image_size)
    self.channels = int(config.data.channels)
    ch_mult = tuple(int(c) for c in m.ch_mult)
    if not ch_mult:
      raise ValueError("model.ch_mult must name at least one level")
    self.downsample = 2 ** (len(ch_mult) - 1)
    if self.image_size % self.downsample:
      raise ValueError(
        f"data.image_size={self.image_size} is not divisible by the downsample factor "
        f"{self.downsample} of model.ch_mult={ch_mult}"
      )
    self.latent_size = self.image_size // self.downsample
    self.embed_dim = int(m.embed_dim)
    self.z_channels = int(m.z_channels)
    self.vocab_size = int(m.get("vocab_size", 0)) if self.type in ("msvq", "vq") else 0
    self.patch_nums = (
      tuple(int(p) for p in m.get("patch_nums", ())) if self.type in ("msvq", "bsq") else ()
    )
    self.bits = self.embed_dim if self.type == "bsq" else 0
    self.scale_factor = float(m.get("scale_factor", 1.0))
    beta = float(lc.get("beta", 0.25))
    eini = float(m.get("eini", -1.0))

    if self.type == "msvq":
      if self.z_channels != self.embed_dim:
        # VAR's VQVAE has z_channels == Cvae, and the var family reads model.z_channels as Cvae.
        raise ValueError(
          f"model.type='msvq' needs model.z_channels == model.embed_dim (VAR's Cvae); got "
          f"{self.z_channels} and {self.embed_dim}"
        )
      if not self.patch_nums or self.patch_nums[-1] != self.latent_size:
        raise ValueError(
          f"model.patch_nums={self.patch_nums} must end with the latent side {self.latent_size} "
          f"(image_size {self.image_size} / downsample {self.downsample})"
        )
      if list(self.patch_nums) != sorted(self.patch_nums):
        raise ValueError(f"model.patch_nums={self.patch_nums} must be increasing")
      quantize = Q.MultiScaleVQ(
        self.vocab_size,
        self.embed_dim,
        patch_nums=self.patch_nums,
        beta=beta,
        quant_resi=float(m.get("quant_resi", 0.5)),
        share_quant_resi=int(m.get("share_quant_resi", 4)),
        eini=eini,
      )
    elif self.type == "bsq":
      if self.z_channels != self.embed_dim or int(m.get("quant_conv_ks", 0)) != 0:
        raise ValueError(
          "model.type='bsq' (Infinity's VAE) has no quant convs and quantizes the encoder's "
          f"output: it needs model.quant_conv_ks=0 and model.z_channels == model.embed_dim (the "
          f"bits d); got {m.get('quant_conv_ks')}, {self.z_channels} and {self.embed_dim}"
        )
      if not self.patch_nums or self.patch_nums[-1] != self.latent_size:
        raise ValueError(
          f"model.patch_nums={self.patch_nums} must end with the latent side {self.latent_size} "
          f"(image_size {self.image_size} / downsample {self.downsample})"
        )
      if list(self.patch_nums) != sorted(set(self.patch_nums)):
        raise ValueError(f"model.patch_nums={self.patch_nums} must be increasing")
      quantize = BSQ.MultiScaleBSQ(self.bits, patch_nums=self.patch_nums)
    elif self.type == "vq":
      quantize = Q.VectorQuantizer(
        self.vocab_size,
        self.embed_dim,
        beta=beta,
        l2_norm=bool(m.get("l2_norm", False)),
        eini=eini,
      )
    else:
      quantize = Q.DiagonalGaussian()
    if self.type in ("msvq", "vq") and self.vocab_size < 2:
      raise ValueError(
        f"model.vocab_size={self.vocab_size} must be >= 2 for model.type={self.type!r}"
      )

    self.module = Autoencoder(
      quantize=quantize,
      embed_dim=self.embed_dim,
      in_channels=self.channels,
      out_channels=self.channels,
      ch=int(m.ch),
      ch_mult=ch_mult,
      num_res_blocks=int(m.num_res_blocks),
      z_channels=self.z_channels,
      using_sa=bool(m.using_sa),
      enc_attn_resolutions=tuple(int(r) for r in m.get("enc_attn_resolutions", ())),
      dec_attn_resolutions=tuple(int(r) for r in m.get("dec_attn_resolutions", ())),
      mid_attn=bool(m.get("mid_attn", True)),
      fused_qkv=bool(m.get("fused_qkv", True)),
      dropout=float(m.get("dropout", 0.0)),
      quant_conv_ks=int(m.get("quant_conv_ks", 3)),
      kl=self.type == "kl",
    )

    self.l1_weight = float(lc.get("l1_weight", 1.0))
    self.l2_weight = float(lc.get("l2_weight", 0.0))
    self.quant_weight = float(lc.get("quant_weight", 1.0))
    self.kl_weight = float(lc.get("kl_weight", 1e-6))
    self.gan_weight = float(lc.get("gan_weight", 0.0))
    self.disc_weight = float(lc.get("disc_weight", 1.0))
    self.disc_start = int(lc.get("disc_start", 0))
    self.perceptual_weight = float(lc.get("perceptual_weight", 0.0))
    self.perceptual_fn = perceptual_fn
    # Fail at build time, not at the first traced step.
    if self.perceptual_weight > 0 and perceptual_fn is None:
      L.perceptual_loss(None, self.perceptual_weight, None, None)
    self.disc = (
      L.NLayerDiscriminator(ndf=int(lc.get("disc_ndf", 64)), n_layers=int(lc.get("disc_layers", 3)))
      if self.gan_weight > 0
      else None
    )

  # --- params ------------------------------------------------------------------------------------

  def _dummy(self, batch_size: int = 1) -> jax.Array:
    return jnp.zeros((batch_size, self.image_size, self.image_size, self.channels), jnp.float32)

  def init_annotated(self, rng: jax.Array, batch=None) -> dict:
    """`{"ae": ..., "disc"?: ...}`. Only the image shape of `batch` matters (None: from the config)."""
    x = self._dummy() if batch is None or "image" not in batch else jnp.asarray(batch["image"])[:1]
    k_ae, k_disc, k_s = jax.random.split(rng, 3)
    ae = self.module.init({"params": k_ae, "sample": k_s, "dropout": k_s}, x, train=False)["params"]
    params = {"ae": ae}
    if self.disc is not None:
      params["disc"] = _annotate_convnet(self.disc.init(k_disc, x)["params"])
    return params

  def abstract_params(self):
    """Param shapes via `jax.eval_shape` (nothing allocated)."""
    return jax.eval_shape(lambda r: self.init(r, None), jax.random.key(0))

  def _ae(self, params) -> dict:
    return {"params": params["ae"]}

  def _quantize(self, params, name: str, *args):
    """Calls method `name` of the quantizer submodule with the tokenizer's params."""
    return self.module.apply(
      self._ae(params), *args, method=lambda mdl, *a: getattr(mdl.quantize, name)(*a)
    )

  # --- training ----------------------------------------------------------------------------------

  def loss(self, params, batch, rng, train: bool):
    x = jnp.asarray(batch["image"], jnp.float32)
    k_drop, k_sample = jax.random.split(rng)
    with self.computing():  # the compute dtype; reconstruction and losses come back float32
      recon, aux = self.module.apply(
        self._ae(params), x, train=train, rngs={"dropout": k_drop, "sample": k_sample}
      )
    rec, rec_m = L.reconstruction_loss(recon, x, self.l1_weight, self.l2_weight)
    quant = aux["loss"] * (self.kl_weight if self.type == "kl" else self.quant_weight)
    total = rec + quant
    metrics: dict[str, Any] = dict(rec_loss=rec, quant_loss=quant, l1=rec_m["l1"], l2=rec_m["l2"])
    perc = L.perceptual_loss(self.perceptual_fn, self.perceptual_weight, recon, x)
    if perc is not None:
      total = total + perc
      metrics["perceptual_loss"] = perc
    if self.disc is not None:
      step = batch["step"] if "step" in batch else 0
      gan, gan_m = L.gan_losses(
        self.disc,
        params["disc"],
        x,
        recon,
        step,
        self.disc_start,
        self.gan_weight,
        self.disc_weight,
      )
      total = total + gan
      metrics.update(gan_m)
    clipped = jax.lax.stop_gradient(jnp.clip(recon, -1.0, 1.0))
    metrics["psnr"] = jnp.mean(M.psnr(x, clipped))
    if self.type == "kl":
      metrics["kl"] = aux["kl"]
    elif self.type == "bsq":
      metrics["bit_mean"] = aux["bit_mean"]
      metrics["bit_entropy"] = aux["bit_entropy"]
    else:
      metrics["usage"] = aux["usage"]
      metrics["perplexity"] = aux["perplexity"]
    return total, metrics

  def reconstruct(self, params, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(recon clipped to [-1, 1], codes int32 [B, N] or None for kl). msvq codes: all scales;
    bsq: the bits of all scales [B, N, d]."""
    with self.computing():
      recon, aux = self.module.apply(
        self._ae(params), jnp.asarray(images, jnp.float32), train=False
      )
    return jnp.clip(recon, -1.0, 1.0), aux.get("codes")

  # --- generator-facing API ----------------------------------------------------------------------

  def _need(self, *types: str, what: str) -> None:
    if self.type not in types:
      raise ValueError(f"{what} needs model.type in {types}; this tokenizer is {self.type!r}")

  def encode_f(self, params, images: jax.Array) -> jax.Array:
    """Pre-quantization features (KL: moments) [B, h, w, C]."""
    with self.computing():  # this tokenizer's dtype, also inside a generator's forward
      return self.module.apply(self._ae(params), jnp.asarray(images, jnp.float32), method="encode")

  def encode_idx(self, params, images: jax.Array):
    """msvq: list of int32 [B, pn*pn] per scale; vq: int32 [B, h*w] (row-major)."""
    self._need("msvq", "vq", what="encode_idx")
    return self._quantize(params, "f_to_idx", self.encode_f(params, images))

  def encode_codes(self, params, images: jax.Array) -> jax.Array:
    """Flat codes int32 `[B, L]`: vq `[B, h*w]` row-major; msvq every scale, coarse to fine,
    concatenated `[B, sum(pn*pn)]` (the layout `arvision tokenize` writes)."""
    self._need("msvq", "vq", what="encode_codes")
    idx = self.encode_idx(params, images)
    return jnp.concatenate(idx, axis=1) if self.type == "msvq" else idx

  def idx_to_fhat(self, params, idx):
    """Codes -> quantized features [B, h, w, C] (msvq: list per scale; vq: [B, h*w])."""
    self._need("msvq", "vq", what="idx_to_fhat")
    if self.type == "msvq":
      return self._quantize(params, "idx_to_fhat", list(idx))
    return self._quantize(params, "idx_to_f", idx)

  def idx_to_var_input(self, params, idx_list) -> jax.Array:
    """VAR teacher-forcing input float32 [B, L - pn_0^2, C]."""
    self._need("msvq", what="idx_to_var_input")
    return self._quantize(params, "idx_to_var_input", list(idx_list))

  def next_input(self, params, si: int, f_hat: jax.Array, h_BxpnxpnxC: jax.Array):
    """One VAR step: (f_hat, next scale's input [B, pn', pn', C] or None after the last scale)."""
    self._need("msvq", what="next_input")
    return self._quantize(params, "next_input", si, f_hat, h_BxpnxpnxC)

  def encode_idx_independent(self, params, images: jax.Array, patch_nums=None) -> list[jax.Array]:
    """FlexVAR-style: each scale's own codes of the area-downsampled latent (no residual), a
    list of int32 [B, pn*pn] over `patch_nums` (default: the msvq schedule). msvq looks up its
    codebook as is; vq (FlexVAE, LlamaGen-style) its own rule (l2-normalised with `l2_norm`), as
    the official `vae.quantize(area(h, pn))` per scale."""
    self._need("msvq", "vq", what="encode_idx_independent")
    patch_nums = tuple(patch_nums or self.patch_nums)
    if not patch_nums:
      raise ValueError("encode_idx_independent: a vq tokenizer needs patch_nums (no schedule)")
    f = self.encode_f(params, images).astype(jnp.float32)
    out = []
    for pn in patch_nums:
      z = area(f, (pn, pn))  # the identity at the latent's own size
      if self.type == "vq":
        idx = self.quantize_idx(params, z)
      else:
        idx = Q.nearest_code(z.reshape(-1, z.shape[-1]), self.codebook(params))
      out.append(idx.reshape(f.shape[0], pn * pn).astype(jnp.int32))
    return out

  def quantize_idx(self, params, z_BxhxwxC: jax.Array) -> jax.Array:
    """vq: codes int32 [B, h*w] of features by the quantizer's own lookup (l2-normalised z and
    codebook with `l2_norm`), for latents of any size (FlexVAR's downsampled scales)."""
    self._need("vq", what="quantize_idx")
    return self._quantize(params, "f_to_idx", z_BxhxwxC.astype(jnp.float32))

  def independent_input(self, params, h_BxpnxpnxC: jax.Array, pn_next: int) -> jax.Array:
    """FlexVAR-style: the next scale's input, this scale's code map upsampled (bicubic, as the
    official `F.interpolate(quant, mode='bicubic')`) to `[B, pn_next, pn_next, C]`."""
    del params  # a fixed resampling; tokenizers with a learned one would use their params
    self._need("msvq", "vq", what="independent_input")
    return bicubic(h_BxpnxpnxC.astype(jnp.float32), (pn_next, pn_next))

  def encode_bits(self, params, images: jax.Array, patch_nums=None) -> list[jax.Array]:
    """bsq: bits int32 [B, h*w, d] per scale (the transformer's targets), over `patch_nums`
    (sides or (h, w) pairs; default the config's schedule)."""
    self._need("bsq", what="encode_bits")
    f = self.encode_f(params, images)
    return BSQ.requantize(f, patch_nums or self.patch_nums)["bits"]

  def bits_to_var_input(self, params, bits_list, patch_nums=None) -> jax.Array:
    """bsq teacher forcing: float32 [B, L - h_0 w_0, d] (bilinear of the running code sum)."""
    del params  # the BSQ quantizer has no params
    self._need("bsq", what="bits_to_var_input")
    return BSQ.bits_to_var_input(list(bits_list), patch_nums or self.patch_nums)

  def flip_requant(
    self, params, images: jax.Array, rng, layers: int, strength: float, patch_nums=None
  ):
    """bsq: Infinity's bitwise self-correction, (target bits per scale, teacher input) with a
    random fraction (<= `strength`) of the bits of the first `layers` scales flipped."""
    self._need("bsq", what="flip_requant")
    f = self.encode_f(params, images)
    return BSQ.flip_requant(f, patch_nums or self.patch_nums, rng, layers, strength)

  def bsq_next_input(self, params, si: int, cum: jax.Array, bits, patch_nums=None):
    """bsq sampling step: (running code sum, next scale's input [B, h', w', d] or None)."""
    del params
    self._need("bsq", what="bsq_next_input")
    return BSQ.next_input(si, cum, bits, patch_nums or self.patch_nums)

  def decode_bits(self, params, bits_list, patch_nums=None) -> jax.Array:
    """bsq: bits of every scale -> images in [-1, 1] (official `decode_from_indices`)."""
    self._need("bsq", what="decode_bits")
    return self.decode_fhat(
      params, BSQ.bits_to_fhat(list(bits_list), patch_nums or self.patch_nums)
    )

  def codebook(self, params) -> jax.Array:
    """[V, C] lookup table (l2-normalised for l2_norm VQ)."""
    self._need("msvq", "vq", what="codebook")
    return self._quantize(params, "codebook")

  def decode_fhat(self, params, f_hat: jax.Array) -> jax.Array:
    """Quantized features -> images clipped to [-1, 1]."""
    with self.computing():
      images = self.module.apply(self._ae(params), f_hat, method="decode")
    return jnp.clip(images, -1.0, 1.0)

  def decode_idx(self, params, idx) -> jax.Array:
    """Codes -> images in [-1, 1] (msvq: list per scale; vq: [B, h*w])."""
    return self.decode_fhat(params, self.idx_to_fhat(params, idx))

  def encode_latent(self, params, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """KL: scale_factor * (posterior sample with `rng`, else its mean) [B, h, w, embed_dim]."""
    self._need("kl", what="encode_latent")
    mean, logvar = Q.gaussian_moments(self.encode_f(params, images))
    z = mean if rng is None else Q.gaussian_sample(mean, logvar, rng)
    return z * self.scale_factor

  def decode_latent(self, params, z: jax.Array) -> jax.Array:
    """KL: images in [-1, 1] from scaled latents (divides by scale_factor first)."""
    self._need("kl", what="decode_latent")
    return self.decode_fhat(params, z / self.scale_factor)


def _annotate_convnet(tree):
  """Boxes a plain conv-net param tree (the PatchGAN) with logical names: 4-D `kernel`s HWIO, the
  `bias` next to a kernel `conv_out`, other 1-D leaves (GroupNorm scale/bias) `norm`."""

  def walk(d):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out[k] = walk(v)
      elif k == "kernel" and v.ndim == 4:
        out[k] = nn.LogicallyPartitioned(v, CONV_AXES)
      elif v.ndim == 1:
        out[k] = nn.LogicallyPartitioned(v, ("conv_out",) if "kernel" in d else ("norm",))
      else:
        raise ValueError(f"discriminator param {k!r} of shape {v.shape} has no logical names")
    return out

  return walk(dict(tree))


def build(config, tokenizer: Family | None = None, perceptual_fn: L.PerceptualFn | None = None):
  """Builds the tokenizer family. `perceptual_fn(x, y) -> scalar` is the optional perceptual net."""
  if tokenizer is not None:
    raise ValueError("the tokenizer family takes no tokenizer (config.family='tokenizer')")
  return TokenizerFamily(config, perceptual_fn=perceptual_fn)

"""Image tokenizers: VAR multi-scale VQ, LlamaGen-style VQ and MAR-style KL autoencoders.

  arvision train --config configs/tokenizer.py:fmnist_msvq --workdir runs/tok

Variants (`configs/tokenizer.py:<variant>`):
- `fmnist_msvq`: VAR's multi-scale residual VQ for 32x32 Fashion-MNIST (8x8x16 latent, 6 scales,
  V=512, 0.77M params); the tokenizer of `configs/var.py`. 1500 steps of batch 32 measured 24.5 dB
  PSNR / 0.84 SSIM on 2000 test images with all 512 codes used, in 474 CPU-seconds for the whole
  run (12.7 min wall on a 2-core machine shared with other jobs; under 8 min when it is free).
- `fmnist_vq`: plain VQ with an l2-normalised codebook (LlamaGen style), 8x8 codes.
- `fmnist_kl`: KL autoencoder (MAR style), 8x8x4 latents.
- `smoke`: tiny msvq on 16x16 synthetic images; runs in seconds (tests).
- `var_vae`, `llamagen_vq16`, `mar_kl16`: the official 256px architectures (for converted
  checkpoints; `var_vae` = VAR's vae_ch160v4096z32 with 108,948,355 params).
- `fmnist_bsq`, `bsq_smoke`, `infinity_d32`, `infinity_d32_256`: Infinity's multi-scale binary
  spherical quantizer (`type="bsq"`, `tokenizers/bsq.py`; d = `embed_dim` bits per token, an
  implicit 2^d codebook) on its Flux-style VAE (no attention, no quant convs). `infinity_d32` is
  `infinity_vae_d32reg.pth` with the official 1:1 schedule at 1024px (13 scales, 64x64 latent);
  `infinity_d32_256` the same weights with the 256px schedule (1, 2, 4, 6, 8, 12, 16).
"""

import ml_collections as mlc

from arvision.config_util import base_config, parse_arg, pick_variant, set_run_length

# Shared fields; each variant overrides what differs.
_ARCH = dict(
  type="msvq",
  ch=16,
  ch_mult=(1, 2, 4),
  num_res_blocks=1,
  z_channels=16,
  embed_dim=16,
  using_sa=True,  # VAR rule: attention at the last encoder / first decoder level (+ mid)
  enc_attn_resolutions=(),  # LDM rule: attention where the feature side is listed
  dec_attn_resolutions=(),
  mid_attn=True,
  fused_qkv=True,  # VAR: one qkv conv; LlamaGen/MAR: separate q, k, v
  dropout=0.0,
  quant_conv_ks=3,  # VAR 3x3; LlamaGen/MAR 1x1
  vocab_size=512,
  eini=-1.0,  # codebook init, VAR's `eini`: >0 trunc-normal std, <0 U(+-|eini|/V), 0 N(0, 1)
  l2_norm=False,  # vq: LlamaGen's l2-normalised codebook
  patch_nums=(1, 2, 3, 4, 6, 8),  # msvq scales, small to large; the last = latent side
  quant_resi=0.5,  # phi(h) = (1 - r) h + r conv(h)
  share_quant_resi=4,  # 0: one phi per scale, 1: shared, K: K partially shared phis
  scale_factor=1.0,  # kl: latent scale for generators (MAR 0.2325)
)
_LOSS = dict(
  l1_weight=1.0,
  l2_weight=1.0,
  beta=0.25,
  quant_weight=1.0,
  kl_weight=1e-6,
  gan_weight=0.0,
  disc_weight=1.0,
  disc_start=0,
  disc_ndf=32,
  disc_layers=2,
  perceptual_weight=0.0,
)
_TRAIN = dict(
  source="fashion_mnist",
  image_size=32,
  channels=1,
  batch_size=32,
  total_steps=1500,
  lr=3e-3,
  warmup_steps=100,
  weight_decay=0.0,
)

# Infinity's BSQ VAE (`infinity/models/bsq_vae/flux_vqgan.py`): no attention, no quant convs.
_BSQ = dict(
  type="bsq",
  using_sa=False,
  mid_attn=False,
  fused_qkv=False,
  quant_conv_ks=0,
  vocab_size=0,
)
# The official 1:1 scale schedules (`dynamic_resolution.py`): 7, 10 and 13 scales.
INFINITY_SCALES = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)

_256 = dict(
  image_size=256, channels=3, source="tfds:imagenet2012", batch_size=256, total_steps=100_000
)

VARIANTS = {
  # 1300 steps fit the quickstart budget (test PSNR: experiments/results/quickstart_cpu.json).
  "fmnist_msvq": dict(arch=dict(), loss=dict(), train=dict(total_steps=1300)),
  "fmnist_vq": dict(
    arch=dict(
      type="vq", l2_norm=True, embed_dim=8, vocab_size=1024, quant_conv_ks=1, fused_qkv=False
    ),
    loss=dict(),
    train=dict(),
  ),
  # scale_factor = 1 / std of the trained latents (MAR's 0.2325 for kl16): the posterior samples of
  # 2000 training images have std 2.09 after the 1500 default steps (experiments/latent_stats.py;
  # experiments/results/latent_stats_fmnist_kl.json).
  "fmnist_kl": dict(
    arch=dict(
      type="kl", z_channels=4, embed_dim=4, quant_conv_ks=1, fused_qkv=False, scale_factor=0.48
    ),
    loss=dict(kl_weight=1e-6),
    train=dict(),
  ),
  "smoke": dict(
    arch=dict(
      ch=8, ch_mult=(1, 2), z_channels=8, embed_dim=8, vocab_size=32, patch_nums=(1, 2, 4, 8)
    ),
    loss=dict(),
    train=dict(
      source="synthetic", image_size=16, channels=1, batch_size=8, total_steps=4, warmup_steps=0
    ),
  ),
  # Official architectures (256px RGB).
  "var_vae": dict(
    arch=dict(
      ch=160,
      ch_mult=(1, 1, 2, 2, 4),
      num_res_blocks=2,
      z_channels=32,
      embed_dim=32,
      vocab_size=4096,
      patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
      share_quant_resi=4,
      eini=0.0,
    ),
    loss=dict(),
    train=dict(_256),
  ),
  "llamagen_vq16": dict(
    arch=dict(
      type="vq",
      ch=128,
      ch_mult=(1, 1, 2, 2, 4),
      num_res_blocks=2,
      z_channels=256,
      embed_dim=8,
      vocab_size=16384,
      l2_norm=True,
      quant_conv_ks=1,
      fused_qkv=False,
    ),
    loss=dict(),
    train=dict(_256),
  ),
  "fmnist_bsq": dict(
    arch=dict(_BSQ, ch=16, ch_mult=(1, 2, 4), z_channels=16, embed_dim=16),
    loss=dict(),
    train=dict(),
  ),
  "bsq_smoke": dict(
    arch=dict(_BSQ, ch=8, ch_mult=(1, 2), z_channels=8, embed_dim=8, patch_nums=(1, 2, 4, 8)),
    loss=dict(),
    train=dict(
      source="synthetic", image_size=16, channels=1, batch_size=8, total_steps=4, warmup_steps=0
    ),
  ),
  "infinity_d32": dict(
    arch=dict(
      _BSQ,
      ch=128,
      ch_mult=(1, 2, 4, 4, 4),
      num_res_blocks=2,
      z_channels=32,
      embed_dim=32,
      patch_nums=INFINITY_SCALES,
    ),
    loss=dict(),
    train=dict(_256, image_size=1024),
  ),
  "infinity_d32_256": dict(
    arch=dict(
      _BSQ,
      ch=128,
      ch_mult=(1, 2, 4, 4, 4),
      num_res_blocks=2,
      z_channels=32,
      embed_dim=32,
      patch_nums=INFINITY_SCALES[:7],
    ),
    loss=dict(),
    train=dict(_256),
  ),
  "mar_kl16": dict(
    arch=dict(
      type="kl",
      ch=128,
      ch_mult=(1, 1, 2, 2, 4),
      num_res_blocks=2,
      z_channels=16,
      embed_dim=16,
      quant_conv_ks=1,
      fused_qkv=False,
      using_sa=False,
      enc_attn_resolutions=(16,),
      dec_attn_resolutions=(),
      scale_factor=0.2325,
    ),
    loss=dict(),
    train=dict(_256),
  ),
}


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist_msvq")
  v = pick_variant(VARIANTS, args.variant, "tokenizer")
  arch, loss, train = dict(_ARCH, **v["arch"]), dict(_LOSS, **v["loss"]), dict(_TRAIN, **v["train"])
  c = base_config("tokenizer")
  c.variant = args.variant

  c.model = mlc.ConfigDict(arch)
  c.loss = mlc.ConfigDict(loss)

  c.data.source = train["source"]
  c.data.image_size = train["image_size"]  # Fashion-MNIST: 28 -> 36 (resize_ratio 1.125) -> crop 32
  c.data.channels = train["channels"]
  c.data.batch_size = train["batch_size"]
  c.data.random_crop = True  # eval center-crops
  set_run_length(c, train["total_steps"])

  c.optim.lr = train["lr"]
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.weight_decay = train["weight_decay"]
  c.optim.clip_norm = 1.0
  c.optim.warmup_steps = train["warmup_steps"]
  c.optim.schedule = "cosine"
  c.optim.end_lr_factor = 0.0

  c.eval.num_samples = 1000 if args.variant.startswith("fmnist") else 100
  c.eval.batch_size = 250 if args.variant.startswith("fmnist") else 100
  if args.variant in ("smoke", "bsq_smoke"):
    c.eval.num_batches = 1
    c.eval.num_samples = 16
    c.eval.batch_size = 16
    c.data.eval_batch_size = 16
  return c

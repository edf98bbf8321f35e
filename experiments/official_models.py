"""The official PyTorch models the benchmarks compare against, built from their checkouts.

`experiments/bench_train.py` (training step) and `experiments/bench_sampling.py` (sampling) both
build the official VQVAE + VAR (FoundationVision/VAR), LlamaGen's `gpt.Transformer`
(FoundationVision/LlamaGen) and MAR (LTH14/mar, which needs timm) with an arvision family's sizes
and seeded random weights. The code is imported from the checkout given as `reference`, never
copied. What differs between the two uses is passed explicitly (train-only dropouts, MAR's
training args, the device paths).
"""

from __future__ import annotations

import functools
import os
import sys
import types


def fresh_models_package(reference: str):
  """Puts `reference` first on the path for `import models`.

  VAR and mar both name their package `models`: one already imported from the other checkout is
  dropped (its objects stay alive). mar's `models` has no __init__.py, and a namespace package
  loses to any regular `models` package later on the path, so the other checkouts leave the path.
  """
  for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
    del sys.modules[name]
  ref = os.path.abspath(reference)
  sys.path[:] = [p for p in sys.path if p == ref or not os.path.isfile(f"{p}/models/__init__.py")]
  sys.path.insert(0, ref)


def _hub_stub():
  """VAR imports only the Hub mixin (downloads) from huggingface_hub."""
  hub = types.ModuleType("huggingface_hub")
  hub.PyTorchModelHubMixin = type(
    "PyTorchModelHubMixin", (), {"__init_subclass__": classmethod(lambda cls, **kw: None)}
  )
  sys.modules.setdefault("huggingface_hub", hub)


def var(
  reference: str,
  fam,
  *,
  drop_path_rate: float = 0.0,
  cond_drop_rate: float = 0.1,
  fast_kernels: bool = False,
  random_vae: bool = False,
):
  """`(vae, var)`: the official VQVAE + VAR with `fam`'s sizes (a `VARFamily`), torch seed 0.

  Args:
    reference: a FoundationVision/VAR checkout.
    fam: the arvision family whose module and tokenizer give the sizes.
    drop_path_rate, cond_drop_rate: the training regularisers (only used in train mode).
    fast_kernels: the official `flash_if_available` / `fused_if_available` (CUDA kernels).
    random_vae: fill the VQVAE's params with scaled normals (its test_mode construction leaves
      some uninitialised), for decoding real images.
  """
  import torch

  if not os.path.isdir(os.path.join(reference, "models")):
    raise FileNotFoundError(f"--reference {reference!r} is not a FoundationVision/VAR checkout")
  fresh_models_package(reference)
  _hub_stub()
  from models import VAR as OfficialVAR  # noqa: PLC0415
  from models import VQVAE  # noqa: PLC0415

  mod, tm = fam.module, fam.tokenizer.config.model
  torch.manual_seed(0)
  vae = VQVAE(
    vocab_size=mod.vocab_size,
    z_channels=mod.cvae,
    ch=max(32, -(-int(tm.ch) // 32) * 32),  # its GroupNorm has 32 groups
    test_mode=True,
    share_quant_resi=4,
    v_patch_nums=fam.patch_nums,
  )
  if random_vae:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for p in vae.parameters():
        p.copy_(torch.randn(p.shape, generator=g) / max(p[0].numel(), 1) ** 0.5)
  model = OfficialVAR(
    vae,
    num_classes=fam.num_classes,
    depth=mod.depth,
    embed_dim=mod.width,
    num_heads=mod.num_heads,
    mlp_ratio=mod.mlp_ratio,
    drop_path_rate=drop_path_rate,
    norm_eps=mod.norm_eps,
    shared_aln=mod.shared_aln,
    attn_l2_norm=mod.attn_l2_norm,
    cond_drop_rate=cond_drop_rate,
    patch_nums=fam.patch_nums,
    flash_if_available=fast_kernels,
    fused_if_available=fast_kernels,
  )
  model.init_weights(init_adaln=mod.aln, init_adaln_gamma=mod.alng, init_head=mod.init_head)
  return vae, model


def llamagen(reference: str, fam, *, train: bool = False):
  """LlamaGen's `gpt.Transformer` with `fam`'s sizes (a raster family), torch seed 0.

  train: the config's dropouts, drop path, class dropout and kv heads (`train_c2i.py`); otherwise
  the official defaults for sampling (eval mode: no dropout; `n_head` kv heads, the heads its KV
  cache allocates) and a normal(0, 0.02) head instead of its zero init, so that sampling sees
  non-uniform logits.
  """
  import torch

  sys.path.insert(0, os.path.abspath(reference))
  from autoregressive.models import gpt  # noqa: PLC0415

  m = fam.config.model
  kw = dict(
    dim=int(m.dim),
    n_layer=int(m.n_layer),
    n_head=int(m.n_head),
    n_kv_head=None,
    multiple_of=int(m.multiple_of),
    ffn_dim_multiplier=float(m.ffn_dim_multiplier) or None,
    norm_eps=float(m.norm_eps),
    num_classes=fam.num_classes,
    vocab_size=int(fam.config.tokenizer.config.model.vocab_size),
    block_size=fam.num_tokens,
  )
  if train:
    kw.update(
      n_kv_head=int(m.n_kv_head) or None,
      rope_base=float(m.rope_base),
      token_dropout_p=float(m.token_dropout),
      resid_dropout_p=float(m.resid_dropout),
      ffn_dropout_p=float(m.ffn_dropout),
      drop_path_rate=float(m.drop_path_rate),
      class_dropout_prob=float(m.cond_drop_rate),
    )
  torch.manual_seed(0)
  model = gpt.Transformer(gpt.ModelArgs(**kw))
  if not train:
    with torch.no_grad():
      model.output.weight.normal_(0, 0.02)
  return model.train(train)


def mar(reference: str, fam, *, num_sampling_steps: int, train: bool = False):
  """LTH14/mar `MAR` with `fam`'s sizes, torch seed 0; `.cuda()` is a no-op without CUDA (its
  training and sampling code move masks and noise with it).

  train: the config's mask ratio, label drop, dropouts and diffusion batch multiplier
  (`main_mar.py`); otherwise the official defaults (eval mode).
  """
  import torch

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import parity_mar_official  # noqa: PLC0415  (its torchvision stub for timm)

  parity_mar_official._official_imports(reference)
  fresh_models_package(reference)
  from models import mar as official_mar  # noqa: PLC0415

  if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *a, **k: self
  m, side = fam.config.model, fam.seq_side * fam.patch_size
  image_size = int(fam.config.data.image_size)
  kw = dict(
    img_size=image_size,
    vae_stride=image_size // side,
    patch_size=fam.patch_size,
    encoder_embed_dim=int(m.encoder_embed_dim),
    encoder_depth=int(m.encoder_depth),
    encoder_num_heads=int(m.encoder_num_heads),
    decoder_embed_dim=int(m.decoder_embed_dim),
    decoder_depth=int(m.decoder_depth),
    decoder_num_heads=int(m.decoder_num_heads),
    mlp_ratio=float(m.get("mlp_ratio", 4.0)),
    norm_layer=functools.partial(torch.nn.LayerNorm, eps=float(m.get("norm_eps", 1e-6))),
    vae_embed_dim=fam.latent_channels,
    class_num=fam.num_classes,
    buffer_size=fam.buffer_size,
    diffloss_d=int(m.diffloss_d),
    diffloss_w=int(m.diffloss_w),
    num_sampling_steps=str(int(num_sampling_steps)),
  )
  if train:
    kw.update(
      mask_ratio_min=fam.mask_ratio_min,
      label_drop_prob=float(m.get("label_drop_prob", 0.1)),
      attn_dropout=float(m.get("attn_dropout", 0.0)),
      proj_dropout=float(m.get("proj_dropout", 0.1)),
      diffusion_batch_mul=int(m.get("diffusion_batch_mul", 4)),
    )
  torch.manual_seed(0)
  return official_mar.MAR(**kw).train(train)

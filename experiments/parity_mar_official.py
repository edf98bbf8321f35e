"""MAR parity with the official PyTorch code (LTH14/mar), and its state-dict key tables.

    python experiments/parity_mar_official.py --reference path/to/LTH14-mar
    python experiments/parity_mar_official.py --reference path/to/LTH14-mar \
        --dump_keys tests/data/mar_official_keys.json

Needs torch, scipy and timm (the official blocks are timm's `Block`). `--dump_keys` writes the
official key -> shape tables that tests/test_convert_mar.py checks against (the models are built
on the meta device: shapes only). Without it, a small official MAR with random weights is
converted and its encoder/decoder condition z (eval mode, one mask) and the diffusion MLP output
are compared with ours; the JSON goes to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts are not a package
from parity_common import write_rows  # noqa: E402

SMALL = dict(
  img_size=64,
  vae_stride=16,
  patch_size=1,
  encoder_embed_dim=64,
  encoder_depth=2,
  encoder_num_heads=4,
  decoder_embed_dim=64,
  decoder_depth=2,
  decoder_num_heads=4,
  vae_embed_dim=4,
  buffer_size=8,
  diffloss_d=2,
  diffloss_w=96,
  class_num=10,
)
# The README's released models: (official builder, DiffLoss depth, width).
RELEASED = {"mar_base": (6, 1024), "mar_large": (8, 1280), "mar_huge": (12, 1536)}


def _official_imports(reference: str):
  """Puts the official checkout on the path. timm imports torchvision at import time for layers
  MAR never uses (`FrozenBatchNorm2d`); without torchvision installed, a stub module stands in."""
  sys.path.insert(0, os.path.abspath(reference))
  try:
    import torchvision  # noqa: F401
  except ImportError:
    import importlib.abc
    import importlib.machinery
    import types

    class _Meta(type):
      def __getattr__(cls, name):  # any attribute of a stub class is another stub class
        if name.startswith("__"):
          raise AttributeError(name)
        return _Meta(name, (), {})

    class _Stub(types.ModuleType):
      __path__ = []  # a package: submodules import too

      def __getattr__(self, name):
        if name.startswith("__"):
          raise AttributeError(name)
        return _Meta(name, (), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
      def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
          return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

      def create_module(self, spec):
        return _Stub(spec.name)

      def exec_module(self, module):
        pass

    sys.meta_path.insert(0, _Finder())


def dump_keys(reference: str, out: str):
  import torch

  _official_imports(reference)
  from models import mar
  from models.vae import AutoencoderKL

  tables = {}
  with torch.device("meta"):
    tables["vae_kl16"] = {
      k: list(v.shape)
      for k, v in AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)).state_dict().items()
    }
    for name, (d, w) in RELEASED.items():
      model = getattr(mar, name)(
        img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, diffloss_d=d, diffloss_w=w
      )
      tables[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    small = mar.MAR(**SMALL)
    tables["mar_small"] = {k: list(v.shape) for k, v in small.state_dict().items()}
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: " + ", ".join(f"{k} ({len(v)} keys)" for k, v in tables.items()))


def small_config(official_cfg: dict):
  """Our config for `SMALL` (a fake tokenizer side: image 64 / stride 16 = 4x4 latents)."""
  import ml_collections as mlc

  from arvision import config_util

  c = mlc.ConfigDict(config_util.load_config_file("mar.py:smoke").to_dict())
  c.model.update(
    encoder_embed_dim=official_cfg["encoder_embed_dim"],
    encoder_depth=official_cfg["encoder_depth"],
    encoder_num_heads=official_cfg["encoder_num_heads"],
    decoder_embed_dim=official_cfg["decoder_embed_dim"],
    decoder_depth=official_cfg["decoder_depth"],
    decoder_num_heads=official_cfg["decoder_num_heads"],
    buffer_size=official_cfg["buffer_size"],
    diffloss_d=official_cfg["diffloss_d"],
    diffloss_w=official_cfg["diffloss_w"],
    attn_impl="xla",
  )
  c.data.num_classes = official_cfg["class_num"]
  tok = c.tokenizer.config
  tok.model.update(type="kl", ch=8, ch_mult=(1, 2, 2, 2, 2), z_channels=4, embed_dim=4)
  tok.data.image_size = official_cfg["img_size"]
  return c


def parity(reference: str, out: str, batch: int = 2):
  import jax
  import jax.numpy as jnp
  import torch

  from arvision import families
  from arvision.convert import common
  from arvision.convert import mar as cm
  from arvision.models import mar as mar_lib

  _official_imports(reference)
  from models import mar

  t0 = time.time()
  torch.manual_seed(0)
  torch.set_grad_enabled(False)
  # The released builders (mar_base/large/huge) use LayerNorm eps 1e-6; MAR's default is torch's 1e-5.
  ref = mar.MAR(**SMALL, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
  for p in ref.parameters():  # the zero-initialised AdaLN / output layers would hide errors
    p.add_(0.02 * torch.randn_like(p))
  config = small_config(SMALL)
  tok = families.build(config.tokenizer.config)
  fam = families.build(config, tokenizer=tok)
  params = cm.convert_mar(common.unwrap_state_dict(ref.state_dict()), config)
  var = {"params": params}
  rows = {}
  L, C = ref.seq_len, ref.token_embed_dim
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, L, C)).astype(np.float32)
  labels = np.arange(batch) % SMALL["class_num"]
  orders = np.stack([rng.permutation(L) for _ in range(batch)])
  n_mask = int(np.ceil(L * 0.8))
  mask = np.zeros((batch, L), np.float32)
  np.put_along_axis(mask, orders[:, :n_mask], 1.0, axis=1)
  cemb_t = ref.class_emb(torch.from_numpy(labels))
  z_t = ref.forward_mae_decoder(
    ref.forward_mae_encoder(torch.from_numpy(x), torch.from_numpy(mask), cemb_t),
    torch.from_numpy(mask),
  ).numpy()
  cemb = fam.module.apply(var, jnp.asarray(labels), method=mar_lib.MAR.class_embedding)
  for cap in (fam.train_capacity, fam.seq_len + fam.buffer_size):
    z_j = np.asarray(
      fam.module.apply(var, jnp.asarray(x), jnp.asarray(mask), cemb, cap, method=mar_lib.MAR.cond)
    )
    rows[f"z_max_abs_diff_capacity{cap}"] = float(np.abs(z_j - z_t).max())
  rows["z_max_abs"] = float(np.abs(z_t).max())
  # diffusion MLP
  n = 5
  xt = rng.standard_normal((n, C)).astype(np.float32)
  t = rng.integers(0, 1000, n)
  c = rng.standard_normal((n, SMALL["decoder_embed_dim"])).astype(np.float32)
  net_t = ref.diffloss.net(torch.from_numpy(xt), torch.from_numpy(t), torch.from_numpy(c)).numpy()
  net_j = np.asarray(
    fam.module.apply(
      var,
      jnp.asarray(xt),
      jnp.asarray(t),
      jnp.asarray(c),
      method=lambda m, *a: m.diffloss.net(*a),
    )
  )
  rows["diffloss_net_max_abs_diff"] = float(np.abs(net_j - net_t).max())
  rows["diffloss_net_max_abs"] = float(np.abs(net_t).max())
  rec = dict(
    what="MAR official parity (small random model, eval mode)",
    small=SMALL,
    rows=rows,
    jax=jax.__version__,
    torch=torch.__version__,
    device=str(jax.devices()[0]),
    seconds=round(time.time() - t0, 1),
  )
  return write_rows(out, rec, rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reference", required=True, help="a checkout of LTH14/mar")
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--out", default="experiments/results/parity_mar_official.json")
  args = ap.parse_args()
  if args.dump_keys:
    return dump_keys(args.reference, args.dump_keys)
  return parity(args.reference, args.out)


if __name__ == "__main__":
  main()

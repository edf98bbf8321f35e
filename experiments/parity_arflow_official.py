"""ARFlow parity with the official PyTorch code (TheFllood/ARFlow), and its state-dict key tables.

    python experiments/parity_arflow_official.py --reference path/to/TheFllood-ARFlow \
        --out experiments/results/parity_arflow_official.json
    python experiments/parity_arflow_official.py --reference path/to/TheFllood-ARFlow \
        --dump_keys tests/data/arflow_official_keys.json

Needs torch and timm (timm imports torchvision for layers ARFlow never uses: a stub stands in,
as for MAR). Replaced CUDA-only ops, each by its documented math (nothing else of the official
code is replaced):
- `chunk_gate_recurrent` (a Triton kernel, `_fwd_recurrence`): the state entering chunk i + 1 is
  `S_{i+1} = S_i * d_i + kv_i` from `S_0 = last_kv` (or 0); the inference variant also returns
  the official `last_kv_out` (`last_kv * d_{-1} + kv_{-1}`, or `kv_{-1}` without `last_kv`).
  Written here as a plain torch loop over chunks (the official `naive_kv_recurrent` is the same
  loop, but allocates on "cuda"). `triton` itself is a stub module so the kernel file imports.
- `swiglu` (a `torch.cuda.jiterator` kernel): `x * sigmoid(x) * y`, its jiterator source.
- `inner_chunk` is the official function without its `@torch.compile` wrapper.
`torchdiffeq` (the ODE sampler's import, unused here) is a stub.

A small official ARFlow (16x16x4 latents, patch 2: 64 tokens per image; width 128, 4 heads, 2
blocks; 10 classes) gets seeded random weights (every parameter perturbed: the official init
zeroes adaLN and the output layer), is converted with `arvision.convert.arflow`, and compared in
fp32 on CPU:
- the condition `y_emb(label) + t_emb(t)` per image and the velocity of the training-mode network
  (`models.ARFlow`, a whole sequence of images at fixed per-image times): max abs errors;
- the inference network (`models_infer.ARFlow`) run one image at a time with its recurrent
  `incremental_state` against ours with the carried state (`ARFlow.forward(..., states)`);
- `sample.py`'s sampler (`Sampler.sample_sde`: Euler-Maruyama, diffusion "sigma", last step
  "Mean" 0.04, `forward_with_cfg`) against `sample_tokens` with the same initial and per-step
  noise (ours draws it from its rng; the arrays are fed to the official `torch.randn` calls).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts are not a package
from parity_common import git_head, write_rows  # noqa: E402

SMALL = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4)
NUM_CLASSES = 10
RELEASED = ("ARFlow-S/2", "ARFlow-B/4", "ARFlow-L/2", "ARFlow-XL/2")


def _official_imports(reference: str):
  """The official modules importable on CPU (see the module docstring); returns
  `(models, models_infer, transport)`."""
  import torch

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from parity_mar_official import _official_imports as mar_imports  # the torchvision stub

  mar_imports(reference)
  triton = types.ModuleType("triton")
  triton.jit = lambda fn: fn  # the kernels are defined, never launched
  tl = types.ModuleType("triton.language")
  tl.constexpr, tl.tensor = object, object
  triton.language = tl
  swiglu_mod = types.ModuleType("linearattention.kernel.swiglu")
  swiglu_mod.swiglu = lambda x, y: x * torch.sigmoid(x) * y
  sys.modules["linearattention.kernel.swiglu"] = swiglu_mod
  # Only while the kernel files import: the triton stub, and `@torch.compile` as the identity
  # (torch's own compiler would find the stub).
  real_compile = torch.compile
  sys.modules["triton"], sys.modules["triton.language"] = triton, tl
  torch.compile = lambda fn=None, **kw: fn
  try:
    import linearattention.kernel.gate_recurrent_infer as kinfer
    import linearattention.kernel.gate_recurrent_train as ktrain
  finally:
    torch.compile = real_compile
    del sys.modules["triton"], sys.modules["triton.language"]

  def recurrent_states(kv, cross_decay, last_kv=None):
    states, s = [], torch.zeros_like(kv[:, :, 0]) if last_kv is None else last_kv
    for i in range(kv.shape[2]):
      states.append(s)
      s = s * cross_decay[:, :, i, None, None] + kv[:, :, i]
    return torch.stack(states, dim=2)

  def infer_recurrent(kv, cross_decay, last_kv=None):
    out = recurrent_states(kv, cross_decay, last_kv)
    if last_kv is not None:
      return out, last_kv * cross_decay[:, :, -1, None, None] + kv[:, :, -1]
    return out, kv[:, :, -1]

  ktrain.chunk_gate_recurrent = recurrent_states
  kinfer.chunk_gate_recurrent = infer_recurrent
  diffeq = types.ModuleType("torchdiffeq")
  diffeq.odeint = None  # imported by the official integrators for the ODE sampler, never called
  sys.modules.setdefault("torchdiffeq", diffeq)
  import models
  import models_infer
  import transport

  return models, models_infer, transport


def dump_keys(reference: str, out: str):
  import torch

  models, _, _ = _official_imports(reference)
  tables = {}
  # Shapes only, on the meta device: the init (numpy copies) and the drop-path `linspace(...)
  # .item()` cannot run there, so they are skipped / kept on the CPU while the modules build.
  real_init, real_linspace = models.ARFlow.initialize_weights, torch.linspace
  models.ARFlow.initialize_weights = lambda self: None
  torch.linspace = lambda *a, **k: real_linspace(*a, **dict(k, device="cpu"))
  with torch.device("meta"):
    for name in RELEASED:
      model = models.ARFlow_models[name](input_size=32, num_classes=1000, learn_sigma=True)
      tables[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    small = models.ARFlow(**SMALL, num_classes=NUM_CLASSES)
    tables["small"] = {k: list(v.shape) for k, v in small.state_dict().items()}
  models.ARFlow.initialize_weights, torch.linspace = real_init, real_linspace
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: " + ", ".join(f"{k} ({len(v)} keys)" for k, v in tables.items()))


def small_config():
  """Our config for `SMALL`: a fake KL tokenizer with 16x16x4 latents (never used to decode what
  is compared)."""
  import ml_collections as mlc

  from arvision import config_util

  c = mlc.ConfigDict(config_util.load_config_file("arflow.py:smoke").to_dict())
  s = SMALL
  c.model.update(
    hidden_size=s["hidden_size"],
    depth=s["depth"],
    num_heads=s["num_heads"],
    patch_size=s["patch_size"],
    attn_impl="scan",
  )
  c.data.num_classes = NUM_CLASSES
  tok = c.tokenizer.config
  tok.model.update(type="kl", ch=8, ch_mult=(1, 2), z_channels=4, embed_dim=4)
  tok.data.image_size = 32  # 16x16 latents
  return c


def parity(reference: str, out: str, batch: int = 2, seq: int = 3, num_steps: int = 12, cfg=4.0):
  import jax
  import jax.numpy as jnp
  import torch

  from arvision import families
  from arvision.convert import arflow as ca
  from arvision.convert import common
  from arvision.models import arflow as af

  models, models_infer, transport = _official_imports(reference)
  t0 = time.time()
  torch.manual_seed(0)
  torch.set_grad_enabled(False)
  ref = models.ARFlow(**SMALL, num_classes=NUM_CLASSES)
  for name, p in ref.named_parameters():  # the official init zeroes adaLN and the output layer
    if name != "pos_embed":
      p.add_(0.05 * torch.randn_like(p))
  sd = ref.state_dict()
  ref_inf = models_infer.ARFlow(**SMALL, num_classes=NUM_CLASSES)
  ref_inf.load_state_dict(sd)
  ref_inf.eval()
  config = small_config()
  tok = families.build(config.tokenizer.config)
  fam = families.build(config, tokenizer=tok)
  params = ca.convert_arflow(common.unwrap_state_dict(sd), config)
  var = {"params": params}
  mod = fam.module
  rows = {}
  side, C = SMALL["input_size"], SMALL["in_channels"]

  # --- condition and velocity: the training-mode network on a whole sequence -------------------
  ref.train()
  ref.y_embedder.dropout_prob = 0.0  # no label dropout (the table keeps its null row)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, seq, side, side, C)).astype(np.float32)  # NHWC images
  t = np.sort(rng.uniform(0.0, 1.0, (batch, seq)).astype(np.float32), axis=1)
  labels = np.array([3, NUM_CLASSES][:batch] + [7] * max(0, batch - 2))
  x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3)))  # [B, S, C, H, W]
  t_t, y_t = torch.from_numpy(t), torch.from_numpy(labels)
  c_ref = ref.y_embedder(y_t, False)[:, None] + ref.t_embedder(t_t.reshape(-1)).reshape(
    batch, seq, -1
  )
  c_ours = mod.apply(var, jnp.asarray(labels), jnp.asarray(t), method=af.ARFlow.condition)
  rows["condition_max_abs_diff"] = float(np.abs(np.asarray(c_ours) - c_ref.numpy()).max())
  rows["condition_max_abs"] = float(np.abs(c_ref.numpy()).max())
  v_ref = ref(x_t, t_t, y_t).numpy().transpose(0, 1, 3, 4, 2)
  v_ours = np.asarray(mod.apply(var, jnp.asarray(x), jnp.asarray(t), jnp.asarray(labels)))
  rows["velocity_max_abs_diff"] = float(np.abs(v_ours - v_ref).max())
  rows["velocity_max_abs"] = float(np.abs(v_ref).max())

  # --- the recurrent cache: one image per call, state carried -----------------------------------
  for block in ref_inf.blocks:
    block.incremental_state = {}
  states = fam.init_states(batch)
  diffs, cached_vs_full = [], []
  for s in range(seq):
    v_r = ref_inf(x_t[:, s : s + 1], t_t[:, s : s + 1], y_t).numpy().transpose(0, 1, 3, 4, 2)
    cond = mod.apply(
      var, jnp.asarray(labels), jnp.asarray(t[:, s : s + 1]), method=af.ARFlow.condition
    )
    v_o, states = mod.apply(
      var, jnp.asarray(x[:, s : s + 1]), cond, states, method=af.ARFlow.forward
    )
    diffs.append(float(np.abs(np.asarray(v_o) - v_r).max()))
    cached_vs_full.append(float(np.abs(np.asarray(v_o)[:, 0] - v_ours[:, s]).max()))
  rows["cached_step_velocity_max_abs_diff"] = max(diffs)
  rows["ours_cached_vs_ours_full_max_abs_diff"] = max(cached_vs_full)

  # --- sampling: sample.py's SDE sampler with guidance ------------------------------------------
  key = jax.random.key(1)
  sample_labels = np.array([5, 9][:batch] + [2] * max(0, batch - 2))
  init, steps = fam.step_noise(key, batch, num_steps)
  to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
  queue = [to_nchw(steps[i]) for i in range(num_steps - 1)]  # the last step draws no noise
  real_randn = torch.randn

  def fake_randn(*shape, **kw):
    w = queue.pop(0)
    want = tuple(shape[0]) if len(shape) == 1 else tuple(shape)
    assert want == (2 * batch, *w.shape[1:]), (want, w.shape)
    return torch.cat([w, w])  # the unconditional half of the batch is never read back

  tr = transport.create_transport("Linear", "velocity", None, None, None)
  sample_fn = transport.Sampler(tr).sample_sde(
    sampling_method="Euler",
    diffusion_form="sigma",
    diffusion_norm=1.0,
    last_step="Mean",
    last_step_size=0.04,
    num_steps=num_steps,
  )
  for block in ref_inf.blocks:
    block.incremental_state = {}
  z = torch.cat([to_nchw(init)] * 2)
  y = torch.cat([torch.from_numpy(sample_labels), torch.full((batch,), NUM_CLASSES)])
  torch.randn = fake_randn
  try:
    lat_ref = sample_fn(z, ref_inf.forward_with_cfg, y=y, cfg_scale=cfg)[-1][:batch].numpy()
  finally:
    torch.randn = real_randn
  assert not queue, "unused noise: the draw orders differ"
  full = dict(params, tokenizer=tok.init(jax.random.key(0), None))
  _, lat = fam.sample_tokens(
    full, jnp.asarray(sample_labels), key, num_steps=num_steps, cfg=cfg, last_step_size=0.04
  )
  lat = np.asarray(lat).transpose(0, 3, 1, 2)
  rows["sample_latent_max_abs_diff"] = float(np.abs(lat - lat_ref).max())
  rows["sample_latent_max_abs"] = float(np.abs(lat_ref).max())

  rec = dict(
    what="ARFlow official parity (small random model, CPU fp32)",
    command=(
      "python experiments/parity_arflow_official.py --reference <TheFllood/ARFlow checkout> "
      f"--out {out}"
    ),
    reference_commit=git_head(reference),
    replaced_official_ops=dict(
      chunk_gate_recurrent="Triton kernel -> torch loop S_{i+1} = S_i * d_i + kv_i (its math)",
      swiglu="torch.cuda.jiterator kernel -> x * sigmoid(x) * y (its source)",
      inner_chunk="@torch.compile wrapper removed (the same function)",
    ),
    small=dict(SMALL, num_classes=NUM_CLASSES),
    inputs=dict(batch=batch, images_per_sequence=seq, labels=labels.tolist()),
    sampling=dict(
      batch=batch,
      num_steps=num_steps,
      cfg=cfg,
      last_step_size=0.04,
      diffusion_form="sigma",
      labels=sample_labels.tolist(),
    ),
    rows=rows,
    jax=jax.__version__,
    torch=torch.__version__,
    device=str(jax.devices()[0]),
    seconds=round(time.time() - t0, 1),
  )
  return write_rows(out, rec, rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reference", required=True, help="a checkout of TheFllood/ARFlow")
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--out", default="experiments/results/parity_arflow_official.json")
  args = ap.parse_args()
  if args.dump_keys:
    return dump_keys(args.reference, args.dump_keys)
  return parity(args.reference, args.out)


if __name__ == "__main__":
  main()

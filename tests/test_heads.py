"""MAR diffusion head: torch parity of the MLP, CFG on eps only, cfg = 1 equals conditional,
masked-mean loss, logical annotations."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.models.heads import (
  DiffusionHead,
  SimpleMLPAdaLN,
  cfg_model_output,
  timestep_embedding,
)
from arvision.parallel.logical import LOGICAL_AXES

C, D, W, DEPTH = 4, 6, 16, 2


def _randomize(params, seed=0, std=0.3):
  """Every leaf replaced by N(0, std) (the official init zeroes the outputs)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


def _head_params(head, n=5, seed=0):
  variables = head.init(
    {"params": jax.random.key(seed), "diffusion": jax.random.key(1)},
    jnp.zeros((n, head.token_dim)),
    jnp.zeros((n, head.z_dim)),
  )
  return {"params": _randomize(nn.unbox(variables["params"]), seed)}


def _torch_net():
  """The official `SimpleMLPAdaLN`, written from its definition."""
  torch = pytest.importorskip("torch")
  tnn = torch.nn

  def modulate(x, shift, scale):
    return x * (1 + scale) + shift

  class TimestepEmbedder(tnn.Module):
    def __init__(self, hidden, freq=256):
      super().__init__()
      self.mlp = tnn.Sequential(tnn.Linear(freq, hidden), tnn.SiLU(), tnn.Linear(hidden, hidden))
      self.freq = freq

    def forward(self, t):
      half = self.freq // 2
      freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
      args = t[:, None].float() * freqs[None]
      return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

  class ResBlock(tnn.Module):
    def __init__(self, ch):
      super().__init__()
      self.in_ln = tnn.LayerNorm(ch, eps=1e-6)
      self.mlp = tnn.Sequential(tnn.Linear(ch, ch), tnn.SiLU(), tnn.Linear(ch, ch))
      self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(ch, 3 * ch))

    def forward(self, x, y):
      shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
      return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))

  class FinalLayer(tnn.Module):
    def __init__(self, ch, out):
      super().__init__()
      self.norm_final = tnn.LayerNorm(ch, elementwise_affine=False, eps=1e-6)
      self.linear = tnn.Linear(ch, out)
      self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(ch, 2 * ch))

    def forward(self, x, c):
      shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
      return self.linear(modulate(self.norm_final(x), shift, scale))

  class Net(tnn.Module):
    def __init__(self, cin, ch, cout, cz, depth):
      super().__init__()
      self.time_embed = TimestepEmbedder(ch)
      self.cond_embed = tnn.Linear(cz, ch)
      self.input_proj = tnn.Linear(cin, ch)
      self.res_blocks = tnn.ModuleList([ResBlock(ch) for _ in range(depth)])
      self.final_layer = FinalLayer(ch, cout)

    def forward(self, x, t, c):
      x = self.input_proj(x)
      y = self.time_embed(t) + self.cond_embed(c)
      for block in self.res_blocks:
        x = block(x, y)
      return self.final_layer(x, y)

  return torch, Net(C, W, 2 * C, D, DEPTH)


def _to_torch_key(path):
  """The documented mapping: `net/res_blocks_0/mlp_0/kernel` -> `res_blocks.0.mlp.0.weight`."""
  parts = []
  for p in path[:-1]:
    for prefix in ("res_blocks", "mlp", "adaLN_modulation"):
      if p.startswith(prefix + "_") and p[len(prefix) + 1 :].isdigit():
        p = f"{prefix}.{p[len(prefix) + 1 :]}"
    parts.append(p)
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
  return ".".join(parts + [leaf])


def test_simple_mlp_adaln_torch_parity():
  torch, tnet = _torch_net()
  net = SimpleMLPAdaLN(C, W, 2 * C, D, DEPTH)
  x = jax.random.normal(jax.random.key(0), (7, C))
  t = jnp.array([0, 1, 10, 99, 500, 998, 999], jnp.int32)
  c = jax.random.normal(jax.random.key(1), (7, D))
  params = _randomize(nn.unbox(net.init(jax.random.key(2), x, t, c)["params"]), seed=3)
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(k.key for k in path)
    value = np.array(leaf)
    state[_to_torch_key(names)] = torch.from_numpy(
      value.T.copy() if names[-1] == "kernel" else value
    )
  assert set(state) == set(tnet.state_dict()), set(state) ^ set(tnet.state_dict())
  tnet.load_state_dict(state)
  with torch.no_grad():
    ref = tnet(
      torch.from_numpy(np.array(x)),
      torch.from_numpy(np.array(t)).long(),
      torch.from_numpy(np.array(c)),
    ).numpy()
  out = net.apply({"params": params}, x, t, c)
  assert out.shape == (7, 2 * C)
  # sin/cos of args up to ~1000 rad carry ~1e-4 of float32 phase error in either framework.
  np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
  freqs = torch.exp(-math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128)
  args = torch.from_numpy(np.array(t)).float()[:, None] * freqs[None]
  ref_emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).numpy()
  np.testing.assert_allclose(timestep_embedding(t, 256), ref_emb, atol=2e-4)


def test_official_init():
  net = SimpleMLPAdaLN(C, W, 2 * C, D, DEPTH)
  p = nn.unbox(net.init(jax.random.key(0), jnp.zeros((2, C)), jnp.zeros(2), jnp.zeros((2, D))))
  p = p["params"]
  for k in ("adaLN_modulation_1",):
    assert not np.any(p["res_blocks_0"][k]["kernel"]) and not np.any(p["final_layer"][k]["kernel"])
  assert not np.any(p["final_layer"]["linear"]["kernel"])
  assert abs(float(p["time_embed"]["mlp_0"]["kernel"].std()) - 0.02) < 0.003
  bound = math.sqrt(6 / (W + W))  # xavier uniform
  k = p["res_blocks_1"]["mlp_0"]["kernel"]
  assert float(jnp.abs(k).max()) <= bound and float(jnp.abs(k).max()) > 0.8 * bound
  assert not np.any(p["input_proj"]["bias"])


def test_params_carry_logical_names():
  head = DiffusionHead(C, D, W, DEPTH)
  v = head.init(
    {"params": jax.random.key(0), "diffusion": jax.random.key(1)},
    jnp.zeros((3, C)),
    jnp.zeros((3, D)),
  )
  specs = jax.tree_util.tree_leaves(
    nn.get_partition_spec(v), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
  )
  shapes = jax.tree_util.tree_leaves(nn.unbox(v))
  assert len(specs) == len(shapes) == 4 + 2 + 2 + 8 * DEPTH + 4
  for spec, leaf in zip(specs, shapes, strict=True):
    assert len(spec) == leaf.ndim
    named = [n for n in spec if n is not None]
    assert named and all(n in LOGICAL_AXES for n in named) and len(set(named)) == len(named)


def test_cfg_mix_guides_eps_only():
  out = jax.random.normal(jax.random.key(0), (6, 2 * C))
  mixed = cfg_model_output(out, 2.5, C)
  cond, uncond = np.asarray(out[:3]), np.asarray(out[3:])
  np.testing.assert_allclose(
    mixed[:, :C], uncond[:, :C] + 2.5 * (cond[:, :C] - uncond[:, :C]), rtol=1e-6
  )
  np.testing.assert_allclose(mixed[:, C:], cond[:, C:])


def test_cfg_one_equals_conditional_sample():
  head = DiffusionHead(C, D, W, DEPTH, num_sampling_steps=6)
  params = _head_params(head)
  zc = jax.random.normal(jax.random.key(2), (3, D))
  zu = jax.random.normal(jax.random.key(3), (3, D))
  rng = jax.random.key(4)
  guided = head.apply(
    params,
    jnp.concatenate([zc, zu]),
    0.9,
    jnp.float32(1.0),
    None,
    rng,
    guided=True,
    method="sample",
  )
  cond = head.apply(params, zc, 0.9, 1.0, None, rng, method="sample")
  assert cond.shape == (3, C) and guided.shape == (6, C)
  np.testing.assert_allclose(guided[:3], cond, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(guided[3:], guided[:3])
  # The uncond rows do matter once cfg != 1.
  g2 = head.apply(params, jnp.concatenate([zc, zu]), 0.9, 2.0, None, rng, method="sample")
  assert float(jnp.abs(g2[:3] - cond).max()) > 1e-3
  with pytest.raises(ValueError, match="guided"):
    jax.jit(lambda c: head.apply(params, zc, 1.0, c, None, rng, method="sample"))(1.0)


def test_guided_sample_matches_manual_cfg_loop():
  """Guided sampling = a p_sample loop whose eps is uncond + cfg (cond - uncond) and whose
  variance output is the conditional one, with noise shared by the halves."""
  head = DiffusionHead(C, D, W, DEPTH, num_sampling_steps=10)
  params = _head_params(head, seed=5)
  zc = jax.random.normal(jax.random.key(2), (2, D))
  zu = jax.random.normal(jax.random.key(3), (2, D))
  rng, cfg, temp, steps = jax.random.key(9), 3.0, 0.7, 5
  out = jax.jit(
    lambda z, s, tau: head.apply(params, z, tau, s, steps, rng, guided=True, method="sample")
  )(jnp.concatenate([zc, zu]), cfg, temp)

  net = SimpleMLPAdaLN(C, W, 2 * C, D, DEPTH)
  net_params = {"params": params["params"]["net"]}

  def model_fn(x, t):
    oc = net.apply(net_params, x, t, zc)
    ou = net.apply(net_params, x, t, zu)
    eps = ou[:, :C] + cfg * (oc[:, :C] - ou[:, :C])
    return jnp.concatenate([eps, oc[:, C:]], -1)

  d = head.gen_diffusion(steps)
  assert d.num_timesteps == steps
  rng_init, rng_loop = jax.random.split(rng)
  noise = jax.random.normal(rng_init, (2, C))
  ref = d.p_sample_loop(model_fn, noise, rng_loop, temperature=temp)
  np.testing.assert_allclose(out[:2], ref, rtol=1e-4, atol=1e-4)


def test_loss_is_masked_mean_of_token_losses():
  head = DiffusionHead(C, D, W, DEPTH)
  params = _head_params(head, n=6)
  target = jax.random.normal(jax.random.key(0), (6, C)) * 0.5
  z = jax.random.normal(jax.random.key(1), (6, D))
  rngs = {"diffusion": jax.random.key(5)}
  loss = jax.jit(lambda m: head.apply(params, target, z, m, rngs=rngs))
  # Same rng and shapes -> same t and noise per row, so one-hot masks read each row's loss.
  per_row = np.asarray(jax.vmap(loss)(jnp.eye(6)))
  assert np.all(per_row > 0) and np.ptp(per_row) > 1e-3
  mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
  np.testing.assert_allclose(float(loss(mask)), per_row[[0, 2, 3]].mean(), rtol=1e-5)
  full = jax.jit(lambda: head.apply(params, target, z, None, rngs=rngs))()
  np.testing.assert_allclose(float(full), per_row.mean(), rtol=1e-5)
  # The training signal reaches the MLP.
  g = jax.jit(jax.grad(lambda p: head.apply({"params": p}, target, z, mask, rngs=rngs)))(
    params["params"]
  )
  assert float(jnp.abs(g["net"]["res_blocks_0"]["mlp_0"]["kernel"]).sum()) > 0


# ------------------------------------------------------------------------------------------------
# The heads registry and the flow-matching head


def test_heads_registry_names_every_head():
  from arvision.models import heads

  assert set(heads.HEADS) == {"categorical", "diffusion", "flow"}
  assert heads.head_class("diffusion") is DiffusionHead
  with pytest.raises(ValueError, match="model.head='bitwise'"):
    heads.head_class("bitwise")
  # categorical is a Dense: `kernel` and `bias`, as the families' `head` params
  p = heads.CategoricalHead(7).init(jax.random.key(0), jnp.zeros((2, 5)))["params"]
  assert {k: v.shape for k, v in p.items()} == {"kernel": (5, 7), "bias": (7,)}


def test_flow_head_loss_sampling_and_cfg():
  from arvision.models.heads import FlowHead

  head = FlowHead(C, D, W, DEPTH, num_sampling_steps=8)
  params = _head_params(head)
  z = jax.random.normal(jax.random.key(2), (6, D))
  x = jax.random.normal(jax.random.key(3), (6, C))
  mask = jnp.array([1.0, 0, 1, 1, 0, 1])
  rngs = {"diffusion": jax.random.key(4)}
  loss = head.apply(params, x, z, mask, rngs=rngs)
  # Per-token losses with the same rng (mask=None averages them all), then the masked mean.
  per = jnp.stack([head.apply(params, x, z, m, rngs=rngs) for m in jnp.eye(6)])
  np.testing.assert_allclose(loss, jnp.sum(per * mask) / mask.sum(), rtol=1e-5)
  zc, zu = z[:3], z[3:]
  rng = jax.random.key(5)
  cond = head.apply(params, zc, 1.0, 1.0, None, rng, method=FlowHead.sample)
  at_one = head.apply(
    params, jnp.concatenate([zc, zu]), 1.0, 1.0, None, rng, guided=True, method=FlowHead.sample
  )
  np.testing.assert_allclose(at_one[:3], cond, atol=1e-5)
  np.testing.assert_allclose(at_one[3:], at_one[:3])
  guided = head.apply(
    params, jnp.concatenate([zc, zu]), 1.0, 3.0, None, rng, guided=True, method=FlowHead.sample
  )
  assert guided.shape == (6, C) and np.abs(np.asarray(guided[:3] - cond)).max() > 1e-4


def test_flow_head_learns_a_conditional_target():
  """Trained on target = first C dims of z, its Euler samples land near the target."""
  import optax

  from arvision.models.heads import FlowHead

  head = FlowHead(C, D, 32, 2, num_sampling_steps=16)
  z = jax.random.normal(jax.random.key(0), (64, D))
  target = z[:, :C]
  params = nn.unbox(
    head.init({"params": jax.random.key(1), "diffusion": jax.random.key(2)}, target, z)
  )["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, rng):
    def f(p):
      return head.apply({"params": p}, target, z, rngs={"diffusion": rng})

    loss, g = jax.value_and_grad(f)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  def sample_err(p):
    out = head.apply({"params": p}, z, 1.0, 1.0, None, jax.random.key(9), method=FlowHead.sample)
    return float(jnp.mean((out - target) ** 2))

  before = sample_err(params)
  for i in range(300):
    params, state, _ = step(params, state, jax.random.key(10 + i))
  after = sample_err(params)
  assert after < 0.2 * before, (before, after)

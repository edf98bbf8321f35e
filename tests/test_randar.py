"""RandAR (random orders, position instructions, official parallel decoding): what each token may
see, the cached parallel sampler against a plain forward of the official step inputs, schedule,
conversion of the official keys."""

import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from tiny_vq import TinyVQ  # tests/ is on sys.path (conftest.py)

from arvision import errors
from arvision.convert import randar as convert_randar
from arvision.models import randar
from arvision.models.raster import RasterTransformer
from arvision.ops import masks
from arvision.sampling import orders

GRID = 4
N = GRID * GRID


def make_config(**model):
  m = dict(dim=32, n_layer=2, n_head=2, multiple_of=16, attn_impl="xla", order="random")
  m.update(schedule="randar", schedule_steps=6, token_dropout=0.0, resid_dropout=0.0)
  m.update(ffn_dropout=0.0, **model)
  return mlc.ConfigDict(dict(family="randar", data=dict(num_classes=5), model=m, sample={}))


@pytest.fixture(scope="module")
def model():
  tok = TinyVQ(latent_size=GRID)
  fam = randar.build(make_config(), tokenizer=tok)
  p = fam.init(jax.random.key(0), None)
  kernel = p["output"]["kernel"]  # zero-initialised head: random weights make logits informative
  p["output"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(1), kernel.shape)
  return fam, {**p, "tokenizer": tok.init(None)}


@pytest.mark.slow  # compiles a vmapped backward pass: over the make-test budget
def test_token_sees_earlier_tokens_and_its_own_instruction_only(model):
  """By gradient: the logits of token t against every input slot (class, q_u, x_u)."""
  fam, p = model
  mod, var = fam.module, fam._vars(p)
  tokens = jax.random.randint(jax.random.key(2), (1, N), 0, 16)
  order = jax.random.permutation(jax.random.key(3), N)[None]
  h, rows = mod.apply(
    var, jnp.array([1]), tokens, order, method=randar.RandARTransformer.interleaved
  )
  w = jax.random.normal(jax.random.key(4), (N, 16))

  def read(h, t):  # a random projection of the logits of token t (slot 2t + 1)
    return jnp.sum(
      mod.apply(var, h, rows, mask=masks.causal(), method="run")[0][0, 2 * t + 1] * w[t]
    )

  grads = jax.vmap(jax.grad(read), (None, 0))(h, jnp.arange(N))
  dep = np.asarray(jnp.abs(grads).sum(axis=(1, 3)) > 0)  # [token, slot]
  for t in range(N):
    xs = {u for u in range(N - 1) if dep[t, 2 * u + 2]}
    qs = {u for u in range(N) if dep[t, 2 * u + 1]}
    assert xs == set(range(t)), f"token {t} sees tokens {sorted(xs)}"
    assert qs == set(range(t + 1)), f"token {t} sees instructions {sorted(qs)}"


def test_instruction_names_the_target_position(model):
  """Swapping the grid positions of the last two tokens changes the last token's logits (its
  instruction) while the earlier ones stay as they are."""
  fam, p = model
  tokens = jax.random.randint(jax.random.key(5), (1, N), 0, 16)
  order = np.arange(N)
  swapped = order.copy()
  swapped[[-2, -1]] = swapped[[-1, -2]]
  a = np.asarray(fam.apply(p, jnp.array([0]), tokens, order=order))
  b = np.asarray(fam.apply(p, jnp.array([0]), tokens, order=swapped))
  np.testing.assert_allclose(a[:, : N - 2], b[:, : N - 2], atol=1e-6)
  assert np.abs(a[:, -1] - b[:, -1]).max() > 1e-3


@pytest.mark.slow  # compiles the sampler: over the make-test budget
def test_one_token_per_call_equals_teacher_forcing(model):
  fam, p = model
  labels = jnp.array([0, 3])
  _, grid, logits, stats = fam.sample_tokens(
    p, labels, jax.random.key(6), cfg=0.0, top_k=1, schedule=(1,) * N, return_logits=True,
    return_stats=True,
  )  # fmt: skip
  order = np.asarray(orders.draw(None, jax.random.fold_in(jax.random.key(6), N), 2, N))
  seq = np.take_along_axis(np.asarray(grid), order, axis=1)
  tf = fam.apply(p, labels, jnp.asarray(seq), order=order)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(tf), atol=2e-5)
  np.testing.assert_array_equal(np.argmax(np.asarray(tf), -1), seq)
  assert stats["calls"].tolist() == [N, N]


@pytest.mark.slow  # compiles the sampler: over the make-test budget
def test_parallel_calls_equal_a_plain_forward_of_the_official_step_inputs(model):
  """Step s of the cached sampler = the logits of the queries q_a .. q_{a+n-1} placed side by
  side after `class, q_0, x_0, ..., q_{a-1}, x_{a-1}` (official), run without a cache."""
  fam, p = model
  mod, var = fam.module, fam._vars(p)
  label = jnp.array([2])
  counts = fam.schedule
  assert len(counts) == 6 and counts[0] == 1 and max(counts) > 1  # parallel calls happen
  _, grid, logits, stats = fam.sample_tokens(
    p, label, jax.random.key(7), cfg=0.0, return_logits=True, return_stats=True
  )
  assert stats["calls"].tolist() == [len(counts)]
  order = np.asarray(orders.draw(None, jax.random.fold_in(jax.random.key(7), N), 1, N))
  seq = np.take_along_axis(np.asarray(grid), order, axis=1)
  h_full, rows_full = mod.apply(
    var, label, jnp.asarray(seq), jnp.asarray(order), method=randar.RandARTransformer.interleaved
  )
  q = mod.apply(var, jnp.asarray(order), method=randar.RandARTransformer.instructions)
  a = 0
  for n in counts:
    h = jnp.concatenate([h_full[:, : 1 + 2 * a], q[:, a : a + n]], axis=1)
    rows = jnp.concatenate([rows_full[:, : 1 + 2 * a], 1 + jnp.asarray(order[:, a : a + n])], 1)
    ref, _ = mod.apply(var, h, rows, mask=masks.causal(), method=RasterTransformer.run)
    np.testing.assert_allclose(
      np.asarray(logits[:, a : a + n]), np.asarray(ref[:, -n:]), atol=3e-5, err_msg=f"step at {a}"
    )
    a += n


def test_randar_schedule_is_the_official_rule():
  counts = orders.randar_schedule(256, 88)
  assert len(counts) == 88 and sum(counts) == 256 and counts[0] == 1
  done = np.cumsum(counts)
  for s in range(1, 87):  # the official target after call s (while more than one is asked for)
    target = min(int((1 - math.cos(math.pi / 2 * (s + 1) / 88)) * 256 + 1), 256)
    assert done[s] == max(target, done[s - 1] + 1), s
  assert orders.randar_schedule(256, 256) == (1,) * 256


def test_convert_maps_every_official_key(model):
  fam, p = model
  sd = convert_randar.to_official(p)
  assert sd["pos_instruct_embeddings"].shape == (1, 32)
  back = convert_randar.convert_gpt(sd, fam.config, fam.tokenizer)
  flat = jax.tree_util.tree_leaves_with_path
  got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat(back)}
  want = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat(
    {k: v for k, v in p.items() if k != "tokenizer"})}  # fmt: skip
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(errors.UserError, match="stray"):
    convert_randar.convert_gpt({**sd, "stray.weight": np.zeros(3)}, fam.config, fam.tokenizer)
  sd.pop("pos_instruct_embeddings")
  with pytest.raises(errors.UserError, match="pos_instruct_embeddings"):
    convert_randar.randar_config(sd)

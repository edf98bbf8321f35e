"""NAR (anti-diagonal decoding, proximity mask, two heads): what each token may see, sampler vs
teacher forcing, model calls, conversion of the official keys."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from tiny_vq import TinyVQ  # tests/ is on sys.path (conftest.py)

from arvision import errors
from arvision.convert import nar as convert_nar
from arvision.models import nar

GRID = 4
N = GRID * GRID


def make_config():
  m = dict(dim=32, n_layer=2, n_head=2, multiple_of=16, attn_impl="xla", medusa_attention_num=1)
  m.update(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
  return mlc.ConfigDict(dict(family="nar", data=dict(num_classes=5), model=m, sample={}))


@pytest.fixture(scope="module")
def model():
  tok = TinyVQ(latent_size=GRID)
  fam = nar.build(make_config(), tokenizer=tok)
  p = fam.init(jax.random.key(0), None)
  kernel = p["output"]["kernel"]  # zero-initialised head: random weights make logits informative
  p["output"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(1), kernel.shape)
  return fam, {**p, "tokenizer": tok.init(None)}


def test_diagonal_order_and_lengths():
  order = nar.diagonal_order(3)
  h, w = np.divmod(order, 3)
  assert sorted(order.tolist()) == list(range(9))
  assert (np.diff(h + w) >= 0).all() and nar.diagonal_lengths(3) == (1, 2, 3, 2, 1)
  assert order.tolist() == [0, 1, 3, 2, 4, 6, 5, 7, 8]


@pytest.mark.slow  # compiles a vmapped backward pass: over the make-test budget
def test_token_depends_on_earlier_anti_diagonals_only(model):
  """By gradient: the logits of each token (decoding order) against every fed embedding; the
  official rule: it sees tokens with h' + w' < h + w (its own anti-diagonal's outputs predict the
  next one)."""
  fam, p = model
  order = fam.order
  mod, var = fam.module, fam._vars(p)
  tokens = jax.random.randint(jax.random.key(2), (1, N), 0, 16)
  h = jnp.concatenate(
    [
      mod.apply(var, jnp.array([1]), method=nar.NARTransformer.embed_cond),
      mod.apply(var, tokens, method=nar.NARTransformer.embed_tokens),
    ],
    axis=1,
  )
  w = jax.random.normal(jax.random.key(3), (N, 16))

  def read(h, t):
    out = mod.apply(var, h, method=nar.NARTransformer.logits_from_embeddings)
    return jnp.sum(out[0, t] * w[t])

  grads = jax.vmap(jax.grad(read), (None, 0))(h, jnp.arange(N))  # [N, 1, 1 + N, C]
  dep = np.asarray(jnp.abs(grads).sum(axis=(1, 3)) > 0)[:, 1:]  # [token, fed token]
  assert np.asarray(jnp.abs(grads).sum(axis=(1, 3)) > 0)[:, 0].all()  # the class token
  c = np.sum(np.divmod(order, GRID), axis=0)  # anti-diagonal of each token in decoding order
  for t in range(N):
    seen = set(np.nonzero(dep[t])[0].tolist())
    assert seen == set(np.nonzero(c < c[t])[0].tolist()), (t, sorted(seen))


@pytest.mark.slow  # compiles the sampler: over the make-test budget
def test_sampler_equals_teacher_forcing_and_counts_calls(model):
  fam, p = model
  labels = jnp.array([0, 3])
  _, grid, logits, stats = fam.sample_tokens(
    p, labels, jax.random.key(4), cfg=0.0, return_logits=True, return_stats=True
  )
  seq = np.asarray(grid)[:, fam.order]
  tf = fam.apply(p, labels, jnp.asarray(seq))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(tf), atol=2e-5)
  assert stats["calls"].tolist() == [2 * GRID - 1] * 2
  _, grid2, logits2 = fam.sample_tokens(p, labels, jax.random.key(5), cfg=3.0, return_logits=True)
  seq2 = jnp.asarray(np.asarray(grid2)[:, fam.order])
  cond, uncond = fam.apply(p, labels, seq2), fam.apply(p, jnp.array([5, 5]), seq2)
  np.testing.assert_allclose(
    np.asarray(logits2), np.asarray(uncond + 3.0 * (cond - uncond)), atol=5e-5
  )


def test_convert_maps_every_official_key(model):
  fam, p = model
  sd = convert_nar.to_official(p)
  assert {"layers.2.attention.wqkv.weight", "medusa_norm.weight", "medusa_output.weight"} <= set(sd)
  back = convert_nar.convert_gpt(sd, fam.config, fam.tokenizer)
  flat = jax.tree_util.tree_leaves_with_path
  got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat(back)}
  want = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat(
    {k: v for k, v in p.items() if k != "tokenizer"})}  # fmt: skip
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(errors.UserError, match="stray"):
    convert_nar.convert_gpt({**sd, "stray.weight": np.zeros(3)}, fam.config, fam.tokenizer)
  sd.pop("medusa_output.weight")
  with pytest.raises(errors.UserError, match="medusa_output"):
    convert_nar.nar_config(sd)

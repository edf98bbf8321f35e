"""PAR (parallel region groups with transition tokens): what each token may see, sampler vs
teacher forcing, model calls, conversion of the official keys."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from tiny_vq import TinyVQ  # tests/ is on sys.path (conftest.py)

from arvision import errors
from arvision.convert import par as convert_par
from arvision.models import par

GRID, REGIONS = 4, 2  # 16 tokens, M = 4 regions: 4 single steps + 3 group steps
M, N = REGIONS * REGIONS, GRID * GRID


def make_config(**model):
  m = dict(dim=32, n_layer=2, n_head=2, multiple_of=16, attn_impl="xla", order="regions")
  m.update(schedule="par", regions=REGIONS, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
  m.update(model)
  return mlc.ConfigDict(dict(family="par", data=dict(num_classes=5), model=m, sample={}))


@pytest.fixture(scope="module")
def model():
  tok = TinyVQ(latent_size=GRID)
  fam = par.build(make_config(), tokenizer=tok)
  p = fam.init(jax.random.key(0), None)
  kernel = p["output"]["kernel"]  # zero-initialised head: random weights make logits informative
  p["output"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(1), kernel.shape)
  return fam, {**p, "tokenizer": tok.init(None)}


def visible_tokens(t: int) -> set:
  """Official PAR: token t < M sees tokens < t; a token of group g >= 1 (tokens gM .. gM+M-1)
  sees the tokens of the groups before it, < gM."""
  return set(range(t)) if t < M else set(range((t // M) * M))


@pytest.mark.slow  # compiles a vmapped backward pass: over the make-test budget
def test_token_depends_only_on_what_it_may_see(model):
  """By gradient: logits of token t against the embedding of each fed token."""
  fam, p = model
  mod, var = fam.module, fam._vars(p)
  tokens = jax.random.randint(jax.random.key(2), (1, N), 0, 16)
  label = jnp.array([1])
  h = mod.apply(var, label, tokens, np.arange(N), method=par.PARTransformer.embed_slots)
  rows = par.slot_tables(GRID, REGIONS)["rope_row"][:N]
  mask = par.group_mask(N, REGIONS)

  w = jax.random.normal(jax.random.key(5), (N, 16))

  def read(h, t):  # a random projection of the logits read at slot t
    return jnp.sum(mod.apply(var, h, rows, mask=mask, method="run")[0][0, t] * w[t])

  grads = jax.vmap(jax.grad(read), (None, 0))(h, jnp.arange(N))  # [N, 1, N, C]
  dep = np.asarray(jnp.abs(grads).sum(axis=(1, 3)) > 0)  # [read slot, fed slot]
  # fed slots of tokens: token u at slot u + 1 (u < M) or u + M
  slot_of = {u: (u + 1 if u < M else u + M) for u in range(N - M)}
  for t in range(N):
    seen = {u for u, s in slot_of.items() if dep[t, s]}
    assert seen == visible_tokens(t), f"token {t} depends on tokens {sorted(seen)}"
    assert dep[t, 0], "every token sees the class token"
    # transition slots M+1 .. 2M-1 are seen by the first group and every later one only
    trans = {s for s in range(M + 1, 2 * M) if dep[t, s]}
    assert trans == (set(range(M + 1, 2 * M)) if t >= M else set()), (t, trans)


@pytest.mark.slow  # compiles the sampler: over the make-test budget
def test_sampler_equals_teacher_forcing_and_counts_calls(model):
  fam, p = model
  labels = jnp.array([0, 3])
  _, grid, logits, stats = fam.sample_tokens(
    p, labels, jax.random.key(3), cfg=0.0, top_k=1, return_logits=True, return_stats=True
  )
  seq = np.asarray(grid)[:, fam.order]  # raster grid -> region order
  tf = fam.apply(p, labels, jnp.asarray(seq))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(tf), atol=2e-5)
  np.testing.assert_array_equal(np.argmax(np.asarray(tf), -1), seq)  # greedy picks
  assert stats["calls"].tolist() == [M + N // M - 1] * 2


@pytest.mark.slow  # compiles the sampler: over the make-test budget
def test_guided_sampler_matches_guided_teacher_forcing(model):
  fam, p = model
  labels = jnp.array([2])
  _, grid, logits = fam.sample_tokens(p, labels, jax.random.key(4), cfg=3.0, return_logits=True)
  seq = jnp.asarray(np.asarray(grid)[:, fam.order])
  cond = fam.apply(p, labels, seq)
  uncond = fam.apply(p, jnp.array([fam.num_classes]), seq)
  np.testing.assert_allclose(
    np.asarray(logits), np.asarray(uncond + 3.0 * (cond - uncond)), atol=5e-5
  )


def test_par_rejects_other_orders_and_decodes(model):
  fam, p = model
  with pytest.raises(ValueError, match="fixed order"):
    fam.sample_tokens(p, jnp.array([0]), jax.random.key(0), order=np.arange(N))
  with pytest.raises(ValueError, match="decode='sjd'"):
    fam.sample_tokens(p, jnp.array([0]), jax.random.key(0), decode="sjd")
  with pytest.raises(ValueError, match="model.order must be 'regions'"):
    par.build(make_config(order="raster"), tokenizer=TinyVQ(latent_size=GRID))


def test_convert_maps_every_official_key(model):
  fam, p = model
  sd = convert_par.to_official(p)
  assert "spe_tok_embeddings.special_embeddings.weight" in sd
  assert sd["spe_tok_embeddings.special_embeddings.weight"].shape == (M - 1, 32)
  back = convert_par.convert_gpt(sd, fam.config, fam.tokenizer)
  flat = jax.tree_util.tree_leaves_with_path
  got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat(back)}
  want = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat(
    {k: v for k, v in p.items() if k != "tokenizer"})}  # fmt: skip
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(errors.UserError, match="stray"):
    convert_par.convert_gpt({**sd, "stray.weight": np.zeros(3)}, fam.config, fam.tokenizer)
  sd.pop("spe_tok_embeddings.special_embeddings.weight")
  with pytest.raises(errors.UserError, match="spe_tok_embeddings"):
    convert_par.par_config(sd)

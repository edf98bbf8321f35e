"""Speculative decoding of the raster family (SJD, LANTERN): exactness, distribution, pooling."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from scipy import stats
from tiny_vq import TinyVQ  # tests/ is on sys.path (conftest.py)

from arvision.models import raster
from arvision.sampling import speculative
from arvision.sampling.topk import filter_top_k_top_p


def make_config():
  model = dict(dim=32, n_layer=2, n_head=4, multiple_of=16, attn_impl="xla")
  model.update(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
  data = dict(num_classes=5)
  return mlc.ConfigDict(dict(family="raster", data=data, model=model, sample=dict(cfg=2.0)))


def tiny(vocab_size=16, latent_size=4, scale=0.5, seed=1):
  tok = TinyVQ(vocab_size=vocab_size, latent_size=latent_size, codebook=True)
  fam = raster.build(make_config(), tokenizer=tok)
  p = fam.init(jax.random.key(0), None)
  # the head is zero-initialised: random weights make the logits informative
  kernel = p["output"]["kernel"]
  p["output"]["kernel"] = scale * jax.random.normal(jax.random.key(seed), kernel.shape)
  return fam, {**p, "tokenizer": tok.init(None)}


@pytest.fixture(scope="module")
def model():
  return tiny()


# ------------------------------------------------------------------------------------------------
# Exactness


def test_greedy_sjd_equals_plain_decoding(model):
  """top_k=1: every accepted token is the plain argmax, whatever the drafts and the rng."""
  fam, params = model
  labels = jnp.array([0, 1, 2, 3])
  kw = dict(cfg=2.0, top_k=1)
  _, plain, _ = fam.sample_tokens(params, labels, jax.random.key(0), **kw)
  _, sjd, _, st = fam.sample_tokens(
    params, labels, jax.random.key(1), decode="sjd", window=4, return_stats=True, **kw
  )
  np.testing.assert_array_equal(sjd, plain)
  calls = np.asarray(st["calls"])
  assert np.all(calls <= fam.num_tokens) and np.all(calls >= 1 + (fam.num_tokens - 1) // 4)
  assert calls.min() < fam.num_tokens  # some drafts were accepted (the test is not vacuous)
  np.testing.assert_allclose(st["tokens_per_call"], fam.num_tokens / calls)
  # known tokens are kept, and the rest is the greedy completion of them (plain does the same)
  known = jnp.broadcast_to(jnp.arange(16) % 16, (4, 16))
  kmask = jnp.broadcast_to(jnp.arange(16) % 3 == 1, (4, 16))
  a = fam.sample_tokens(params, labels, jax.random.key(0), known=known, known_mask=kmask, **kw)
  b = fam.sample_tokens(
    params, labels, jax.random.key(2), known=known, known_mask=kmask, decode="sjd", window=4, **kw
  )
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], plain)


def test_lantern_with_zero_delta_is_sjd_and_a_budget_accepts_more(model):
  fam, params = model
  labels = jnp.arange(6) % 5
  kw = dict(cfg=2.0, top_k=0, window=4, return_stats=True)
  _, sjd, _, s0 = fam.sample_tokens(params, labels, jax.random.key(3), decode="sjd", **kw)
  _, lan, _, s1 = fam.sample_tokens(
    params, labels, jax.random.key(3), decode="lantern", lantern_k=4, lantern_delta=0.0, **kw
  )
  np.testing.assert_array_equal(lan, sjd)
  np.testing.assert_array_equal(s1["calls"], s0["calls"])
  n = fam.trace_count
  _, lan2, _, s2 = fam.sample_tokens(
    params, labels, jax.random.key(3), decode="lantern", lantern_k=4, lantern_delta=0.5, **kw
  )
  assert fam.trace_count == n  # delta is traced
  assert not np.array_equal(lan2, sjd) and s2["calls"].sum() < s0["calls"].sum()


def test_decode_option_errors(model):
  fam, params = model
  labels = jnp.array([0])
  for kw, what in [
    (dict(decode="medusa"), "decode="),
    (dict(decode="sjd", window=1), "window="),
    (dict(decode="lantern", lantern_delta=1.5), "lantern_delta="),
    (dict(decode="sjd", return_logits=True), "return_logits"),
    (dict(decode="sjd", schedule=(1, 1, 2, 4, 8)), "one-token schedule"),
  ]:
    with pytest.raises(ValueError, match=what):
      fam.sample_tokens(params, labels, jax.random.key(0), **kw)
  plain = raster.build(make_config(), tokenizer=TinyVQ(codebook=False))
  with pytest.raises(ValueError, match="codebook"):
    plain.sample_tokens(params, labels, jax.random.key(0), decode="lantern")


# ------------------------------------------------------------------------------------------------
# LANTERN's pooling against its definition


def lantern_direct(p, x, codebook, k, delta):
  """p~ written out: sort the other codes by distance to x, take the nearest while their total
  probability stays <= delta, move that mass onto x."""
  d = np.sum((codebook - codebook[x]) ** 2, axis=-1)
  others = [i for i in np.argsort(d, kind="stable") if i != x][:k]
  out, total = p.astype(np.float64).copy(), 0.0
  for i in others:
    if total + p[i] > delta + 1e-7:
      break
    total += p[i]
    out[i] = 0.0
  out[x] += total
  return out


def test_lantern_pooling_matches_direct_definition():
  rng = np.random.default_rng(0)
  V, K, C = 12, 6, 3
  codebook = rng.normal(size=(V, C)).astype(np.float32)
  p = rng.dirichlet(np.full(V, 0.5), size=K).astype(np.float32)
  x = rng.integers(0, V, size=K).astype(np.int32)
  for k, delta in [(1, 0.2), (4, 0.1), (11, 0.3), (11, 1.0), (5, 0.0)]:
    nbr = speculative.nearest_codes(jnp.asarray(codebook), jnp.asarray(x), k)
    got = np.asarray(speculative.lantern_relax(jnp.asarray(p), jnp.asarray(x), nbr, delta))
    want = np.stack([lantern_direct(p[i], x[i], codebook, k, delta) for i in range(K)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert np.all(0.5 * np.abs(got - p).sum(-1) <= delta + 1e-6)  # the TV budget
  assert not np.allclose(got, p) or delta == 0  # pooling moved mass somewhere
  with pytest.raises(ValueError, match="lantern_k"):
    speculative.nearest_codes(jnp.asarray(codebook), jnp.asarray(x), V)


# ------------------------------------------------------------------------------------------------
# Distribution: SJD samples against the model's exact joint distribution


def exact_joint(fam, params, label, cfg, temperature, top_k):
  """Probabilities of every token sequence (tiny V and N) under plain decoding's rules."""
  V, N = fam.module.vocab_size, fam.num_tokens
  seqs = np.array(list(itertools.product(range(V), repeat=N)), np.int32)
  lab = jnp.full((len(seqs),), label)
  cond = fam.apply(params, lab, jnp.asarray(seqs))
  unc = fam.apply(params, jnp.full_like(lab, fam.num_classes), jnp.asarray(seqs))
  logits = unc + (cond - unc) * cfg
  logp = jax.nn.log_softmax(filter_top_k_top_p(logits / temperature, top_k, 0.0), axis=-1)
  tok_logp = jnp.take_along_axis(logp, jnp.asarray(seqs)[..., None], -1)[..., 0]
  return seqs, np.exp(np.asarray(tok_logp.sum(-1), np.float64))


def chi2_pvalue(fam, seqs_counted, probs, samples):
  V = fam.module.vocab_size
  index = np.asarray(samples) @ (V ** np.arange(fam.num_tokens)[::-1])
  counts = np.bincount(index, minlength=len(probs)).astype(np.float64)
  expected = probs / probs.sum() * len(index)
  keep = expected >= 5  # pool the rare cells into one
  obs = np.append(counts[keep], counts[~keep].sum())
  exp = np.append(expected[keep], expected[~keep].sum())
  return stats.chisquare(obs, exp).pvalue


SAMPLES = 6000
SETTINGS = dict(cfg=2.0, temperature=0.9, top_k=3)


@pytest.fixture(scope="module")
def dist_model():
  fam, params = tiny(vocab_size=4, latent_size=2, scale=0.35)  # N = 4 tokens, 256 sequences
  seqs, probs = exact_joint(fam, params, 1, **SETTINGS)
  return fam, params, seqs, probs


def test_sjd_samples_follow_the_plain_distribution(dist_model):
  fam, params, seqs, probs = dist_model
  labels = jnp.ones((SAMPLES,), jnp.int32)
  _, codes, _, st = fam.sample_tokens(
    params, labels, jax.random.key(0), decode="sjd", window=3, return_stats=True, **SETTINGS
  )
  assert float(np.mean(st["calls"])) < fam.num_tokens  # drafts were accepted
  assert chi2_pvalue(fam, seqs, probs, codes) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["residual_is_target", "ignore_q", "plain_ok"])
def test_distribution_test_catches_broken_acceptance(dist_model, monkeypatch, broken):
  """The distribution test above has the power to reject wrong acceptance rules (and the same
  seed with the right rule passes it)."""
  fam0, params, seqs, probs = dist_model
  right = speculative.accept_drafts

  def wrong(target, q, x, u):
    m, res = right(target, q, x, u)
    if broken == "residual_is_target":  # forgets to subtract the draft distribution
      return m, target
    rows = jnp.arange(x.shape[0])
    if broken == "ignore_q":  # accepts with probability p(x) instead of p(x) / q(x)
      ok = u < target[rows, x]
      return jnp.sum(jnp.cumprod(ok.astype(jnp.int32))).astype(jnp.int32), res
    return m, res

  if broken != "plain_ok":
    monkeypatch.setattr(speculative, "accept_drafts", wrong)
  fam = raster.build(fam0.config, tokenizer=fam0.tokenizer)  # a fresh jit: traces the patch
  labels = jnp.ones((SAMPLES,), jnp.int32)
  _, codes, _ = fam.sample_tokens(
    params, labels, jax.random.key(0), decode="sjd", window=3, **SETTINGS
  )
  pvalue = chi2_pvalue(fam, seqs, probs, codes)
  if broken == "plain_ok":
    _, codes, _ = fam.sample_tokens(params, labels, jax.random.key(0), **SETTINGS)
    assert chi2_pvalue(fam, seqs, probs, codes) > 1e-3  # plain decoding passes too
    assert pvalue > 1e-3
  else:
    assert pvalue < 1e-6, pvalue

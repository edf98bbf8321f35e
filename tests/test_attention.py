"""Mask specs and the attention dispatch: the xla reference against a per-query numpy loop."""

import dataclasses
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.ops import attention, masks
from arvision.ops.attention import SUPPORTS, choose_impl, unsupported_reason

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_LENGTHS = tuple(p * p for p in VAR_PATCH_NUMS)  # L = 680
RANDOM_LENGTHS = tuple(int(n) for n in np.random.default_rng(3).integers(1, 12, size=7))

# One compiled program per case instead of op-by-op dispatch: keeps the file fast on 2 CPU cores.
_attention = jax.jit(attention, static_argnames=("mask", "impl", "scale", "q_offset"))


def _segment_of(pos, lengths):
  """Independent segment lookup: walk the segments (padding = len(lengths))."""
  end = 0
  for i, n in enumerate(lengths):
    end += n
    if pos < end:
      return i
  return len(lengths)


def _sees(spec_args, q, k):
  """Visibility written from each mask's definition, independent of the specs' own code."""
  kind, arg = spec_args
  if kind == "full":
    return True
  if kind == "causal":
    return k <= q
  if kind == "scale_causal":
    return _segment_of(k, arg) <= _segment_of(q, arg)
  if kind == "block_diagonal":
    return _segment_of(k, arg) == _segment_of(q, arg)
  if kind == "chunk_causal":
    return k // arg <= q // arg
  raise AssertionError(kind)


def _make(spec_args):
  kind, arg = spec_args
  return getattr(masks, kind)() if arg is None else getattr(masks, kind)(arg)


def _naive_attention(q, k, v, spec_args, scale, q_offset=0):
  """One query at a time: numpy float64 softmax over the visible keys; no visible key -> 0."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, lq, h, _ = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  out = np.zeros((b, lq, h, v.shape[-1]))
  for qi in range(lq):
    keys = [kj for kj in range(lk) if _sees(spec_args, q_offset + qi, kj)]
    if not keys:
      continue
    for bi, hi in itertools.product(range(b), range(h)):
      kv_head = hi // (h // hkv)
      logits = k[bi, keys, kv_head] @ q[bi, qi, hi] * scale
      p = np.exp(logits - logits.max())
      out[bi, qi, hi] = (p / p.sum()) @ v[bi, keys, kv_head]
  return out


def _qkv(b, lq, lk, h, hkv, d, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(kq, (b, lq, h, d), dtype),
    jax.random.normal(kk, (b, lk, hkv, d), dtype),
    jax.random.normal(kv, (b, lk, hkv, d), dtype),
  )


SPECS = [
  ("full", None),
  ("causal", None),
  ("scale_causal", (1, 4, 9, 16)),
  ("scale_causal", RANDOM_LENGTHS),
  ("block_diagonal", (1, 4, 9, 16)),
  ("block_diagonal", RANDOM_LENGTHS),
  ("chunk_causal", 4),
  ("chunk_causal", 7),
]


# ----------------------------------------------------------------------------- mask specs


@pytest.mark.parametrize("spec_args", SPECS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("q_len,kv_len,q_offset", [(30, 30, 0), (37, 45, 0), (5, 33, 28)])
def test_dense_matches_definition(spec_args, q_len, kv_len, q_offset):
  spec = _make(spec_args)
  dense = spec.dense(q_len, kv_len, q_offset)
  want = np.array(
    [[_sees(spec_args, q_offset + i, j) for j in range(kv_len)] for i in range(q_len)]
  )
  assert dense.shape == (q_len, kv_len) and dense.dtype == bool
  np.testing.assert_array_equal(dense, want)
  # kv_range is one interval per query that agrees with dense; density counts the same pairs.
  start, end = spec.kv_range(np.arange(q_offset, q_offset + q_len), kv_len)
  cols = np.arange(kv_len)[None, :]
  np.testing.assert_array_equal((cols >= start[:, None]) & (cols < end[:, None]), want)
  assert spec.density(q_len, kv_len, q_offset) == pytest.approx(want.mean())


def test_scale_causal_sees_exactly_earlier_scales():
  spec = masks.scale_causal(VAR_LENGTHS)
  dense = spec.dense(680)
  bounds = np.concatenate([[0], np.cumsum(VAR_LENGTHS)])
  for i in range(len(VAR_LENGTHS)):
    rows = dense[bounds[i] : bounds[i + 1]]
    # Every token of scale i sees the whole prefix up to the end of scale i and nothing after.
    assert rows[:, : bounds[i + 1]].all() and not rows[:, bounds[i + 1] :].any()
  np.testing.assert_array_equal(spec.segment_ids(680), np.repeat(np.arange(10), VAR_LENGTHS))
  assert spec.total == 680 and spec.bounds[-1] == 680
  # Density: sum_i n_i * prefix_i / L^2 (~0.62 for VAR-256, see the kernels notes).
  want = sum(n * e for n, e in zip(VAR_LENGTHS, bounds[1:], strict=True)) / 680**2
  assert spec.density(680) == pytest.approx(want) and 0.6 < want < 0.65


def test_scale_causal_padding_is_its_own_segment():
  spec = masks.scale_causal((1, 4))
  dense = spec.dense(8)
  assert not dense[:5, 5:].any()  # real queries never see padding keys
  assert dense[5:].all()  # padding queries see everything (their rows are dropped)
  np.testing.assert_array_equal(spec.segment_ids(8), [0, 1, 1, 1, 1, 2, 2, 2])


def test_block_diagonal_sees_only_own_segment():
  lengths = (3, 1, 5)
  dense = masks.block_diagonal(lengths).dense(9)
  blocks = [np.ones((n, n), bool) for n in lengths]
  want = np.zeros((9, 9), bool)
  start = 0
  for blk in blocks:
    want[start : start + len(blk), start : start + len(blk)] = blk
    start += len(blk)
  np.testing.assert_array_equal(dense, want)


@pytest.mark.parametrize("chunk,n", [(1, 9), (4, 6), (16, 3)])
def test_chunk_causal_equals_uniform_scale_causal(chunk, n):
  length = chunk * n
  a, b = masks.chunk_causal(chunk), masks.scale_causal((chunk,) * n)
  np.testing.assert_array_equal(a.dense(length), b.dense(length))
  np.testing.assert_array_equal(a.segment_ids(length), b.segment_ids(length))
  assert a.density(length) == pytest.approx(b.density(length))
  if chunk == 1:
    np.testing.assert_array_equal(a.dense(length), masks.causal().dense(length))


def test_specs_hashable_and_static_under_jit():
  assert masks.scale_causal([1, 4]) == masks.scale_causal((1, 4))
  assert hash(masks.scale_causal([1, 4])) == hash(masks.scale_causal((1, 4)))
  assert masks.scale_causal((1, 4)) != masks.block_diagonal((1, 4))
  assert masks.causal() == masks.causal() and masks.full() != masks.causal()
  assert len({masks.chunk_causal(4), masks.chunk_causal(4), masks.chunk_causal(5)}) == 2
  with pytest.raises(dataclasses.FrozenInstanceError):
    masks.chunk_causal(4).chunk = 5  # frozen

  traces = []

  def f(x, spec):
    traces.append(spec)
    return jnp.sum(jnp.where(spec.dense(x.shape[0]), x, 0.0))

  jf = jax.jit(f, static_argnums=1)
  x = jnp.ones((5, 5))
  assert float(jf(x, masks.scale_causal((1, 4)))) == 1 + 4 * 5
  assert float(jf(x, masks.scale_causal([1, 4]))) == 21  # equal spec: cached, no retrace
  assert float(jf(x, masks.block_diagonal((1, 4)))) == 1 + 16
  assert len(traces) == 2


@pytest.mark.parametrize("spec_args", SPECS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_allowed_and_kv_range_work_on_traced_int32(spec_args):
  spec = _make(spec_args)
  q = np.arange(40, dtype=np.int32)[:, None]
  k = np.arange(40, dtype=np.int32)[None, :]
  traced = jax.jit(lambda q, k: spec.allowed(q, k))(q, k)
  np.testing.assert_array_equal(np.broadcast_to(traced, (40, 40)), spec.dense(40))
  start, end = jax.jit(lambda q: spec.kv_range(q, 40))(np.arange(40, dtype=np.int32))
  assert start.dtype == jnp.int32 and end.dtype == jnp.int32
  np.testing.assert_array_equal(end - start, spec.visible_counts(40))
  # Plain Python ints work too (host-side block maps).
  assert bool(spec.allowed(3, 2)) == _sees(spec_args, 3, 2)


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: masks.scale_causal(()), "non-empty"),
    (lambda: masks.scale_causal((1, 0, 4)), r"lengths\[1\]"),
    (lambda: masks.block_diagonal(5), "sequence"),
    (lambda: masks.chunk_causal(0), "chunk"),
    (lambda: masks.causal().dense(4, 4, -1), "q_offset"),
    (lambda: masks.full().dense(0), "q_len"),
  ],
)
def test_bad_specs(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("spec_args", SPECS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_xla_matches_naive(spec_args, heads):
  h, hkv = heads
  length = 30
  q, k, v = _qkv(2, length, length, h, hkv, 8, seed=h * 10 + hkv)
  got = _attention(q, k, v, mask=_make(spec_args), impl="xla")
  want = _naive_attention(q, k, v, spec_args, 8**-0.5)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_xla_var_lengths_and_decoding_rows():
  spec_args = ("scale_causal", VAR_LENGTHS)
  spec = _make(spec_args)
  q, k, v = _qkv(2, 680, 680, 4, 2, 8, seed=5)
  full_out = _attention(q, k, v, mask=spec, impl="xla")
  # Spot-check the full 680-token output against the loop on a subset of queries.
  rows = np.array([0, 1, 4, 5, 13, 14, 99, 100, 423, 424, 679])
  want = np.concatenate(
    [_naive_attention(q[:, r : r + 1], k, v, spec_args, 8**-0.5, q_offset=int(r)) for r in rows], 1
  )
  np.testing.assert_allclose(full_out[:, rows], want, atol=2e-5, rtol=1e-5)
  # Cached decoding of each scale: its queries against the kv so far equal the full rows.
  bounds = np.concatenate([[0], np.cumsum(VAR_LENGTHS)])
  for s in (0, 3, 9):
    lo, hi = int(bounds[s]), int(bounds[s + 1])
    step = _attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask=spec, impl="xla", q_offset=lo)
    np.testing.assert_allclose(step, full_out[:, lo:hi], atol=1e-6, rtol=1e-6)
  # ... and against the whole (static-shape) cache: future scales are masked by the spec itself.
  lo = int(bounds[8])
  step = _attention(q[:, lo : lo + 100], k, v, mask=spec, impl="xla", q_offset=lo)
  np.testing.assert_allclose(step, full_out[:, lo : lo + 100], atol=1e-6, rtol=1e-6)


def test_causal_decoding_with_traced_offset():
  q, k, v = _qkv(1, 12, 12, 2, 1, 8, seed=6)
  full_out = _attention(q, k, v, mask=masks.causal(), impl="xla")

  @jax.jit
  def step(pos):
    q_t = jax.lax.dynamic_slice_in_dim(q, pos, 1, axis=1)
    return attention(q_t, k, v, mask=masks.causal(), impl="xla", q_offset=pos)

  for pos in (0, 5, 11):
    np.testing.assert_allclose(step(jnp.int32(pos)), full_out[:, pos : pos + 1], atol=1e-6)


def test_fully_masked_rows_are_zero_with_finite_grads():
  # Queries of the second block see no key when the kv holds only the first block.
  spec = masks.block_diagonal((4, 4))
  q, k, v = _qkv(2, 8, 4, 2, 2, 8, seed=7)
  out = _attention(q, k, v, mask=spec, impl="xla")
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(out[:, 4:], 0.0)
  want = _naive_attention(q, k, v, ("block_diagonal", (4, 4)), 8**-0.5)
  np.testing.assert_allclose(out[:, :4], want[:, :4], atol=2e-5)
  loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask=spec, impl="xla") ** 2)
  grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(grads[0][:, 4:], 0.0)


def test_masked_large_logits_do_not_poison_grads():
  # A masked key with a huge logit must not leak inf/NaN into the gradient (exp-before-where bug).
  q = jnp.ones((1, 2, 1, 4))
  k = jnp.stack([jnp.ones(4), 1e4 * jnp.ones(4)])[None, :, None, :]
  v = jax.random.normal(jax.random.key(0), (1, 2, 1, 4))
  f = lambda q, k: jnp.sum(attention(q, k, v, mask=masks.causal(), impl="xla"))
  gq, gk = jax.jit(jax.grad(f, (0, 1)))(q, k)
  assert np.isfinite(np.asarray(gq)).all() and np.isfinite(np.asarray(gk)).all()


def test_matches_jax_reference_and_grads():
  q, k, v = _qkv(2, 16, 16, 4, 2, 8, seed=8)
  for spec, causal in ((masks.full(), False), (masks.causal(), True)):
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    got = _attention(q, k, v, mask=spec, impl="xla")
    np.testing.assert_allclose(got, want, atol=1e-5)
    loss_ours = lambda q, k, v, s=spec: jnp.sum(jnp.sin(attention(q, k, v, mask=s, impl="xla")))
    loss_jax = lambda q, k, v, c=causal: jnp.sum(
      jnp.sin(jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="xla"))
    )
    grads_ours = jax.jit(jax.grad(loss_ours, (0, 1, 2)))(q, k, v)
    grads_jax = jax.jit(jax.grad(loss_jax, (0, 1, 2)))(q, k, v)
    for a, b in zip(grads_ours, grads_jax, strict=True):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_scale_and_bf16():
  q, k, v = _qkv(1, 10, 10, 2, 2, 16, seed=9)
  got = _attention(q, k, v, mask=masks.causal(), impl="xla", scale=0.3)
  np.testing.assert_allclose(got, _naive_attention(q, k, v, ("causal", None), 0.3), atol=2e-5)
  qb, kb, vb = (t.astype(jnp.bfloat16) for t in (q, k, v))
  out_b = _attention(qb, kb, vb, mask=masks.causal(), impl="xla")
  assert out_b.dtype == jnp.bfloat16
  want = _naive_attention(qb, kb, vb, ("causal", None), 16**-0.5)
  np.testing.assert_allclose(np.asarray(out_b, np.float32), want, atol=3e-2)


def test_auto_on_cpu_is_xla_and_dispatch_errors():
  q, k, v = _qkv(1, 8, 8, 2, 2, 8, seed=10)
  spec = masks.scale_causal((1, 3, 4))
  if jax.default_backend() == "cpu":
    assert choose_impl(q, k, v, mask=spec) == "xla"
    assert choose_impl(q, k, v, mask=masks.causal()) == "xla"
  np.testing.assert_array_equal(
    attention(q, k, v, mask=spec), attention(q, k, v, mask=spec, impl="xla")
  )
  for impl in ("pallas", "splash"):  # the kernels (interpret mode on CPU) behind the same call
    np.testing.assert_allclose(
      np.asarray(attention(q, k, v, mask=spec, impl=impl)),
      np.asarray(attention(q, k, v, mask=spec, impl="xla")),
      atol=1e-5,
    )
  assert set(SUPPORTS) == {"xla", "cudnn", "pallas", "splash"}
  # cuDNN refuses masks that need a dense bias, float32, offsets, and names the alternatives.
  with pytest.raises(ValueError, match="cudnn supports full and causal.*impl='xla'"):
    attention(q, k, v, mask=spec, impl="cudnn")
  with pytest.raises(ValueError, match="bf16 or fp16"):
    attention(q, k, v, mask=masks.causal(), impl="cudnn")
  qb, kb, vb = (t.astype(jnp.bfloat16) for t in (q, k, v))
  with pytest.raises(ValueError, match="q_offset"):
    attention(qb[:, :1], kb, vb, mask=masks.causal(), impl="cudnn", q_offset=7)
  if jax.default_backend() != "gpu":
    assert "GPU" in unsupported_reason("cudnn", qb, kb, vb, mask=masks.causal())
    with pytest.raises(ValueError, match="GPU backend"):
      attention(qb, kb, vb, mask=masks.full(), impl="cudnn")
  with pytest.raises(ValueError, match="impl must be one of"):
    attention(q, k, v, mask=spec, impl="flash")


@pytest.mark.parametrize(
  "shapes,kwargs,match",
  [
    (((1, 4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {"mask": None}, "MaskSpec"),
    (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {}, "must divide"),
    (((1, 4, 2, 8), (1, 4, 2, 4), (1, 4, 2, 4)), {}, "head dims"),
    (((1, 4, 2, 8), (1, 5, 2, 8), (1, 4, 2, 8)), {}, "share"),
    (((4, 2, 8),) * 3, {}, r"\[B, L, H, D\]"),
    (((1, 4, 2, 8),) * 3, {"q_offset": -1}, "q_offset"),
  ],
)
def test_bad_attention_inputs(shapes, kwargs, match):
  q, k, v = (jnp.zeros(s) for s in shapes)
  kwargs = {"mask": masks.full(), **kwargs}
  with pytest.raises(ValueError, match=match):
    attention(q, k, v, impl="xla", **kwargs)


@pytest.mark.torch
def test_matches_torch_sdpa_gqa():
  torch = pytest.importorskip("torch")
  q, k, v = _qkv(2, 12, 12, 4, 2, 8, seed=11)
  tq, tk, tv = (torch.from_numpy(np.array(t)).transpose(1, 2) for t in (q, k, v))
  sdpa = torch.nn.functional.scaled_dot_product_attention
  want = sdpa(tq, tk, tv, is_causal=True, enable_gqa=True)
  got = _attention(q, k, v, mask=masks.causal(), impl="xla")
  np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.gpu
def test_cudnn_matches_xla_on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  q, k, v = _qkv(2, 128, 128, 4, 2, 64, dtype=jnp.bfloat16, seed=12)
  kv_len = jnp.asarray([128, 77])
  for spec in (masks.full(), masks.causal(), masks.key_length(kv_len)):
    assert choose_impl(q, k, v, mask=spec) == "cudnn"
    got = attention(q, k, v, mask=spec, impl="cudnn")
    want = attention(q, k, v, mask=spec, impl="xla")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)


# ----------------------------------------------------------------------------- key_length


@pytest.mark.parametrize("base", [None, ("causal", None), ("scale_causal", (1, 4, 9, 16))])
def test_key_length_dense_and_ranges_match_definition(base):
  kv_len = np.array([30, 7, 1])
  spec = masks.key_length(kv_len, None if base is None else _make(base))
  base = base or ("full", None)
  want = np.array(
    [[[_sees(base, i, j) and j < n for j in range(30)] for i in range(30)] for n in kv_len.tolist()]
  )
  dense = np.asarray(spec.dense(30, 30))
  assert dense.shape == (3, 30, 30)
  np.testing.assert_array_equal(dense, want)
  start, end = spec.kv_range(np.arange(30), 30)
  cols = np.arange(30)[None, None, :]
  np.testing.assert_array_equal((cols >= start[..., None]) & (cols < end[..., None]), want)
  traced = jax.jit(
    lambda n: masks.key_length(n, spec.base).allowed(np.arange(30)[:, None], np.arange(30)[None])
  )(kv_len)
  np.testing.assert_array_equal(traced, want)
  assert spec.density(30, 30) == pytest.approx(want.mean())
  seg = np.asarray(spec.segment_id(np.arange(30)))
  assert seg.shape == (3, 30) and (seg[1, 7:] == -1).all() and (seg[1, :7] >= 0).all()


def test_key_length_attention_matches_naive_jax_and_grads():
  b, l, h, d = 3, 20, 4, 8
  q, k, v = _qkv(b, l, l, h, 2, d, seed=21)
  kv_len = jnp.asarray([20, 9, 1])
  f = jax.jit(lambda q, k, v, n: attention(q, k, v, mask=masks.key_length(n), impl="xla"))
  got = np.asarray(f(q, k, v, kv_len))
  for i, n in enumerate(kv_len.tolist()):  # each example alone, its padding keys cut off
    want = _naive_attention(
      q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], ("full", None), d**-0.5
    )
    np.testing.assert_allclose(got[i : i + 1], want, atol=1e-5)
  # jax's own padding attention: the same float ops (MAR's numbers before it used this dispatch)
  kr, vr = (jnp.repeat(t, 2, axis=2) for t in (k, v))
  jax_ref = jax.jit(
    lambda q, k, v, n: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n)
  )
  np.testing.assert_array_equal(f(q, kr, vr, kv_len), jax_ref(q, kr, vr, kv_len))
  g = jax.grad(lambda k: jnp.sum(f(q, k, v, kv_len) ** 2))(k)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[1, 9:] == 0) and np.any(g[1, :9] != 0)
  # a row that sees no key (kv_len 0) gives zeros with finite gradients
  z = jnp.asarray([20, 0, 3])
  out = f(q, k, v, z)
  assert np.all(np.asarray(out)[1] == 0)
  assert np.all(np.isfinite(jax.grad(lambda q: jnp.sum(f(q, k, v, z) ** 2))(q)))


def test_key_length_dispatch_and_errors():
  q, k, v = _qkv(2, 8, 8, 2, 2, 8, seed=22)
  spec = masks.key_length(jnp.asarray([8, 3]))
  assert choose_impl(q, k, v, mask=spec) == "xla" or jax.default_backend() == "gpu"
  for impl in ("pallas", "splash"):
    assert "key_length" in unsupported_reason(impl, q, k, v, mask=spec)
    with pytest.raises(ValueError, match="key_length"):
      attention(q, k, v, mask=spec, impl=impl)
  qb, kb, vb = (t.astype(jnp.bfloat16) for t in (q, k, v))
  reason = unsupported_reason(
    "cudnn", qb, kb, vb, mask=masks.key_length(jnp.asarray([8, 3]), masks.scale_causal((4, 4)))
  )
  assert "cudnn supports full and causal" in reason
  with pytest.raises(ValueError, match=r"kv_len must be \[B=2\]"):
    attention(q, k, v, mask=masks.key_length(jnp.asarray([8, 3, 1])), impl="xla")
  with pytest.raises(ValueError, match="int dtype"):
    masks.key_length(jnp.asarray([1.0, 2.0]))
  with pytest.raises(ValueError, match="base"):
    masks.key_length(jnp.asarray([1]), spec)
  assert spec == spec and spec != masks.key_length(spec.kv_len) and hash(spec) == hash(spec)


def test_masked_softmax_gradient_is_autodiff_of_its_forward():
  # The hand-written softmax VJP (one reduction over keys) against autodiff through the forward
  # formula, on the VAR training mask plus a row that sees no key.
  attn = importlib.import_module("arvision.ops.attention")  # the module (the package exports fn)
  allowed = np.array(masks.scale_causal((1, 4, 9)).dense(14, 14, 0))
  allowed[3] = False
  logits = 4.0 * jax.random.normal(jax.random.key(3), (2, 3, 14, 14))
  weights = jax.random.normal(jax.random.key(4), (2, 3, 14, 14))

  def loss(fn):
    return lambda x: jnp.sum(jnp.tanh(fn(x, allowed)) * weights)

  np.testing.assert_array_equal(
    attn._masked_softmax(logits, allowed), attn._masked_softmax_value(logits, allowed)
  )
  g_ours = jax.jit(jax.grad(loss(attn._masked_softmax)))(logits)
  g_ref = jax.jit(jax.grad(loss(attn._masked_softmax_value)))(logits)
  np.testing.assert_allclose(g_ours, g_ref, atol=2e-6)
  np.testing.assert_array_equal(g_ours[..., 3, :], 0.0)
  np.testing.assert_array_equal(np.where(allowed, 0.0, g_ours), 0.0)


def _weighted_loss(spec, w, blocked):
  attn = importlib.import_module("arvision.ops.attention")
  f = lambda q, k, v: attn._xla_attention(q, k, v, spec, 0.5, 0, blocked=blocked)
  return lambda q, k, v: jnp.sum(jnp.tanh(f(q, k, v)) * w)


def test_segment_masks_split_queries_by_segment_groups():
  # The xla path computes segment masks per query group (each against the keys it can see): the
  # groups of VAR's training mask, and outputs and gradients equal to the one dense pass (against
  # the per-query definition: test_xla_matches_naive, whose segment specs take this path too).
  attn = importlib.import_module("arvision.ops.attention")
  groups = attn._query_groups(masks.scale_causal(VAR_LENGTHS), 680, 680, 0)
  # Scales of >= 680/8 tokens alone (10x10, 13x13, 16x16) and unmasked; the rest share a masked one.
  assert [(g[:4], g[4] is None) for g in groups] == [
    ((0, 155, 0, 155), False),
    ((155, 255, 0, 255), True),
    ((255, 424, 0, 424), True),
    ((424, 680, 0, 680), True),
  ]
  diag = attn._query_groups(masks.block_diagonal(VAR_LENGTHS), 680, 680, 0)
  assert [g[:4] for g in diag][1:] == [
    (155, 255, 155, 255),
    (255, 424, 255, 424),
    (424, 680, 424, 680),
  ]
  # One segment's rows (cached decoding of a scale), or a single group: the dense pass.
  assert attn._query_groups(masks.scale_causal(VAR_LENGTHS), 100, 680, 424) is None
  assert attn._query_groups(masks.causal(), 30, 30, 0) is None
  for lengths, kind in (
    ((1, 4, 9, 16, 36, 64), "scale_causal"),
    (RANDOM_LENGTHS, "block_diagonal"),
  ):
    spec = _make((kind, lengths))
    n = sum(lengths)
    assert attn._query_groups(spec, n, n, 0) is not None
    q, k, v = _qkv(1, n, n, 2, 1, 8, seed=n)
    w = jax.random.normal(jax.random.key(1), q.shape)

    for a, b in zip(
      jax.jit(jax.value_and_grad(_weighted_loss(spec, w, True), (0, 1, 2)))(q, k, v),
      jax.jit(jax.value_and_grad(_weighted_loss(spec, w, False), (0, 1, 2)))(q, k, v),
      strict=True,
    ):
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-5, err_msg=kind)

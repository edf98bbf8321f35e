"""Mixed precision (`config.model.dtype`), rematerialisation (`config.remat`) and gradient
accumulation (`config.optim.accum_steps`) on the smoke models of every family.

Tolerances. bfloat16 keeps 8 significand bits: one rounding is a relative error of at most 2^-9
(~0.2%). A smoke forward rounds the residual stream and every matmul output a few dozen times;
errors of random sign add like a random walk, so a scalar loss (a mean over many tokens, computed in
float32) lands well within 2% of the float32 loss. Gradients are compared by direction (cosine),
which a change of dtype must not turn (a VQ tokenizer's by norm: see the test). Accumulation and remat change no dtype: their losses and
gradients equal the plain float32 ones up to float32 summation order (1e-6 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision import errors, families, precision, train

GENERATORS = ("var", "raster", "mar")
BF16_LOSS_RTOL = 2e-2
GRAD_COSINE_MIN = 0.98
GRAD_NORM_RTOL = 0.1


def _family(smoke, configs, name: str, **fields):
  """The smoke family `name` rebuilt with config `fields`, on the shared smoke tokenizer."""
  base = smoke(name)
  return families.build(configs.smoke(name, **fields), tokenizer=base.tokenizer)


def _loss_and_grads(family, params, frozen, batch):
  def loss(p):
    return family.loss({**p, **frozen}, batch, jax.random.key(3), True)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize(
  "name",
  # MAR and the tokenizer compile the longest: slow, to keep the default suite's time.
  [
    "var",
    pytest.param("raster", marks=pytest.mark.slow),
    pytest.param("mar", marks=pytest.mark.slow),
  ]
  + [pytest.param("tokenizer", marks=pytest.mark.slow)],
)
def test_bf16_loss_is_close_to_fp32_and_finite(name, smoke, configs):
  base = smoke(name)
  bf16 = _family(smoke, configs, name, **{"model.dtype": "bfloat16"})
  batch = base.batch(4)
  l32, g32 = _loss_and_grads(base.family, base.trainable(), base.frozen(), batch)
  l16, g16 = _loss_and_grads(bf16, base.trainable(), base.frozen(), batch)
  assert np.isfinite(float(l16)) and np.all(np.isfinite(_flat(g16)))
  assert abs(float(l16) - float(l32)) <= BF16_LOSS_RTOL * abs(float(l32)), (l16, l32)
  # float32 params give float32 grads (the cast to bf16 happens inside the forward).
  assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
  a, b = _flat(g32), _flat(g16)
  if base.family.kind == "tokenizer":
    # Vector quantisation picks the nearest code: a bf16-rounded feature near a tie takes another
    # code, whose codebook row then gets the gradient instead; the direction is not comparable,
    # the size is.
    assert abs(np.linalg.norm(b) / np.linalg.norm(a) - 1) < GRAD_NORM_RTOL
  else:
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > GRAD_COSINE_MIN
  # The knob is really used: the bf16 forward has bf16 matmuls, the fp32 one none.
  hlo = lambda fam: (
    jax.jit(lambda p: fam.loss({**p, **base.frozen()}, batch, jax.random.key(3), True)[0])
    .lower(base.trainable())
    .as_text()
  )
  assert "bf16" in hlo(bf16) and "bf16" not in hlo(base.family)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_bf16_other_tokenizers(kind, configs):
  """The msvq tokenizer is the `tokenizer` smoke above; VQ and KL run the same way."""
  fams = [
    families.build(configs.smoke("tokenizer", **{"model.type": kind, "model.dtype": d}))
    for d in ("float32", "bfloat16")
  ]
  params = jax.jit(fams[0].init, static_argnums=1)(jax.random.key(1), None)
  batch = {
    "image": np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32),
    "label": np.zeros((4,), np.int32),
  }
  (l32, _), (l16, g16) = (_loss_and_grads(f, params, {}, batch) for f in fams)
  assert np.all(np.isfinite(_flat(g16)))
  assert abs(float(l16) - float(l32)) <= BF16_LOSS_RTOL * abs(float(l32)), (l16, l32)


def test_train_step_keeps_params_and_optimizer_state_float32(smoke, configs):
  """The loop's step in bf16 (with 2 microbatches): float32 state, a finite loss."""
  base = smoke("var")
  config = configs.smoke("var", **{"model.dtype": "bfloat16", "optim.accum_steps": 2})
  family = families.build(config, tokenizer=base.tokenizer)
  batch = base.batch(int(config.data.batch_size))
  setup = train.build(config, family, base.frozen(), example=batch)
  state, metrics = setup.step(setup.init(setup.init_rng), batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  trained = {k: v for k, v in state.items() if k != "frozen"}
  floats = [x.dtype for x in jax.tree.leaves(trained) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert set(floats) == {jnp.dtype(jnp.float32)}


def test_bad_values_raise_user_errors(configs):
  cases = [
    ({"model.dtype": "float16"}, "config.model.dtype='float16'"),
    ({"remat": "some"}, "config.remat='some'"),
    ({"optim.accum_steps": 3}, "does not divide config.data.batch_size"),
    ({"optim.accum_steps": 0}, "config.optim.accum_steps=0"),
  ]
  for fields, message in cases:
    with pytest.raises(errors.UserError, match=message.replace("(", r"\(")):
      precision.validate(configs.smoke("var", **fields))
  with pytest.raises(errors.UserError, match="bfloat16"):
    families.build(configs.smoke("tokenizer", **{"model.dtype": "fp8"}))


def test_accumulation_equals_one_big_batch(smoke, configs):
  """Loss and gradients of 4 microbatches of 2 = those of the batch of 8 (deterministic loss)."""
  base = smoke("var")
  family = _family(smoke, configs, "var", **{"model.cond_drop_rate": 0.0})
  params, frozen = base.trainable(), base.frozen()
  batch = base.batch(8)

  def grad_fn(p, b, rng):
    return jax.value_and_grad(lambda q: family.loss({**q, **frozen}, b, rng, True), has_aux=True)(p)

  rng = jax.random.key(0)
  (loss, metrics), grads = jax.jit(grad_fn)(params, batch, rng)
  (loss4, metrics4), grads4 = jax.jit(lambda p, b: train._accumulate(grad_fn, p, b, rng, 4))(
    params, batch
  )
  np.testing.assert_allclose(float(loss4), float(loss), rtol=1e-6)
  np.testing.assert_allclose(float(metrics4["acc"]), float(metrics["acc"]), rtol=1e-6)
  np.testing.assert_allclose(_flat(grads4), _flat(grads), rtol=1e-5, atol=1e-7)


# var only: XLA:CPU's buffer assignment gives raster/mar at depth 4 no lower temp memory with
# remat (measured 2026-12-01: one of them higher), so the claim is checked where it holds on CPU;
# on TPU `arvision compile` reports the real saving.
@pytest.mark.parametrize("name", ["var"])
def test_remat_lowers_memory_not_the_loss(name, smoke, configs):
  base = smoke(name)
  batch = base.batch(8)
  out, temp = {}, {}
  # Depth 4, not the smoke depth 2: at depth 2 XLA:CPU's buffer reuse already keeps the live
  # activations of one block, so recomputing them saves nothing measurable there.
  params = None
  for mode in precision.REMATS:
    depth = {"var": "model.depth", "raster": "model.n_layer", "mar": "model.encoder_depth"}[name]
    family = _family(smoke, configs, name, remat=mode, **{depth: 4})
    if params is None:  # the same weights for every mode (remat adds no parameters)
      params = jax.jit(family.init)(jax.random.key(0))
      trainable = {k: v for k, v in params.items() if k not in family.frozen_keys}

    def loss(p, family=family):
      return family.loss({**p, **base.frozen()}, batch, jax.random.key(3), True)[0]

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(trainable).compile()
    temp[mode] = compiled.memory_analysis().temp_size_in_bytes
    out[mode] = compiled(trainable)
  for mode in ("block", "full"):
    np.testing.assert_allclose(float(out[mode][0]), float(out["none"][0]), rtol=1e-6)
    np.testing.assert_allclose(_flat(out[mode][1]), _flat(out["none"][1]), rtol=1e-5, atol=1e-7)
  assert temp["full"] < temp["none"], temp

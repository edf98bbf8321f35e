"""VAR training gives the same loss and gradients with the dense XLA path and the Pallas kernel."""

import jax
import numpy as np


def test_var_loss_and_grads_match_between_xla_and_pallas(var_kit):
  fam_x, tok = var_kit.make_family(attn_impl="xla")
  fam_p, _ = var_kit.make_family(tok=tok, attn_impl="pallas")  # Pallas interpret mode on CPU
  params = var_kit.make_params(fam_x, tok)
  batch = {"image": var_kit.random_images(0, 2, tok), "label": np.array([1, 3], np.int32)}

  def loss_and_grad(fam):
    def f(p):
      return fam.loss({**p, "tokenizer": params["tokenizer"]}, batch, jax.random.key(0), False)[0]

    trainable = {k: v for k, v in params.items() if k != "tokenizer"}
    return jax.jit(jax.value_and_grad(f))(trainable)

  (lx, gx), (lp, gp) = loss_and_grad(fam_x), loss_and_grad(fam_p)
  np.testing.assert_allclose(float(lp), float(lx), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), gp, gx)

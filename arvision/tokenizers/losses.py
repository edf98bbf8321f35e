"""Tokenizer losses: L1/L2 reconstruction, an optional PatchGAN with hinge loss, a perceptual slot.

One optimizer for {"ae", "disc"}: the GAN terms are written so that a single gradient of the summed
loss w.r.t. all params gives each network exactly its own objective (see `gan_losses`), so the loop
needs no second optimizer or alternating steps.

Perceptual loss: LPIPS needs pretrained VGG weights that cannot be fetched offline, so arvision
ships none. A user can pass `perceptual_fn(x, y) -> scalar` (images in [-1, 1]) to
`arvision.tokenizers.family.build`; `loss.perceptual_weight > 0` without one is an error.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from arvision.tokenizers.autoencoder import num_groups, torch_conv_init

PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]


def reconstruction_loss(
  recon: jax.Array, target: jax.Array, l1_weight: float = 1.0, l2_weight: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """l1_weight * mean|recon - target| + l2_weight * mean (recon - target)^2."""
  diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(diff))
  l2 = jnp.mean(jnp.square(diff))
  return l1_weight * l1 + l2_weight * l2, dict(l1=l1, l2=l2)


class NLayerDiscriminator(nn.Module):
  """A small PatchGAN (pix2pix `NLayerDiscriminator` layout): patch logits [B, h, w, 1].

  conv4x4/2 + LeakyReLU(0.2), then `n_layers - 1` more conv4x4/2 and one conv4x4/1 with
  doubling width (capped at 8x), then a 4x4/1 conv to one channel. GroupNorm replaces BatchNorm so
  the discriminator is a pure function (no batch statistics to thread through the loop).
  """

  ndf: int = 64
  n_layers: int = 3

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    def conv(c, stride, name):
      return nn.Conv(
        c,
        (4, 4),
        (stride, stride),
        padding=((1, 1), (1, 1)),
        kernel_init=torch_conv_init,
        name=name,
      )

    h = nn.leaky_relu(conv(self.ndf, 2, "conv_0")(x_BxHxWxC), 0.2)
    mult = 1
    for n in range(1, self.n_layers + 1):
      mult = min(2**n, 8)
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * mult, stride, f"conv_{n}")(h)
      h = nn.GroupNorm(num_groups=num_groups(self.ndf * mult), name=f"norm_{n}")(h)
      h = nn.leaky_relu(h, 0.2)
    return conv(1, 1, "conv_out")(h)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def gan_losses(
  disc: nn.Module,
  disc_params,
  real: jax.Array,
  fake: jax.Array,
  step: jax.Array,
  disc_start: int,
  gan_weight: float,
  disc_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Generator + discriminator hinge terms, ready to be added to the autoencoder loss.

  Both terms live in one scalar for one optimizer over {"ae", "disc"}:
  - the generator term -mean D(fake) sees the discriminator through stop_gradient(disc_params), so
    its gradient reaches only the autoencoder (through `fake`);
  - the discriminator term sees stop_gradient(fake) (and the real images, which carry no params),
    so its gradient reaches only `disc_params`.
  Hence d(total)/d(ae) = d(rec + quant + gan_weight * g)/d(ae) and d(total)/d(disc) =
  d(disc_weight * d_loss)/d(disc): the two players' usual updates, with one Adam state.
  Both terms are gated by `step >= disc_start` (the discriminator does not train before either).
  """
  on = (jnp.asarray(step) >= disc_start).astype(jnp.float32)
  logits_fake_g = disc.apply({"params": jax.lax.stop_gradient(disc_params)}, fake)
  g_loss = -jnp.mean(logits_fake_g)
  logits_real = disc.apply({"params": disc_params}, jax.lax.stop_gradient(real))
  logits_fake_d = disc.apply({"params": disc_params}, jax.lax.stop_gradient(fake))
  d_loss = hinge_d_loss(logits_real, logits_fake_d)
  total = on * (gan_weight * g_loss + disc_weight * d_loss)
  metrics = dict(
    g_loss=g_loss,
    d_loss=d_loss,
    logits_real=jnp.mean(logits_real),
    logits_fake=jnp.mean(logits_fake_d),
    gan_on=on,
  )
  return total, metrics


def perceptual_loss(
  perceptual_fn: PerceptualFn | None, weight: float, recon: jax.Array, target: jax.Array
) -> jax.Array | None:
  """weight * perceptual_fn(recon, target), or None when the weight is 0.

  Raises:
    ValueError: if `weight > 0` but no network was supplied.
  """
  if weight <= 0:
    return None
  if perceptual_fn is None:
    raise ValueError(
      f"loss.perceptual_weight={weight} needs a perceptual network, but none was given: pass "
      "perceptual_fn=(x, y) -> scalar to arvision.tokenizers.family.build (LPIPS weights are not "
      "bundled), or set loss.perceptual_weight=0"
    )
  return weight * perceptual_fn(recon, target)

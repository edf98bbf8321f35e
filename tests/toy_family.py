"""A tiny classifier family for loop tests: fast to compile; can be told to produce a NaN loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from arvision import config_util
from arvision.family import Family
from arvision.parallel.logical import param_init


def _dense(features, names, name):
  return nn.Dense(
    features,
    kernel_init=param_init(nn.linear.default_kernel_init, names),
    bias_init=param_init(nn.initializers.zeros, names[1:]),
    name=name,
  )


class _Net(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    h = _dense(16, ("embed", "mlp"), "hidden")(x.reshape(x.shape[0], -1))
    return _dense(self.num_classes, ("mlp", "classes"), "out")(jax.nn.relu(h)), h


class ToyFamily(Family):
  kind = "classifier"

  def __init__(self, config):
    super().__init__(config)
    self.net = _Net(config.data.num_classes)

  def init_annotated(self, rng, batch):
    return self.net.init(rng, batch["image"])["params"]

  def features(self, params, images):
    logits, h = self.net.apply({"params": params}, images)
    return h, logits

  def loss(self, params, batch, rng, train):
    logits, _ = self.net.apply({"params": params}, batch["image"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    if self.config.model.nan_at_step >= 0 and "step" in batch:  # poison the loss on purpose
      ce = jnp.where(batch["step"] >= self.config.model.nan_at_step, jnp.nan, ce)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return ce, {"accuracy": acc}


def build(config, tokenizer=None):
  return ToyFamily(config)


def get_config(arg=None):
  c = config_util.base_config("toy_family")
  c.model.nan_at_step = -1
  c.data.source = "synthetic"
  c.data.image_size, c.data.channels, c.data.num_classes = 8, 1, 4
  c.data.batch_size, c.data.eval_batch_size = 8, 16
  c.optim.lr, c.optim.schedule = 1e-2, "constant"
  c.total_steps, c.log_every, c.checkpoint_every = 6, 1, 2
  c.eval.num_batches = 1
  return c

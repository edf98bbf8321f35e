"""A small CNN classifier family: the feature extractor behind the offline domain metrics.

Inception weights cannot be had offline, so the domain metrics (`arvision.evaluation.domain`) use
the penultimate features of this classifier, trained on the same preprocessed images as the
generators (NHWC float32 in [-1, 1], e.g. 32x32x1 Fashion-MNIST). It is scored by
`arvision.evaluation.classifier`; the shipped trained weights are listed in
`arvision.evaluation.domain_classifiers`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from arvision.family import Family
from arvision.parallel.logical import constrain, param_init

_CONV = ("conv_h", "conv_w", "conv_in", "conv_out")


class CNN(nn.Module):
  """Conv stages (each: `convs_per_stage` 3x3 convs + ReLU, then 2x2 max-pool), dense, dense.

  Attributes:
    widths: channels of each stage.
    convs_per_stage: 3x3 convs per stage.
    features: width of the penultimate dense layer (the feature space of the domain metrics).
    num_classes: logits.
    dropout: rate before the penultimate and the last dense layer (train only).
  """

  widths: Sequence[int] = (32, 64)
  convs_per_stage: int = 2
  features: int = 256
  num_classes: int = 10
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool = False):
    x = x_BxHxWxC
    for s, width in enumerate(self.widths):
      for i in range(self.convs_per_stage):
        x = nn.Conv(
          width,
          (3, 3),
          padding="SAME",
          kernel_init=param_init(nn.linear.default_kernel_init, _CONV),
          bias_init=param_init(nn.initializers.zeros, ("conv_out",)),
          name=f"conv{s}_{i}",
        )(x)
        x = constrain(nn.relu(x), ("batch", None, None, "conv_out"))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    feats_BxD = nn.Dense(
      self.features,
      kernel_init=param_init(nn.linear.default_kernel_init, ("embed", "mlp")),
      bias_init=param_init(nn.initializers.zeros, ("mlp",)),
      name="penultimate",
    )(x)
    feats_BxD = nn.relu(feats_BxD)
    h = nn.Dropout(self.dropout, deterministic=not train)(feats_BxD)
    logits_BxK = nn.Dense(
      self.num_classes,
      kernel_init=param_init(nn.linear.default_kernel_init, ("mlp", "classes")),
      bias_init=param_init(nn.initializers.zeros, ("classes",)),
      name="head",
    )(h)
    return feats_BxD, logits_BxK


class Classifier(Family):
  """`kind="classifier"`: cross-entropy training, `features()` for the domain metrics."""

  kind = "classifier"

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    if m.convs_per_stage < 1:
      raise ValueError(f"model.convs_per_stage={m.convs_per_stage!r}; accepted: an int >= 1")
    if not 0.0 <= m.dropout < 1.0:
      raise ValueError(f"model.dropout={m.dropout!r}; accepted: a float in [0, 1)")
    if not 0.0 <= m.label_smoothing < 1.0:
      raise ValueError(f"model.label_smoothing={m.label_smoothing!r}; accepted: a float in [0, 1)")
    size, ch = config.data.image_size, config.data.channels
    down = 2 ** len(m.widths)
    if size % down:
      raise ValueError(
        f"data.image_size={size} must be divisible by 2**len(model.widths)={down} "
        f"(one 2x2 pool per stage of model.widths={tuple(m.widths)})"
      )
    self.image_shape = (size, size, ch)
    self.num_classes = config.data.num_classes
    self.feature_dim = m.features
    self.module = CNN(
      widths=tuple(m.widths),
      convs_per_stage=m.convs_per_stage,
      features=m.features,
      num_classes=self.num_classes,
      dropout=m.dropout,
    )
    self.label_smoothing = m.label_smoothing

  def _check_images(self, images):
    shape = self.image_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
      raise ValueError(
        f"images have shape {tuple(images.shape)}; accepted: [B, {', '.join(map(str, shape))}]"
        " float32 in [-1, 1] (data.image_size, data.channels)"
      )

  def init_annotated(self, rng, batch):
    images = batch["image"]
    self._check_images(images)
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    return self.module.init({"params": rng}, x, train=False)["params"]

  def apply(self, params, images, rng=None, train: bool = False):
    """Returns `(features [B, D], logits [B, K])`; `rng` drives dropout when `train`."""
    rngs = {"dropout": rng} if train else {}
    return self.module.apply({"params": params}, images.astype(jnp.float32), train=train, rngs=rngs)

  def loss(self, params, batch, rng, train: bool):
    images, labels = batch["image"], batch["label"].astype(jnp.int32)
    self._check_images(images)
    _, logits = self.apply(params, images, rng, train)
    targets = jax.nn.one_hot(labels, self.num_classes)
    if self.label_smoothing:
      targets = optax.smooth_labels(targets, self.label_smoothing)
    ce = optax.softmax_cross_entropy(logits, targets).mean()
    accuracy = (jnp.argmax(logits, -1) == labels).mean()
    return ce, {"ce": ce, "accuracy": accuracy}

  @functools.partial(jax.jit, static_argnums=0)
  def _features(self, params, images):
    return self.apply(params, images, train=False)

  def features(self, params, images):
    """Penultimate features `[B, D]` and logits `[B, K]` of images (NHWC float in [-1, 1])."""
    self._check_images(images)
    return self._features(params, images)


def build(config, tokenizer=None) -> Classifier:
  if tokenizer is not None:
    raise ValueError("the classifier family takes no tokenizer (config.family='classifier')")
  return Classifier(config)

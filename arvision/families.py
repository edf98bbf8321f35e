"""Family registry: `config.family` names a module that exposes `build(config, tokenizer=None)`."""

from __future__ import annotations

import importlib

from arvision.family import Family

FAMILIES = {
  "tokenizer": "arvision.tokenizers.family",
  "classifier": "arvision.evaluation.classifier",
  "var": "arvision.models.var",
}


def build(config, tokenizer: Family | None = None) -> Family:
  """Builds the family that `config.family` names, handing it its (frozen) tokenizer family."""
  name = config.family
  if name not in FAMILIES:
    raise ValueError(f"config.family={name!r} is not a known family; accepted: {sorted(FAMILIES)}")
  module = importlib.import_module(FAMILIES[name])
  return module.build(config, tokenizer=tokenizer)


def needs_tokenizer(config) -> bool:
  """Whether the family named by `config` works in a tokenizer's latent space."""
  return "tokenizer" in config and config.family != "tokenizer"

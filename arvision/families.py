"""Family registry: `config.family` names a module that exposes `build(config, tokenizer=None)`."""

from __future__ import annotations

import importlib

from arvision import errors
from arvision.family import Family

FAMILIES = {
  "tokenizer": "arvision.tokenizers.family",
  "classifier": "arvision.models.classifier",
  "var": "arvision.models.var",
  "flexvar": "arvision.models.flexvar",
  "mar": "arvision.models.mar",
  "raster": "arvision.models.raster",
  "hmar": "arvision.models.hmar",
  "par": "arvision.models.par",
  "randar": "arvision.models.randar",
  "nar": "arvision.models.nar",
  "flowar": "arvision.models.flowar",
  "xar": "arvision.models.xar",
  "arflow": "arvision.models.arflow",
  "mvar": "arvision.models.mvar",
  "infinity": "arvision.models.infinity",
}


def build(config, tokenizer: Family | None = None) -> Family:
  """Builds the family that `config.family` names, handing it its (frozen) tokenizer family.

  `config.family` is a registered name or the dotted path of a module with `build(config, tokenizer)`
  (a family of your own, no registry edit needed).
  """
  name = config.family
  try:
    module = importlib.import_module(FAMILIES.get(name, name))
  except ModuleNotFoundError as e:
    if name in FAMILIES or e.name != name:
      raise
    raise errors.UserError(
      f"config.family={name!r} is not a known family; accepted: {sorted(FAMILIES)} "
      "or an importable module path"
    ) from None
  return module.build(config, tokenizer=tokenizer)


def needs_tokenizer(config) -> bool:
  """Whether the family named by `config` works in a tokenizer's latent space."""
  return "tokenizer" in config and config.family != "tokenizer"

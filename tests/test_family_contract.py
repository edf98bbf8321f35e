"""The contract every registered family keeps (`arvision.families.FAMILIES`, each at its
`configs/<name>.py:smoke` with random weights): init gives finite params, each with a logical axis
name (or None) per dimension and at least one name; the loss is finite and goes down over a few
steps on synthetic data; generators sample deterministically for a fixed rng (and differently for
another), and changing the traced sampling settings does not retrace the sampler; other kinds do
not sample. Per-family test files keep only what is specific to their family.

This file: the spine's families (`family_contract.CORE`); the successors (every other
registered family): tests/test_family_contract_successors.py. The checks: tests/family_contract.py.
"""

import pytest
from family_contract import CORE, check_init, check_loss, check_sampling

NAMES = CORE


@pytest.mark.parametrize("name", NAMES)
def test_init_is_finite_and_every_param_has_logical_names(name, smoke):
  check_init(name, smoke)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_and_goes_down(name, smoke):
  """Ten Adam steps on one synthetic batch with a fixed rng (a deterministic objective) take at
  least 10% off the loss (smoke configs: 12-86% at lr 3e-3)."""
  check_loss(name, smoke)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_is_deterministic_and_never_retraces(name, smoke):
  check_sampling(name, smoke)

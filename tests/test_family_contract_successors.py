"""The family contract (tests/family_contract.py) for every registered successor family: all
families but `family_contract.CORE`, so registering one adds its rows here.
"""

import pytest
from family_contract import SUCCESSORS, check_init, check_loss, check_sampling

NAMES = SUCCESSORS


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

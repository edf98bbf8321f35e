"""Mesh from config and the shardings the loop needs.

Mesh axes are ("data", "fsdp", "tensor") with Auto axis types (GSPMD propagation); `-1` in
`config.mesh` means "all remaining devices". Batches are split over ("data", "fsdp").
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# The sharding issue adds fsdp / tp / fsdp_tp / hsdp rules tables behind the same call.
STRATEGIES = ("dp",)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_config[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={dict(mesh_config)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"config.mesh={dict(mesh_config)} does not divide {num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"config.mesh={dict(mesh_config)} uses {math.prod(sizes)} devices, but {num_devices} exist"
    )
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def state_shardings(abstract_state, mesh, sharding_config):
  """A sharding for every leaf of the (abstract) train state under `sharding.strategy`."""
  strategy = sharding_config.strategy
  if strategy not in STRATEGIES:
    raise ValueError(
      f"config.sharding.strategy={strategy!r} is not available; accepted: "
      f"{STRATEGIES} (fsdp/tp/fsdp_tp/hsdp come with the sharding issue)"
    )
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def global_batch(local_batch: dict, mesh) -> dict:
  """Assembles each process's slice of the batch into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )

"""Mesh from config, batch sharding, global batch assembly and multi-process start-up.

Mesh axes are ("data", "fsdp", "tensor") with Auto axis types (GSPMD propagation); `-1` in
`config.mesh` means "all remaining devices". Batches are split over ("data", "fsdp"). How params
are split is the strategy's rules table (`arvision.parallel.logical`).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from arvision import errors

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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
  axis_types = (AxisType.Auto,) * len(AXES)
  try:
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError:
    # A mesh axis that is no product of physical axes (tensor=8 on a 16x16 v6e slice, found by
    # `arvision compile`): split a physical axis, as jax.make_mesh already does on v5e.
    from jax.experimental import mesh_utils  # noqa: PLC0415

    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, AXES, axis_types=axis_types)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment describes a multi-process job.

  Triggers: `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, or a cluster
  that fills them in), or a detected cluster (SLURM with more than one task, Open MPI, a Cloud TPU
  pod slice with several workers, Kubernetes JobSet). `ARVISION_DISTRIBUTED=0` disables it,
  `=1` forces it (all arguments from the environment). Returns whether it initialised. Must run
  before any other JAX call touches the devices.
  """
  flag = os.environ.get("ARVISION_DISTRIBUTED", "")
  if flag == "0" or _distributed_is_initialized():
    return False
  env = os.environ
  wanted = (
    flag == "1"
    or "JAX_COORDINATOR_ADDRESS" in env
    or int(env.get("SLURM_NTASKS", "1") or 1) > 1
    or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    or "JOBSET_NAME" in env
  )
  if not wanted:
    return False
  # JAX reads the coordinator address from the environment but not the process count and id
  # (a detected cluster supplies those); take them from the environment when set.
  counts = {}
  for arg, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if value := env.get(var, "").strip():
      if not value.isdigit():
        raise errors.UserError(f"{var}={value!r} must be a non-negative integer")
      counts[arg] = int(value)
  jax.distributed.initialize(**counts)
  return True


def _distributed_is_initialized() -> bool:
  try:
    return bool(jax.distributed.is_initialized())
  except AttributeError:  # older jax
    return False


def global_batch(local_batch: dict, mesh) -> dict:
  """Assembles each process's slice of the batch into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )

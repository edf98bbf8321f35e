"""Decoding orders and parallel schedules for token-by-token generators (raster AR and successors).

An **order** is int `[N]` or `[B, N]` (one per example): decoding index t holds grid position
`order[t]` (row-major grid). `raster` is the identity (LlamaGen), `random` a permutation per
example (RandAR), `regions` PAR's region interleaving: the grid is cut into `regions x regions`
blocks and the t-th token (raster within a block) of every block comes before the (t+1)-th.

A **schedule** is a static tuple of counts `(k_0, ..., k_{S-1})` summing to N: decoding step s
generates the tokens of decoding indices `[a_s, a_s + k_s)`, `a_s = k_0 + ... + k_{s-1}`.

The layout is LlamaGen's teacher forcing: slot `P + u` of the input sequence holds token u (after
P prefix slots), and inputs are fed step by step, so the tokens of one step see each other and
every earlier step: the input mask is `scale_causal((P, k_0, ..., k_{S-2}))` over the slots
(`causal` for one token per step). Token t of step s is read at the slot of token `t - k_s`
(`query_slots`): one token per step is LlamaGen's next-token prediction, `k` per step is PAR's
next-group prediction, whose query for a token is the same-region token one group back. A step's
queries are its last `k_s` known tokens, hence `k_s <= a_s + 1` (`check_schedule`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arvision.ops import masks

ORDERS = ("raster", "random", "regions")
SCHEDULES = ("one", "par", "cosine", "randar")


def region_order(grid: int, regions: int) -> np.ndarray:
  """int32 `[grid**2]`: PAR's order (block-raster index major, block minor)."""
  if regions < 1 or grid % regions:
    raise ValueError(f"model.regions={regions} must divide the token grid side {grid}")
  side = grid // regions
  pos = np.arange(grid * grid, dtype=np.int32).reshape(regions, side, regions, side)
  return pos.transpose(1, 3, 0, 2).reshape(-1)


def static_order(name: str, grid: int, regions: int = 2) -> np.ndarray | None:
  """The order shared by every example (`raster`, `regions`), or None for `random`."""
  if name not in ORDERS:
    raise ValueError(f"model.order={name!r} is unknown; accepted: {ORDERS}")
  if name == "raster":
    return np.arange(grid * grid, dtype=np.int32)
  if name == "regions":
    return region_order(grid, regions)
  return None


def random_orders(rng: jax.Array, batch: int, num_tokens: int) -> jax.Array:
  """int32 `[B, N]`: an independent uniform permutation per example."""
  return jnp.argsort(jax.random.uniform(rng, (batch, num_tokens)), axis=1).astype(jnp.int32)


def draw(order, rng, batch: int, num_tokens: int) -> jax.Array:
  """A static order as is (`[N]`), or, when it is None (`random`), `[B, N]` drawn from `rng`."""
  if order is not None:
    return jnp.asarray(order, jnp.int32)
  if rng is None:
    raise ValueError("model.order='random' needs an rng to draw the orders from")
  return random_orders(rng, batch, num_tokens)


def input_rope_rows(order, prefix: int) -> jax.Array:
  """RoPE rows of the teacher-forcing inputs: the prefix rows `0 .. P - 1`, then
  `P + order[..., :-1]` (each input token turns with its own grid position); `[N]` or `[B, N]`."""
  order = jnp.asarray(order, jnp.int32)
  pre = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), order.shape[:-1] + (prefix,))
  return jnp.concatenate([pre, prefix + order[..., :-1]], axis=-1)


def check_schedule(counts, num_tokens: int) -> tuple[int, ...]:
  """`counts` as a tuple of ints, checked: positive, summing to N, and `k_s <= a_s + 1`."""
  try:
    counts = tuple(int(k) for k in counts)
  except TypeError:
    raise ValueError(f"schedule must be a sequence of token counts, got {counts!r}") from None
  if not counts or min(counts) < 1 or sum(counts) != num_tokens:
    raise ValueError(f"schedule {counts} must be positive token counts summing to N={num_tokens}")
  start = 0
  for s, k in enumerate(counts):
    if k > start + 1:
      raise ValueError(
        f"schedule step {s} generates {k} tokens after {start}: a step is read at the slots of "
        f"its last k known tokens, so k <= {start + 1} (grow the counts at most by doubling)"
      )
    start += k
  return counts


def par_schedule(num_tokens: int, groups: int) -> tuple[int, ...]:
  """PAR: one token per step for the first `groups` tokens, then `groups` tokens per step."""
  if groups < 1 or num_tokens % groups:
    raise ValueError(f"PAR groups={groups} must divide N={num_tokens}")
  return (1,) * groups + (groups,) * (num_tokens // groups - 1)


def cosine_schedule(num_tokens: int, steps: int) -> tuple[int, ...]:
  """RandAR/MaskGIT-like counts: after step s, `N - floor(N cos(pi/2 (s+1)/steps))` tokens are
  generated. Counts are capped at `a_s + 1` (see `check_schedule`), which can add steps."""
  if steps < 1:
    raise ValueError(f"model.schedule_steps={steps} must be a positive int")
  counts, start, s = [], 0, 0
  while start < num_tokens:
    done = num_tokens - math.floor(num_tokens * math.cos(math.pi / 2 * (s + 1) / steps))
    k = min(max(done - start, 1), start + 1, num_tokens - start)
    counts.append(k)
    start, s = start + k, s + 1
  return tuple(counts)


def randar_schedule(num_tokens: int, steps: int) -> tuple[int, ...]:
  """RandAR's official counts (`calculate_num_query_tokens_for_parallel_decoding`): one token
  first; after call s, `min(int((1 - cos(pi/2 (s+2)/steps)) N + 1), N)` tokens are asked for in
  total, at least one more per call (88 calls for 256 tokens at steps=88)."""
  if steps < 1:
    raise ValueError(f"model.schedule_steps={steps} must be a positive int")
  counts, start, n, s = [], 0, 1, 0
  while start < num_tokens:
    counts.append(n)
    start, s = start + n, s + 1
    target = min(
      int((1.0 - math.cos(math.pi / 2.0 * (s + 1) / steps)) * num_tokens + 1), num_tokens
    )
    n = min(max(target - start, 1), num_tokens - start)
  return tuple(counts)


def schedule(name: str, num_tokens: int, regions: int = 2, steps: int = 0) -> tuple[int, ...]:
  """The named schedule: `one` (a token per step), `par` (regions**2 groups), `cosine`, `randar`
  (RandAR's official counts, `schedule_steps` calls)."""
  if name == "one":
    return (1,) * num_tokens
  if name == "par":
    return par_schedule(num_tokens, regions * regions)
  if name == "cosine":
    return cosine_schedule(num_tokens, steps)
  if name == "randar":
    return randar_schedule(num_tokens, steps)
  raise ValueError(f"model.schedule={name!r} is unknown; accepted: {SCHEDULES}")


def step_starts(counts: tuple[int, ...]) -> np.ndarray:
  """int32 `[S]`: `a_s`, the first decoding index of each step."""
  return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)


def query_slots(counts: tuple[int, ...], prefix: int) -> np.ndarray:
  """int32 `[N]`: the input slot whose output predicts token t, `P + t - k_{s(t)}`."""
  k_of_token = np.repeat(np.asarray(counts, np.int32), counts)
  return (prefix + np.arange(len(k_of_token)) - k_of_token).astype(np.int32)


def input_mask(counts: tuple[int, ...], prefix: int) -> masks.MaskSpec:
  """The mask over input slots: block-causal over steps (`causal` for one token per step)."""
  if all(k == 1 for k in counts) and prefix == 1:
    return masks.causal()
  return masks.scale_causal((prefix,) + tuple(counts[:-1]))

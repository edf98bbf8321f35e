"""Shared numerical ops: the attention dispatch, attention mask specs, torch-parity resizing.

`attention` is the function (`arvision.ops.attention(q, k, v, mask=masks.causal())`); import the
module's helpers with `from arvision.ops.attention import SUPPORTS, choose_impl`.
"""

from arvision.ops import masks, resize
from arvision.ops.attention import attention

__all__ = ["attention", "masks", "resize"]

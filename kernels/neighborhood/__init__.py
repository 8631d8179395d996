"""Generalized neighborhood attention (NATTEN semantics) in 1-3 spatial dims: Triton kernel and reference.

`neighborhood_attention` is the front door; `neighborhood_attention_reference` the ground truth;
`tiling` holds the window tables and tile choice shared with the simulator `diffattn.gna`.
"""

from .checks import NAParams, normalize_params
from .functional import get_plan, neighborhood_attention
from .reference import neighborhood_attention_reference, neighborhood_mask

__all__ = [
    "NAParams",
    "get_plan",
    "neighborhood_attention",
    "neighborhood_attention_reference",
    "neighborhood_mask",
    "normalize_params",
]

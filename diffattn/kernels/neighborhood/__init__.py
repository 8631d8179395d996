"""Generalized neighborhood attention (NATTEN semantics) in 1-3 spatial dims: Triton kernel, CPU path, reference.

`neighborhood_attention` is the front door (`grid_neighborhood_attention` the same on raster-ordered `[B, H, S, D]`); `neighborhood_attention_blocked` the plain-PyTorch tiled path (the
default off CUDA); `neighborhood_attention_reference` the ground truth;
`tiling` holds the window tables, the tile rule and the tile choice; `simulator` counts the kernel's work from them
(`simulate`, `propose_stride`).
"""

from .blocked import neighborhood_attention_blocked
from .checks import NAParams, normalize_params
from .functional import BACKENDS, ENV_BACKEND, default_backend, get_plan, neighborhood_attention
from .raster import grid_neighborhood_attention
from .reference import neighborhood_attention_reference, neighborhood_mask
from .simulator import GNASimulation, StrideProposal, propose_stride, simulate

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "GNASimulation",
    "StrideProposal",
    "NAParams",
    "default_backend",
    "get_plan",
    "grid_neighborhood_attention",
    "neighborhood_attention",
    "neighborhood_attention_blocked",
    "neighborhood_attention_reference",
    "neighborhood_mask",
    "normalize_params",
    "propose_stride",
    "simulate",
]

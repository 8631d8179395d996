"""Block masks and index lists from a token geometry (pure functions, cached).

- ``radial_mask``: Radial Attention's static block mask (``radial_token_mask`` is its token-level rule for small
  sizes, ``radial_token_density`` the token rule's density in closed form; ``radial.describe`` feeds the CLI).
- ``block_mask_density`` and ``draw_block_mask``: inspect any bool block mask.
"""

from . import radial
from .draw import block_mask_density, draw_block_mask
from .radial import radial_mask, radial_token_density, radial_token_mask

__all__ = [
    "block_mask_density",
    "draw_block_mask",
    "radial",
    "radial_mask",
    "radial_token_density",
    "radial_token_mask",
]

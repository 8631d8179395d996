"""Attention kernels (Triton) and their plain-PyTorch references. No Diffusers import here.

Front doors (validated in one place, backend chosen per device):
- `block_sparse_attention` (diffattn/kernels/block_sparse)
- `neighborhood_attention` (diffattn/kernels/neighborhood)
- `qk_norm_rope` (diffattn/kernels/prologue): the fused pre-attention q/k norm + RoPE + layout
"""

from .merge import merge_attention_states
from .block_sparse import block_sparse_attention
from .neighborhood import neighborhood_attention
from .prologue import qk_norm_rope

__all__ = ["merge_attention_states", "block_sparse_attention", "neighborhood_attention", "qk_norm_rope"]

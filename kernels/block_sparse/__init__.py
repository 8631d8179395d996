"""Block-sparse FlashAttention (Triton) with a plain-PyTorch reference; the kernel under Radial, Rectified
SpaAttn and any block-masked method. See `op.block_sparse_attention` for the contract and NOTES.md for speed."""

from .blocked import block_sparse_attention_blocked
from .index import BlockIndex, build_block_index, clear_cache, get_block_index
from .op import block_sparse_attention
from .reference import block_sparse_attention_reference, expand_block_mask

__all__ = [
    "BlockIndex",
    "block_sparse_attention",
    "block_sparse_attention_blocked",
    "block_sparse_attention_reference",
    "build_block_index",
    "clear_cache",
    "expand_block_mask",
    "get_block_index",
]

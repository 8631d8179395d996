"""Block-sparse FlashAttention (Triton) with a plain-PyTorch reference; the kernel under Radial, Rectified
SpaAttn and any block-masked method. See `op.block_sparse_attention` for the contract and NOTES.md for speed."""

from .blocked import block_sparse_attention_blocked
from .index import BlockIndex, build_block_index, clear_cache, get_block_index, seed_block_index
from .op import BACKENDS, ENV_BACKEND, block_sparse_attention, default_backend
from .reference import block_sparse_attention_reference, expand_block_mask

__all__ = [
    "BACKENDS",
    "BlockIndex",
    "ENV_BACKEND",
    "block_sparse_attention",
    "block_sparse_attention_blocked",
    "block_sparse_attention_reference",
    "build_block_index",
    "clear_cache",
    "default_backend",
    "expand_block_mask",
    "get_block_index",
    "seed_block_index",
]

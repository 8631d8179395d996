"""Block mask -> per-row index lists (padded CSR), built on the mask's device with no host synchronisation.

For a mask `[Bm, Hm, nq, nk]` the forward needs, for every query block, the key blocks it attends (in ascending
order), and the backward's dK/dV pass needs, for every key block, the query blocks that attend it. Both are stored
as a padded CSR: `idx [Bm, Hm, rows, cols]` int32 whose first `cnt[..., r]` entries of row r are the set columns in
ascending order (the rest is padding), and `cnt [Bm, Hm, rows]` int32. A stable sort builds it on the GPU with no
`.item()`/`nonzero` (so it is CUDA-graph capturable and the kernels loop only over the set blocks, never scan the
mask row). Ascending order matters: the partial tail block, if set, is always the last entry of a row.

Caching: building is cheap (one sort of the mask) but callers usually pass the same mask to every layer and step,
so the result is cached. The cache key is `(data_ptr, shape, stride, device)` of the mask and an entry is valid
only while the mask's in-place version counter (`tensor._version`) is unchanged; the entry holds a reference to
the mask, so its memory cannot be freed and reused by another tensor while cached. The cache is a small LRU
(`CACHE_SIZE` entries). Masks created inside a `torch.compile`d region or fresh each call simply miss and rebuild.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

CACHE_SIZE = 16


@dataclass(frozen=True)
class BlockIndex:
    """Padded-CSR index lists of one block mask (see module docstring)."""

    kv_idx: torch.Tensor  # [Bm, Hm, nq, nk] int32: key blocks of each query block, ascending, padded
    kv_cnt: torch.Tensor  # [Bm, Hm, nq] int32
    q_idx: torch.Tensor  # [Bm, Hm, nk, nq] int32: query blocks attending each key block, ascending, padded
    q_cnt: torch.Tensor  # [Bm, Hm, nk] int32


def _csr_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Set columns of every row first, ascending (stable sort of the negated mask), plus the per-row counts."""
    cnt = mask.sum(dim=-1, dtype=torch.int32)
    if mask.shape[-1] == 0:
        return torch.zeros(mask.shape, dtype=torch.int32, device=mask.device), cnt
    key = (~mask).to(torch.uint8)
    idx = torch.sort(key, dim=-1, stable=True).indices.to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def build_block_index(block_mask: torch.Tensor) -> BlockIndex:
    """Build both index lists of a bool block mask `[Bm, Hm, nq, nk]` (no cache)."""
    kv_idx, kv_cnt = _csr_rows(block_mask)
    q_idx, q_cnt = _csr_rows(block_mask.transpose(-1, -2))
    return BlockIndex(kv_idx, kv_cnt, q_idx, q_cnt)


_cache: OrderedDict[tuple, tuple[torch.Tensor, int, BlockIndex]] = OrderedDict()
_lock = threading.Lock()


def get_block_index(block_mask: torch.Tensor) -> BlockIndex:
    """Cached `build_block_index` (key and validity rule in the module docstring)."""
    key = (block_mask.data_ptr(), tuple(block_mask.shape), tuple(block_mask.stride()), str(block_mask.device))
    version = block_mask._version
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[1] == version and hit[0].data_ptr() == block_mask.data_ptr():
            _cache.move_to_end(key)
            return hit[2]
    index = build_block_index(block_mask)
    with _lock:
        _cache[key] = (block_mask, version, index)
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return index


def clear_cache() -> None:
    """Drop all cached index lists (and the masks they keep alive)."""
    with _lock:
        _cache.clear()

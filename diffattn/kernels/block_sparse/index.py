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

import torch

CACHE_SIZE = 16


class BlockIndex:
    """Padded-CSR index lists of one block mask (see module docstring).

    The forward's lists are always there; the backward's (`q_idx`, `q_cnt`) are built from the mask on first use,
    so a forward-only call sorts the mask once, not twice."""

    __slots__ = ("kv_idx", "kv_cnt", "_q", "_mask")

    def __init__(self, kv_idx: torch.Tensor, kv_cnt: torch.Tensor, q_idx: torch.Tensor | None = None,
                 q_cnt: torch.Tensor | None = None, *, mask: torch.Tensor | None = None) -> None:
        if (q_idx is None) != (q_cnt is None):
            raise ValueError("BlockIndex: give q_idx and q_cnt together")
        if q_idx is None and mask is None:
            raise ValueError("BlockIndex: without q_idx/q_cnt the mask is needed to build them")
        self.kv_idx = kv_idx  # [Bm, Hm, nq, nk] int32: key blocks of each query block, ascending, padded
        self.kv_cnt = kv_cnt  # [Bm, Hm, nq] int32
        self._q = None if q_idx is None else (q_idx, q_cnt)
        self._mask = mask

    def _backward_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._q is None:
            self._q = _csr_rows(self._mask.transpose(-1, -2))
            self._mask = None
        return self._q

    @property
    def q_idx(self) -> torch.Tensor:
        """[Bm, Hm, nk, nq] int32: query blocks attending each key block, ascending, padded."""
        return self._backward_lists()[0]

    @property
    def q_cnt(self) -> torch.Tensor:
        """[Bm, Hm, nk] int32."""
        return self._backward_lists()[1]


def _csr_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Set columns of every row first, ascending (stable sort of the negated mask), plus the per-row counts."""
    cnt = mask.sum(dim=-1, dtype=torch.int32)
    if mask.shape[-1] == 0:
        return torch.zeros(mask.shape, dtype=torch.int32, device=mask.device), cnt
    key = (~mask).to(torch.uint8)
    idx = torch.sort(key, dim=-1, stable=True).indices.to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def build_block_index(block_mask: torch.Tensor) -> BlockIndex:
    """The index lists of a bool block mask `[Bm, Hm, nq, nk]` (no cache; the backward's lists on first use)."""
    kv_idx, kv_cnt = _csr_rows(block_mask)
    return BlockIndex(kv_idx, kv_cnt, mask=block_mask)


_cache: OrderedDict[tuple, tuple[torch.Tensor, int, BlockIndex]] = OrderedDict()
_lock = threading.Lock()


def _key(block_mask: torch.Tensor) -> tuple:
    return (block_mask.data_ptr(), tuple(block_mask.shape), tuple(block_mask.stride()), str(block_mask.device))


def _store(key: tuple, block_mask: torch.Tensor, index: BlockIndex) -> None:
    with _lock:
        _cache[key] = (block_mask, block_mask._version, index)
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)


def get_block_index(block_mask: torch.Tensor) -> BlockIndex:
    """Cached `build_block_index` (key and validity rule in the module docstring)."""
    key = _key(block_mask)
    version = block_mask._version
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[1] == version and hit[0].data_ptr() == block_mask.data_ptr():
            _cache.move_to_end(key)
            return hit[2]
    index = build_block_index(block_mask)
    _store(key, block_mask, index)
    return index


def seed_block_index(block_mask: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor) -> None:
    """Cache forward lists that were built with the mask (Rectified's selection kernel writes them as it selects),
    so that the next `get_block_index(block_mask)` (the front door's) sorts nothing. They must equal what
    `build_block_index(block_mask)` gives; the same validity rule applies (an in-place change of the mask
    invalidates them)."""
    if kv_idx.shape != block_mask.shape or kv_cnt.shape != block_mask.shape[:-1]:
        raise ValueError(f"seed_block_index: kv_idx {tuple(kv_idx.shape)} / kv_cnt {tuple(kv_cnt.shape)} do not "
                         f"match the mask {tuple(block_mask.shape)}")
    if kv_idx.dtype != torch.int32 or kv_cnt.dtype != torch.int32 or kv_idx.device != block_mask.device:
        raise ValueError("seed_block_index: kv_idx and kv_cnt must be int32 on the mask's device")
    _store(_key(block_mask), block_mask, BlockIndex(kv_idx.contiguous(), kv_cnt.contiguous(), mask=block_mask))


def clear_cache() -> None:
    """Drop all cached index lists (and the masks they keep alive)."""
    with _lock:
        _cache.clear()

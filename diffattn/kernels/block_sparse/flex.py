"""torch FlexAttention on the same block lists: a peer backend, and the comparison point of the benchmarks.

The BlockMask is built from our padded CSR (`index.py`) with every kept block listed as *full* (Flex's Triton
kernel then evaluates no mask inside it) **and** a real `mask_mod` that reads the block mask. The mask_mod matters:
Flex's FLASH backend (FA4 underneath) ignores the block lists of a BlockMask that has no mask_mod and runs dense,
silently (seen in issue #18: 0.95 relative error). With it, every backend of Flex computes the same thing, and the
tests compare the *result* with the reference, not only the speed.

Extra (text) keys: a second, dense Flex call over them, merged by lse. The per-query-block epilogue is a plain
torch pass after the kernel. Differentiable through Flex's own backward (and torch ops for the merge/epilogue).
On CUDA `flex_attention` runs compiled (`torch.compile(dynamic=False)`, compiled once per shape); on CPU it runs
eagerly (a dense masked computation: for tests, not for speed).
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch

from ..merge import merge_attention_states

_cache: dict[tuple, tuple[torch.Tensor, object]] = {}
_lock = threading.Lock()
_CACHE_SIZE = 32


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor):
    if q.is_cuda:
        return _compiled()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def block_mask_for(block_mask: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor, sq: int, sk: int,
                   block_size: int):
    """A Flex `BlockMask` equal to our block mask: all kept blocks full, plus a mask_mod reading `block_mask`
    (cached per index list and lengths)."""
    from torch.nn.attention.flex_attention import BlockMask

    key = (kv_idx.data_ptr(), tuple(kv_idx.shape), sq, sk, block_size)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is kv_idx:
            return hit[1]
    bm = block_mask
    mb, mh = bm.shape[0], bm.shape[1]
    bs = block_size

    def mask_mod(b, h, q_idx, kv_idx_):
        return bm[b % mb, h % mh, q_idx // bs, kv_idx_ // bs]

    zeros = torch.zeros_like(kv_cnt)
    kw = dict(full_kv_num_blocks=kv_cnt, full_kv_indices=kv_idx, BLOCK_SIZE=bs, mask_mod=mask_mod)
    try:
        m = BlockMask.from_kv_blocks(zeros, torch.zeros_like(kv_idx), seq_lengths=(sq, sk), **kw)
    except TypeError:  # torch without seq_lengths
        m = BlockMask.from_kv_blocks(zeros, torch.zeros_like(kv_idx), **kw)
    with _lock:
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = (kv_idx, m)
    return m


@functools.cache
def _aux_request():
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch before AuxRequest: the older return_lse flag
        return None
    return AuxRequest(lse=True)


def _call(fn, q, k, v, **kw):
    aux = _aux_request()
    with warnings.catch_warnings():
        # On CPU Flex runs unfused (documented above); its warning says so on every first call.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if aux is None:
            return fn(q, k, v, return_lse=True, **kw)
        out, aux_out = fn(q, k, v, return_aux=aux, **kw)
        return out, aux_out.lse


def forward(q, k, v, block_mask, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v):
    """`(out, lse)` of block-sparse attention through FlexAttention (differentiable)."""
    sq, sk = q.shape[2], k.shape[2]
    fn = _flex(q)
    bm = block_mask_for(block_mask, kv_idx, kv_cnt, sq, sk, block_size)
    kw = {}
    if q.is_cuda and block_size < 128:  # Flex's default kernel tiles (128) must divide the sparse block
        kw["kernel_options"] = {"BLOCK_M": block_size, "BLOCK_N": block_size}
    out, lse = _call(fn, q, k, v, block_mask=bm, scale=scale, **kw)
    if extra_k is not None and extra_v is not None:
        eo, e_lse = _call(fn, q, extra_k, extra_v, scale=scale)
        out, lse = merge_attention_states(out, lse, eo, e_lse)
    return out, lse.float()


def clear_cache() -> None:
    with _lock:
        _cache.clear()

"""FlashAttention-4's CuTe-DSL block-sparse forward on our index lists (optional: `pip install 'diffattn[fa4]'`).

Same inputs and outputs as `triton_fwd.forward` (out `[B, H, Sq, D]`, natural-log lse float32 `[B, H, Sq]`), so
the registry can swap it in for the forward and keep our Triton backward (`backends.py`: backward="triton").

How our contract maps onto FA4's (read from flash_attn/cute/interface.py and block_sparsity.py, 4.0.0b40):
- Layout: FA4 takes `[B, S, H, D]`; `q.transpose(1, 2)` of our `[B, H, S, D]` is such a view with 16-byte aligned
  strides, which FA4 accepts without a copy. Its `[B, S, H, D]` output goes back as a transposed view.
- Blocks: every kept block of ours is *whole*, so all go in FA4's "full" lists (no mask_mod is evaluated) and
  the "partial" lists are empty. FA4 walks a row's list from its last entry and applies the sequence-length mask
  to the first block it processes; our lists are ascending, so that is the partial tail block whenever the row
  has it. A row with no block writes 0 and lse -inf, as ours.
- Q/KV block rule: on sm90 FA4 fits its tile to the sparse block (tile_n = KV block; tile_m divides the Q block),
  so block sizes 64 and 128 run with head dims up to 128 (`backends.py` declares it). sm100 wants 256-row Q
  blocks (q_stage 2) and is refused there.
- Extra (text) keys: a second, dense FA4 call over them, merged by lse (`merge_attention_states`): exact, and it
  costs one small attention plus an elementwise pass, instead of copying K/V to append them.
- Cached per index list: the `BlockSparseTensorsTorch` (and its zero partial counts), so a steady call builds
  nothing; no host synchronisation.
"""

from __future__ import annotations

import threading

import torch

from ..merge import merge_attention_states

_cache: dict[tuple, tuple[torch.Tensor, object]] = {}
_lock = threading.Lock()
_CACHE_SIZE = 32


def _sparse_tensors(kv_idx: torch.Tensor, kv_cnt: torch.Tensor, block_size: int):
    """FA4's block-sparse tensors for our padded CSR (all blocks full), cached per index tensor."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    key = (kv_idx.data_ptr(), tuple(kv_idx.shape), kv_cnt.data_ptr(), block_size)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is kv_idx:
            return hit[1]
    t = BlockSparseTensorsTorch(
        mask_block_cnt=torch.zeros_like(kv_cnt),
        mask_block_idx=kv_idx,
        full_block_cnt=kv_cnt,
        full_block_idx=kv_idx,
        block_size=(block_size, block_size),
    )
    with _lock:
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = (kv_idx, t)
    return t


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int,
    scale: float,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention through FA4 (see the module docstring); returns `(out, lse)`."""
    from flash_attn.cute import flash_attn_func

    sparse = _sparse_tensors(kv_idx, kv_cnt, block_size)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with torch.no_grad():
        out, lse = flash_attn_func(qt, kt, vt, softmax_scale=scale, block_sparse_tensors=sparse, return_lse=True)
        out = out.transpose(1, 2)
        if extra_k is not None and extra_v is not None:
            eo, e_lse = flash_attn_func(qt, extra_k.transpose(1, 2), extra_v.transpose(1, 2), softmax_scale=scale,
                                       return_lse=True)
            out, lse = merge_attention_states(out, lse, eo.transpose(1, 2), e_lse)
    return out, lse


def clear_cache() -> None:
    with _lock:
        _cache.clear()

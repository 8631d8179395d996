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
- Host cost: `flash_attn_func` re-derives its config, normalises the sparse tensors and builds a ~60-entry compile
  key in Python on every call. The steady path skips that: the first call of a signature (shapes, strides, dtype,
  device, scale, index list) runs FA4's own path once while recording the compiled kernel and its arguments; later
  calls of that signature call the compiled kernel directly with fresh q/k/v/out/lse. Recorded only when FA4 ran
  one kernel straight into the out/lse it returned, on q/k/v as given (no split-KV combine, no copies), so the
  replay is the same launch. `DIFFATTN_FA4_FAST=0` turns it off.
"""

from __future__ import annotations

import os
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


class _Recorder:
    """Stands in for FA4's forward compile cache during one call and records the kernel it launches."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple] = []

    def __contains__(self, key) -> bool:
        return key in self.inner

    def __setitem__(self, key, value) -> None:
        self.inner[key] = value

    def __getitem__(self, key):
        fn = self.inner[key]

        def call(*args):
            self.calls.append((fn, args))
            return fn(*args)

        return call

    def __getattr__(self, name):
        return getattr(self.inner, name)


_fast: dict[tuple, tuple] = {}


def _signature(q, k, v, scale, sparse) -> tuple:
    return (tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(v.shape), v.stride(), q.dtype, q.device,
            float(scale), id(sparse))


def _attend(q, k, v, scale, sparse):
    """FA4 forward of `[B, S, H, D]` views: (out `[B, S, H, D]`, lse `[B, H, S]`), through the recorded launch when
    this signature was seen before (module docstring)."""
    from flash_attn.cute import flash_attn_func, interface

    sig = _signature(q, k, v, scale, sparse)
    hit = _fast.get(sig)
    if hit is not None and hit[3] is sparse:  # the recorded launch holds this very index list
        fn, args, out_shape, _ = hit
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
        fn(q, k, v, out, lse, *args)
        return out, lse
    owner = interface._flash_attn_fwd
    rec = _Recorder(owner.compile_cache) if os.environ.get("DIFFATTN_FA4_FAST", "1") != "0" else None
    with _lock:
        if rec is not None:
            owner.compile_cache = rec
        try:
            out, lse = flash_attn_func(q, k, v, softmax_scale=scale, block_sparse_tensors=sparse, return_lse=True)
        finally:
            if rec is not None:
                owner.compile_cache = rec.inner
    if rec is not None and len(rec.calls) == 1:
        fn, args = rec.calls[0]
        same = [a.data_ptr() for a in args[:5] if isinstance(a, torch.Tensor)] == [
            t.data_ptr() for t in (q, k, v, out, lse)] and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        if same and not torch.cuda.is_current_stream_capturing():
            if len(_fast) >= 4 * _CACHE_SIZE:
                _fast.pop(next(iter(_fast)))
            _fast[sig] = (fn, tuple(args[5:]), tuple(out.shape), sparse)
    return out, lse


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
    sparse = _sparse_tensors(kv_idx, kv_cnt, block_size)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with torch.no_grad():
        out, lse = _attend(qt, kt, vt, scale, sparse)
        out = out.transpose(1, 2)
        if extra_k is not None and extra_v is not None:
            eo, e_lse = _attend(qt, extra_k.transpose(1, 2), extra_v.transpose(1, 2), scale, None)
            out, lse = merge_attention_states(out, lse, eo.transpose(1, 2), e_lse)
    return out, lse


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _fast.clear()

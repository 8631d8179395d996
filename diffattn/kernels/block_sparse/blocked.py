"""Block-sparse attention in plain PyTorch, one query block at a time: the CPU fast path.

The reference (reference.py) materialises the whole `[B, H, Sq, Sk]` score matrix and its token mask: the ground
truth, but at a few thousand tokens on a CPU it is several times slower than dense SDPA (the demo video model: ~20 s a
Radial step against ~2.4 s dense). Here each query block gathers only the key blocks of its mask row (once per
distinct row, shared by all batch elements and heads the mask broadcasts over) and attends them with plain matmuls,
so the work is proportional to the kept blocks and the temporaries stay one block tall. Same math as the reference
(float32 accumulation, lse in natural log, a query with no key gets 0 and -inf), differentiable by autograd.
"""

from __future__ import annotations

import math

import torch

from .index import get_block_index


def _token_index(cols: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Token positions of key blocks `cols` (ascending), the partial tail block clipped at `length`."""
    idx = (cols[:, None] * block_size + torch.arange(block_size, device=cols.device)).reshape(-1)
    return idx[idx < length]


def block_sparse_attention_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    need_lse: bool = True,
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return `(out, lse)` like `block_sparse_attention_reference` (same arguments and meaning, the per-query-block
    epilogue `out_scale * attention + out_bias` included). With `need_lse=False` each block runs PyTorch's fused
    SDPA (faster on CPU) and lse is None."""
    import torch.nn.functional as F

    D = q.shape[-1]
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    has_extra = extra_k is not None and extra_v is not None and extra_k.shape[2] > 0
    ek = extra_k.to(cdt) if has_extra else None
    ev = extra_v.to(cdt) if has_extra else None
    Bm, Hm, nq, _ = block_mask.shape
    # The key blocks of each mask row: the Triton kernels' cached index lists (built once per mask), read on the host.
    index = get_block_index(block_mask)
    kv_idx, kv_cnt = index.kv_idx.cpu(), index.kv_cnt.cpu()
    out_slices: list[torch.Tensor] = []  # per mask slice (batch-major, heads fastest)
    lse_slices: list[torch.Tensor] = []
    for bm in range(Bm):
        bsel = slice(None) if Bm == 1 else slice(bm, bm + 1)
        for hm in range(Hm):
            hsel = slice(None) if Hm == 1 else slice(hm, hm + 1)
            qs, ks, vs = qf[bsel, hsel], kf[bsel, hsel], vf[bsel, hsel]
            eks = ek[bsel, hsel] if has_extra else None
            evs = ev[bsel, hsel] if has_extra else None
            gathered: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None] = {}
            outs, lses = [], []
            for i in range(nq):
                q_blk = qs[:, :, i * block_size:(i + 1) * block_size]
                cols = kv_idx[bm, hm, i, : int(kv_cnt[bm, hm, i])].long()
                key = tuple(cols.tolist())
                if key not in gathered:  # rows repeat (bands, radial diagonals): gather each distinct one once
                    idx = _token_index(cols, block_size, Sk).to(q.device)
                    kk, vv = ks.index_select(2, idx), vs.index_select(2, idx)
                    if has_extra:
                        kk, vv = torch.cat([kk, eks], dim=2), torch.cat([vv, evs], dim=2)
                    gathered[key] = (kk, vv) if kk.shape[2] > 0 else None
                kv = gathered[key]
                if kv is None:  # no key at all: output 0, lse -inf, zero gradients
                    outs.append(q_blk.new_zeros(q_blk.shape))
                    lses.append(q_blk.new_full(q_blk.shape[:-1], float("-inf")))
                    continue
                if not need_lse:
                    outs.append(F.scaled_dot_product_attention(q_blk, kv[0], kv[1], scale=scale))
                    continue
                s = torch.matmul(q_blk, kv[0].transpose(-1, -2)) * scale
                lse = torch.logsumexp(s, dim=-1)
                outs.append(torch.matmul(torch.exp(s - lse[..., None]), kv[1]))
                lses.append(lse)
            out_slices.append(torch.cat(outs, dim=2))
            if need_lse:
                lse_slices.append(torch.cat(lses, dim=2))

    def assemble(slices: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.cat(slices[b * Hm:(b + 1) * Hm], dim=1) for b in range(Bm)], dim=0)

    out = assemble(out_slices)
    if out_scale is not None and out_bias is not None:  # one scale and bias row per query block, as the kernel's epilogue
        B, H, Sq, D = q.shape
        pad = nq * block_size - Sq
        o = F.pad(out, (0, 0, 0, pad)).view(B, H, nq, block_size, D)
        o = o * out_scale.to(cdt)[..., None, None] + out_bias.to(cdt)[..., None, :]
        out = o.reshape(B, H, nq * block_size, D)[:, :, :Sq]
    out = out.to(q.dtype)
    return out, (assemble(lse_slices).float() if need_lse else None)

"""The meaning of block-sparse attention, in plain PyTorch (masked SDPA).

This is the ground truth the Triton kernels are tested against and the backend used on CPU, so the library works
without a GPU. It materialises the `[B, H, Sq, Sk + T]` score matrix: fine for tests and small CPU shapes, not for
production video lengths.
"""

from __future__ import annotations

import math

import torch


def expand_block_mask(block_mask: torch.Tensor, block_size: int, sq: int, sk: int) -> torch.Tensor:
    """Token-level bool mask `[Bm, Hm, Sq, Sk]`: block (i, j) covers query tokens [i*bs, (i+1)*bs) and keys likewise."""
    m = block_mask.repeat_interleave(block_size, dim=-2)[..., :sq, :]
    return m.repeat_interleave(block_size, dim=-1)[..., :sk]


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(out, lse)`: out in q's dtype `[B, H, Sq, D]`, lse float32 `[B, H, Sq]` (natural log).

    With `out_scale` `[B|1, H|1, nq]` and `out_bias` `[B|1, H|1, nq, D]`, query block i's output is
    `out_scale[i] * attention + out_bias[i]` (the lse is that of the attention itself).

    Computed in float32 (float64 if q is float64). Differentiable by autograd. A query with no key at all gets
    out 0 and lse -inf, and zero gradients (no NaN anywhere).
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    mask = expand_block_mask(block_mask, block_size, Sq, Sk).expand(B, H, Sq, Sk)
    if extra_k is not None and extra_v is not None and extra_k.shape[2] > 0:
        T = extra_k.shape[2]
        kf = torch.cat([kf, extra_k.to(cdt)], dim=2)
        vf = torch.cat([vf, extra_v.to(cdt)], dim=2)
        mask = torch.cat([mask, torch.ones(B, H, Sq, T, dtype=torch.bool, device=mask.device)], dim=-1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] > 0 else torch.full_like(s[..., :1], float("-inf"))
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m_safe) * mask
    l = p.sum(dim=-1, keepdim=True)
    has = l > 0
    out = torch.matmul(p, vf) / torch.where(has, l, torch.ones_like(l))
    if out_scale is not None and out_bias is not None:
        r = out_scale.to(cdt).repeat_interleave(block_size, dim=-1)[..., :Sq, None]
        c = out_bias.to(cdt).repeat_interleave(block_size, dim=-2)[..., :Sq, :]
        out = out * r + c
    lse = torch.where(has, torch.log(torch.where(has, l, torch.ones_like(l))) + m_safe, torch.full_like(l, float("-inf")))
    return out.to(q.dtype), lse.squeeze(-1).float()

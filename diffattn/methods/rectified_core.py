"""Rectified SpaAttn's attention function (Liu et al., arXiv 2511.19835), as pure tensor code.

For a query with kept key set S, full attention is exactly `o = rho * o_spa + sum_{m not in S} A_m v_m` with
`rho = sum_{m in S} A_m`; plain sparse attention uses rho = 1 and drops the second term. Here both are estimated per
query block from a block-pooled attention map and applied in the block-sparse kernel's epilogue:

1. block means of q, k, v over each block's *real* tokens (a short last block is averaged over its n_j tokens);
2. pooled map `P = softmax(scale * Qm Km^T + ln n_j)` (the ln n_j makes a block's pooled mass equal the mass of its
   n_j tokens); with extra (text) keys, IPAR: text keys stay token-level in the same softmax (padding masked out)
   and are always attended;
3. selection per (batch, head, query block): the highest-mass key blocks until text mass plus their mass exceeds
   `tau`, at least `k_min` blocks, plus forced (geometry) blocks; found by an exact threshold search (bisection on
   the float32 bit pattern of the threshold, 32 row reductions), no sort. Steps 1-5 run as Triton kernels on the
   GPU (`kernels.rectified_select`: pooling reads q, k, v once; one row kernel does softmax, threshold, floor,
   forced blocks, GAPR and R) when no gradient is needed, else in differentiable PyTorch (same formulas);
4. GAPR: a dropped block is "unsafe" when the first-order pooling error bound `|dq_i . km_j| + |qm_i . dk_j|`
   (dq, dk: mean absolute deviation from the block mean) reaches the pooled logit `|qm_i . km_j|`; its mass is
   folded into the sparse branch instead of being compensated;
5. `R = 1 - sum_{dropped, safe} P`, `C = sum_{dropped, safe} P_j vm_j`, and `O = R * O_spa + C` fused into the
   kernel's output store (`block_sparse_attention(..., out_scale=R, out_bias=C)`).

`rectified_attention_reference` computes the same formulas token by token in float64, with an independent
(pairwise, sort-free) selection: the ground truth of the tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..kernels import block_sparse_attention
from ..kernels.block_sparse import block_sparse_attention_reference, seed_block_index
from ..kernels.rectified_select import (
    rectified_select,
    rectified_select_torch,
    sorted_select,
    threshold_select,
    triton_select_supported,
)

__all__ = [
    "RectifiedPlan",
    "rectified_attention",
    "rectified_attention_reference",
    "rectified_plan",
    "SELECTIONS",
    "resolve_k_min",
    "sorted_select",
    "threshold_select",
]

SELECTIONS = ("auto", "triton", "threshold", "sort")

@dataclass
class RectifiedPlan:
    """What the selection decided for one call: the kernel's mask and epilogue, and diagnostics.

    block_mask: bool `[B, H, nq, nk]`, the key blocks the sparse branch attends (selection + forced blocks).
    unsafe: bool `[B, H, nq, nk]`, dropped blocks GAPR refused to compensate (all False without GAPR).
    out_scale: float32 `[B, H, nq]` (R); out_bias: float32 `[B, H, nq, D]` (C).
    probs: float32 `[B, H, nq, nk]`, the pooled map over video key blocks; text_mass: `[B, H, nq]`.
    kv_idx, kv_cnt: the block-sparse forward's index lists of `block_mask` (int32, as
    `kernels.block_sparse.build_block_index` makes them), written by the Triton selection; None from the PyTorch
    path. `rectified_attention` puts them in the front door's index cache (`seed_block_index`), so the kernel call
    does not sort the mask again.
    """

    block_mask: torch.Tensor
    unsafe: torch.Tensor
    out_scale: torch.Tensor
    out_bias: torch.Tensor
    probs: torch.Tensor
    text_mass: torch.Tensor
    kv_idx: torch.Tensor | None = None
    kv_cnt: torch.Tensor | None = None

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs the sparse branch computes (text keys not counted)."""
        return float(self.block_mask.float().mean()) if self.block_mask.numel() else 1.0


def resolve_k_min(k_min: int | float | None, nk: int) -> int:
    """`k_min` as a block count: an int is a count, a float in [0, 1] a fraction of the key blocks (upstream's
    `int((1 - sa_drop_rate) * Nb)`), None is 0; clipped to nk."""
    if k_min is None:
        return 0
    if isinstance(k_min, bool):
        raise TypeError("k_min must be an int (blocks) or a float in [0, 1] (fraction of key blocks), got a bool")
    if isinstance(k_min, float):
        if not 0.0 <= k_min <= 1.0:
            raise ValueError(f"k_min as a float is a fraction of the key blocks and must be in [0, 1], got {k_min}")
        return min(nk, int(k_min * nk))
    if isinstance(k_min, int):
        if k_min < 0:
            raise ValueError(f"k_min must be >= 0, got {k_min}")
        return min(nk, k_min)
    raise TypeError(f"k_min must be an int, a float fraction or None, got {type(k_min).__name__}")


def rectified_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    tau: float = 0.3,
    k_min: int | float | None = 0,
    gapr: bool = True,
    extra_k: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    forced_blocks: torch.Tensor | None = None,
    scale: float | None = None,
    selection: str = "auto",
) -> RectifiedPlan:
    """Pooled map, selection, GAPR and the epilogue's R and C for one call (see the module docstring).

    `selection`: "triton" (the fused kernels of `kernels.rectified_select`), "threshold" (PyTorch bisection, no
    sort), "sort" (PyTorch row sort), or "auto": Triton where it runs (CUDA, or the interpreter) and no gradient
    is needed, else the PyTorch bisection (differentiable through R and C)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    nk = math.ceil(k.shape[2] / block_size)
    T = extra_k.shape[2] if extra_k is not None else 0
    kmin = resolve_k_min(k_min, nk)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, extra_k))
    if selection == "auto":
        selection = "triton" if (not needs_grad and triton_select_supported(q, nk, T)) else "threshold"
    kw = dict(block_size=block_size, tau=tau, k_min=kmin, gapr=gapr, extra_k=extra_k, extra_mask=extra_mask,
              forced_blocks=forced_blocks, scale=scale)
    if selection == "triton":
        if q.dtype == torch.float64:
            raise ValueError("selection='triton' runs float16/bfloat16/float32 inputs; use 'threshold' for float64")
        sel = rectified_select(q, k, v, **kw)
    else:
        sel = rectified_select_torch(q, k, v, selection=selection, **kw)
    return RectifiedPlan(sel.keep, sel.unsafe, sel.out_scale, sel.out_bias, sel.probs, sel.text_mass, sel.kv_idx,
                         sel.kv_cnt)


def _check(q, k, v, block_size, tau, extra_k, extra_v, extra_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D]")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise ValueError(f"tau must be a number >= 0 (cumulative pooled mass; >= 1 keeps every block), got {tau!r}")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size!r}")
    if (extra_k is None) != (extra_v is None):
        raise ValueError("extra_k and extra_v must be given together (or both None)")
    if extra_mask is not None:
        if extra_k is None:
            raise ValueError("extra_mask needs extra_k/extra_v")
        if extra_mask.dtype != torch.bool or tuple(extra_mask.shape) != (q.shape[0], extra_k.shape[2]):
            raise ValueError(f"extra_mask must be bool [B={q.shape[0]}, T={extra_k.shape[2]}] (True = real key), "
                             f"got {extra_mask.dtype} {tuple(extra_mask.shape)}")


def rectified_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    tau: float = 0.3,
    k_min: int | float | None = 0,
    gapr: bool = True,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    forced_blocks: torch.Tensor | None = None,
    scale: float | None = None,
    rectify: bool = True,
    return_stats: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Rectified sparse attention of q over k, v (and extra keys), `[B, H, S, D]` in, `[B, H, Sq, D]` out.

    Args:
        block_size: tokens per block (pooling and the kernel's blocks); any S, the last block may be short.
        tau: cumulative pooled mass to reach per query block (text mass counts; >= 1 keeps every block: dense).
        k_min: the selection's floor, blocks (int) or a fraction of the key blocks (float), e.g. upstream's
            `1 - sa_drop_rate`.
        gapr: apply the GAPR safety test (dropped blocks failing it are not compensated).
        extra_k, extra_v: `[B, H, T, D]` keys every query attends, token-level in the pooled map (IPAR).
        extra_mask: bool `[B, T]`, True for real extra keys (text padding is False); padded keys are left out of
            both the pooled map and the attention.
        forced_blocks: bool, broadcastable to `[B, H, nq, nk]`: blocks always attended (3-D neighbours, the
            first-frame square), added after the top-p selection.
        rectify: False gives plain top-p sparse attention on the same selection (R = 1, C = 0): for comparisons.
        return_stats: also return a dict: density, mean_r, unsafe (fraction of dropped blocks GAPR refused),
            selection_ms (host wall time of the plan, synchronised on CUDA: a diagnostic, it adds a sync).
        backend: the block-sparse kernel's backend (see `block_sparse_attention`).
    """
    _check(q, k, v, block_size, tau, extra_k, extra_v, extra_mask)
    if return_stats and q.is_cuda:
        torch.cuda.synchronize(q.device)
    t0 = time.perf_counter()
    has_extra = extra_k is not None and extra_k.shape[2] > 0
    plan = rectified_plan(
        q, k, v, block_size=block_size, tau=tau, k_min=k_min, gapr=gapr, extra_k=extra_k if has_extra else None,
        extra_mask=extra_mask if has_extra else None, forced_blocks=forced_blocks, scale=scale,
    )
    if return_stats and q.is_cuda:
        torch.cuda.synchronize(q.device)
    sel_ms = (time.perf_counter() - t0) * 1e3
    affine = dict(out_scale=plan.out_scale, out_bias=plan.out_bias) if rectify else {}
    if has_extra and extra_mask is not None and not bool(extra_mask.all()):
        out = q.new_empty(q.shape)
        groups: dict[tuple[int, ...], list[int]] = {}
        host = extra_mask.cpu()
        for b in range(q.shape[0]):
            groups.setdefault(tuple(torch.nonzero(host[b]).flatten().tolist()), []).append(b)
        for valid, members in groups.items():
            rows = torch.tensor(members, device=q.device)
            idx = torch.tensor(valid, dtype=torch.long, device=q.device)
            ek, ev = extra_k[rows][:, :, idx], extra_v[rows][:, :, idx]
            aff = {n: t[rows] for n, t in affine.items()}
            mask = plan.block_mask[rows]
            if plan.kv_idx is not None:
                seed_block_index(mask, plan.kv_idx[rows], plan.kv_cnt[rows])
            out[rows] = block_sparse_attention(
                q[rows], k[rows], v[rows], mask, block_size=block_size, scale=scale,
                extra_k=ek if len(valid) else None, extra_v=ev if len(valid) else None, backend=backend, **aff,
            )
    else:
        if plan.kv_idx is not None:  # the selection wrote the lists: the front door need not sort the mask
            seed_block_index(plan.block_mask, plan.kv_idx, plan.kv_cnt)
        out = block_sparse_attention(
            q, k, v, plan.block_mask, block_size=block_size, scale=scale,
            extra_k=extra_k if has_extra else None, extra_v=extra_v if has_extra else None, backend=backend, **affine,
        )
    if not return_stats:
        return out
    dropped = (~plan.block_mask).sum().item()
    stats = dict(
        density=plan.density,
        mean_r=float(plan.out_scale.mean()) if rectify else 1.0,
        unsafe=float(plan.unsafe.sum().item() / dropped) if dropped else 0.0,
        selection_ms=sel_ms,
    )
    return out, stats


def rectified_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    tau: float = 0.3,
    k_min: int | float | None = 0,
    gapr: bool = True,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    forced_blocks: torch.Tensor | None = None,
    scale: float | None = None,
    rectify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same formulas in float64, block by block and token by token; returns `(out, block_mask)`.

    Independent of the fast path: block means by explicit slicing, the selection by pairwise comparison (mass and
    count of the entries strictly above each entry), the output as masked attention over every token plus the
    rectification per query token. For tests (memory `[B, H, Sq, Sk]` and `[B, H, nq, nk, nk]`).
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qd, kd, vd = q.double(), k.double(), v.double()
    nq, nk = math.ceil(Sq / block_size), math.ceil(Sk / block_size)

    def means(x, nb):
        return torch.stack([x[:, :, i * block_size:(i + 1) * block_size].mean(2) for i in range(nb)], dim=2)

    def mad(x, m, nb):
        return torch.stack(
            [(x[:, :, i * block_size:(i + 1) * block_size] - m[:, :, i:i + 1]).abs().mean(2) for i in range(nb)], dim=2
        )

    qm, km, vm = means(qd, nq), means(kd, nk), means(vd, nk)
    n_j = torch.tensor([min(block_size, Sk - j * block_size) for j in range(nk)], dtype=torch.float64, device=q.device)
    logit = qm @ km.transpose(-1, -2)
    s = logit * scale + n_j.log()
    T = extra_k.shape[2] if extra_k is not None else 0
    if T:
        st = qm @ extra_k.double().transpose(-1, -2) * scale
        if extra_mask is not None:
            st = st.masked_fill(~extra_mask[:, None, None, :], float("-inf"))
        s = torch.cat([s, st], dim=-1)
    p = torch.softmax(s, dim=-1)
    pv, text = p[..., :nk], p[..., nk:].sum(-1)
    kmin = resolve_k_min(k_min, nk)
    greater = pv[..., None, :] > pv[..., :, None]  # [.., j, m]: entry m strictly above entry j
    mass_above = (greater * pv[..., None, :]).sum(-1)
    count_above = greater.sum(-1)
    keep = (text[..., None] + mass_above <= tau) | (count_above < kmin)
    if forced_blocks is not None:
        keep = keep | forced_blocks.to(torch.bool)
    if gapr:
        err = (mad(qd, qm, nq) @ km.transpose(-1, -2)).abs() + (qm @ mad(kd, km, nk).transpose(-1, -2)).abs()
        unsafe = (logit.abs() <= err) & ~keep
    else:
        unsafe = torch.zeros_like(keep)
    comp = (~(keep | unsafe)).double()
    r = 1.0 - (pv * comp).sum(-1)
    c = (pv * comp) @ vm
    ek = extra_k.double() if T else None
    ev = extra_v.double() if T else None
    if T and extra_mask is not None:  # padded keys: a very negative key cannot express "absent"; drop per batch row
        outs = []
        for b in range(B):
            idx = torch.nonzero(extra_mask[b]).flatten()
            o, _ = block_sparse_attention_reference(
                qd[b:b + 1], kd[b:b + 1], vd[b:b + 1], keep[b:b + 1], block_size=block_size, scale=scale,
                extra_k=ek[b:b + 1, :, idx], extra_v=ev[b:b + 1, :, idx],
            )
            outs.append(o)
        o_spa = torch.cat(outs)
    else:
        o_spa, _ = block_sparse_attention_reference(
            qd, kd, vd, keep, block_size=block_size, scale=scale, extra_k=ek, extra_v=ev
        )
    if not rectify:
        return o_spa, keep
    rt = r.repeat_interleave(block_size, dim=-1)[..., :Sq, None]
    ct = c.repeat_interleave(block_size, dim=-2)[..., :Sq, :]
    return rt * o_spa + ct, keep

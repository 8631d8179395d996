"""SoftPAG's perturbed attention as pure tensor functions: the target maps (identity, uniform, mean_q) in the two
scopes (full, image), without ever building an N x N map (see `diffattn.methods.softpag` for the definitions)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SCOPES", "TARGETS", "soft_perturbed_attention", "target_attention"]

TARGETS = ("identity", "uniform", "mean_q")
SCOPES = ("full", "image")
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of image rows in scope="image"


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A stock SDPA mask as a 4-D additive float mask (bool: True = attend)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        mask = mask.to(dtype)
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask


def _mean_query(q: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean query `[b, h, 1, D]` over the rows marked valid (`[b, S]` bool), or over all rows."""
    if valid is None:
        return q.mean(dim=2, keepdim=True)
    w = valid.to(q.dtype)[:, None, :, None]
    return (q * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True).clamp_min(1)


def _broadcast_query_attention(qbar, k, v, mask, scale, num_queries: int) -> torch.Tensor:
    """attention(qbar, k, v) for one query row per (batch, head), broadcast to `num_queries` rows; a mask that
    differs per query row expands the query instead (still SDPA, no map)."""
    if mask is None or mask.shape[-2] == 1:
        out = F.scaled_dot_product_attention(qbar, k, v, attn_mask=mask, scale=scale)
        return out.expand(-1, -1, num_queries, -1)
    return F.scaled_dot_product_attention(qbar.expand(-1, -1, num_queries, -1), k, v, attn_mask=mask, scale=scale)


def target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    target: str,
    scope: str = "full",
    *,
    dense: torch.Tensor | None = None,
    text_len: int = 0,
    text_first: bool = False,
    attn_mask: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The target's attention output P v for q, k, v `[b, h, S, D]` (self or joint attention, Sq = Sk).

    See the module docstring for the definitions. `dense` (the stock attention output) is needed for
    `scope="image"` with text (text rows keep it) and computed when not given.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"softpag perturbs self/joint attention only (Sq == Sk); got Sq={q.shape[2]}, Sk={k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = attn_mask
    if scope == "full" or text_len == 0:
        if target == "identity":
            return v
        if target == "uniform":
            if mask is None:
                return v.mean(dim=2, keepdim=True).expand_as(v)
            return _broadcast_query_attention(torch.zeros_like(q[:, :, :1]), k, v, mask, scale, q.shape[2])
        return _broadcast_query_attention(_mean_query(q, key_padding), k, v, mask, scale, q.shape[2])

    # scope == "image" with text in the sequence
    s = q.shape[2]
    img = slice(text_len, s) if text_first else slice(0, s - text_len)
    txt = slice(0, text_len) if text_first else slice(s - text_len, s)
    if dense is None:
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = dense.clone()
    qi, ki, vi = q[:, :, img].float(), k[:, :, img].float(), v[:, :, img].float()
    kt, vt = k[:, :, txt].float(), v[:, :, txt].float()
    n_img = qi.shape[2]
    m4 = _additive_mask(mask)
    per_query = m4 is not None and m4.shape[-2] > 1
    if m4 is not None and target != "identity" and per_query:
        image_block = m4[..., img, img]
        if bool((image_block != image_block[..., :1, :]).any()):
            raise NotImplementedError(
                f"softpag: target {target!r} with scope='image' needs a mask that is the same for every query over "
                "the image keys; this call's mask differs per query (use target='identity' or scope='full')"
            )
    if target != "identity":
        qbar = torch.zeros_like(qi[:, :, :1]) if target == "uniform" else qi.mean(dim=2, keepdim=True)
        logits = qbar @ ki.transpose(-1, -2) * scale
        if m4 is not None:
            logits = logits + (m4[..., :1, img] if not per_query else m4[..., img.start : img.start + 1, img])
        shared_lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [b, h, 1, 1]
        shared_out = torch.softmax(logits, dim=-1) @ vi  # [b, h, 1, D]
    b, h = qi.shape[:2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * (kt.shape[2] + 1)))
    pieces = []
    for start in range(0, n_img, chunk):
        rows = slice(start, min(n_img, start + chunk))
        qc = qi[:, :, rows]
        text_logits = qc @ kt.transpose(-1, -2) * scale
        abs_rows = slice(img.start + rows.start, img.start + rows.stop)
        if m4 is not None:
            text_logits = text_logits + (m4[..., :, txt] if not per_query else m4[..., abs_rows, txt])
        if target == "identity":
            own = (qc * ki[:, :, rows]).sum(-1, keepdim=True) * scale
            if m4 is not None:
                if per_query:
                    own = own + torch.diagonal(m4[..., abs_rows, abs_rows], dim1=-2, dim2=-1).unsqueeze(-1)
                else:
                    own = own + m4[..., 0, abs_rows].unsqueeze(-1)
            image_out = vi[:, :, rows]
        else:
            own = shared_lse.expand(-1, -1, qc.shape[2], 1)
            image_out = shared_out
        weights = torch.softmax(torch.cat([own.expand(b, h, -1, 1), text_logits.expand(b, h, -1, -1)], dim=-1), -1)
        pieces.append(weights[..., :1] * image_out + weights[..., 1:] @ vt)
    out[:, :, img] = torch.cat(pieces, dim=2).to(out.dtype)
    return out


def soft_perturbed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: float, target: str = "identity", scope: str = "full",
    **kwargs: Any,
) -> torch.Tensor:
    """(1 - u) * attention(q, k, v) + u * target_attention(...): the SoftPAG output of all given heads and rows."""
    mask, scale = kwargs.get("attn_mask"), kwargs.get("scale")
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if u == 0:
        return dense
    tgt = target_attention(q, k, v, target, scope, dense=dense, **kwargs)
    return tgt.to(dense.dtype) if u == 1 else torch.lerp(dense, tgt.to(dense.dtype), u)

"""Plain-PyTorch reference of the pre-attention prologue: q/k RMSNorm + RoPE + the `[B, H, S, D]` layout.

This defines what the fused Triton kernel computes, op by op and rounding by rounding, as the stock Diffusers
processors do it:

- RMSNorm: `rstd = rsqrt(mean(x.float()**2) + eps)` over the whole inner dim (`norm="across"`, Wan's
  `rms_norm_across_heads`) or over each head (`norm="head"`, HunyuanVideo), then the weight. Diffusers' own
  `RMSNorm` rounds `x * rstd` to the input dtype before multiplying by a half-precision weight
  (`round_before_weight=True`); the product is rounded once more. `torch.nn.RMSNorm` (Wan) computes `x * rstd * w`
  in float32 and rounds once on CUDA (`round_before_weight=False`).
- RoPE (interleaved pairs, as Wan and HunyuanVideo use it): `out = y.float() * cos + rot(y).float() * sin` with
  `rot(y)[2i] = -y[2i+1]`, `rot(y)[2i+1] = y[2i]`, cos/sin in float32, rounded once to the input dtype. Rows
  `s >= cos.shape[0]` get no rotation (HunyuanVideo's text tokens at the end of a single-stream sequence).
"""

from __future__ import annotations

import torch

NORMS = ("across", "head", "none")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, heads: int, norm: str,
                       round_before_weight: bool) -> torch.Tensor:
    """`[B, S, H*D]` -> `[B, S, H, D]`, normalised as the stock norms do."""
    b, s, inner = x.shape
    xh = x.unflatten(-1, (heads, inner // heads))
    if norm == "none":
        return xh
    xf = xh.float()
    if norm == "across":
        var = xf.pow(2).flatten(-2).mean(-1, keepdim=True).unsqueeze(-1)
    else:
        var = xf.pow(2).mean(-1, keepdim=True)
    y = xf * torch.rsqrt(var + eps)
    if weight is None:
        return y.to(x.dtype)
    w = weight.view(heads, -1) if norm == "across" else weight.view(1, -1)
    if round_before_weight:
        return y.to(x.dtype) * w.to(x.dtype)
    return (y * w.float()).to(x.dtype)


def rope_reference(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the first `cos.shape[0]` tokens of `y` `[B, S, H, D]`; cos/sin `[S_rope, D]`."""
    n = cos.shape[0]
    head, tail = y[:, :n], y[:, n:]
    pairs = head.unflatten(-1, (-1, 2))
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    c = cos.float()[None, :, None, :]
    s = sin.float()[None, :, None, :]
    out = (head.float() * c + rot.float() * s).to(y.dtype)
    return torch.cat([out, tail], dim=1)


def qk_norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    heads: int,
    eps: float = 1e-6,
    norm: str = "across",
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    round_before_weight: bool = False,
) -> torch.Tensor:
    """`x` `[B, S, H*D]` -> normalised, rotated `[B, H, S, D]` (contiguous)."""
    y = rms_norm_reference(x, weight, eps, heads, norm, round_before_weight)
    if cos is not None:
        y = rope_reference(y, cos, sin)
    return y.transpose(1, 2).contiguous()

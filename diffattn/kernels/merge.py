"""Merging partial attention results by their log-sum-exp.

Attention over a key set split in two parts (video keys through a sparse kernel, text keys dense) is exactly
recovered from each part's output and log-sum-exp; this is how `extra_k/extra_v` and multi-pass methods combine.
"""

from __future__ import annotations

import torch


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets.

    out_*: `[B, H, S, D]`; lse_*: `[B, H, S]` (natural log, float32). A part that saw no key has lse `-inf` and
    contributes nothing; if both are empty the output is zero and the lse `-inf` (never NaN).
    Returns `(out, lse)` with `out` in `out_a`'s dtype and `lse` in float32.
    """
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse)).unsqueeze(-1)
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse)).unsqueeze(-1)
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse

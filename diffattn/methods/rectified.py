"""`rectified`: Rectified SpaAttn (Liu et al., arXiv 2511.19835). The attention function lives in
`rectified_core`; this module adds the method (per-family defaults, reordering, warm-up)."""

from __future__ import annotations

from .rectified_core import (
    RectifiedPlan,
    rectified_attention,
    rectified_attention_reference,
    rectified_plan,
    resolve_k_min,
    threshold_select,
)

__all__ = [
    "RectifiedPlan",
    "rectified_attention",
    "rectified_attention_reference",
    "rectified_plan",
    "resolve_k_min",
    "threshold_select",
]

"""One attention invocation, as adapters hand it to a method.

Adapters project q, k, v exactly as the stock processor of their model family does and describe the call in one
layout (`[B, H, S, D]`, as `F.scaled_dot_product_attention`), so methods never see family details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .context import ForwardContext, TokenGrid

Role = Literal["self", "cross", "cross_image", "joint"]


@dataclass(frozen=True)
class LayerInfo:
    """Where an attention module sits in its model.

    `index` is the position of its block among the model's attention blocks (documented per family; FLUX counts
    the double-stream blocks first, then the single-stream ones). `slot` names the module within the block
    (`attn`, `attn1`, `attn2`). `path` is the module path in the model.
    """

    index: int
    slot: str
    path: str
    role: Role
    num_layers: int


@dataclass
class AttentionCall:
    """q, k, v `[B, H, S, D]` plus everything a method may need to decide how to attend.

    Joint sequences hold `text_len` text tokens either first (`text_first=True`: FLUX, CogVideoX) or last (SD3,
    HunyuanVideo); the rest are video/image tokens in raster order (frame, row, column) of `grid`.
    `attn_mask` is exactly what the stock processor passes to SDPA (bool, True = attend, or additive), so the
    dense method reproduces stock outputs; `key_padding` is the same information as `[B, Sk]` bool when the
    family has a padding mask (HunyuanVideo).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layer: LayerInfo
    role: Role
    context: ForwardContext | None
    grid: TokenGrid | None = None
    text_len: int = 0
    text_first: bool = False
    attn_mask: torch.Tensor | None = None
    key_padding: torch.Tensor | None = None
    scale: float | None = None
    # UNet cross-attention only (None elsewhere): the module's input `[B, S, C]` after its norms, and a projector of
    # other encoder states `[N, L, D]` into this module's keys and values `[N, H, L, D]` -- for methods that attend
    # extra texts with the frozen projections (FICGen's per-phrase regional cross-attention) or add their own.
    hidden_states: torch.Tensor | None = None
    project_kv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def num_visual(self) -> int:
        """Number of video/image tokens among the queries."""
        return self.q.shape[2] - (self.text_len if self.role == "joint" else 0)

    def visual_slice(self) -> slice:
        if self.role != "joint" or self.text_len == 0:
            return slice(0, self.q.shape[2])
        if self.text_first:
            return slice(self.text_len, self.q.shape[2])
        return slice(0, self.q.shape[2] - self.text_len)

    def text_slice(self) -> slice:
        if self.role != "joint" or self.text_len == 0:
            return slice(0, 0)
        if self.text_first:
            return slice(0, self.text_len)
        return slice(self.q.shape[2] - self.text_len, self.q.shape[2])

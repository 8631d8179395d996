"""One attention invocation, as adapters hand it to a method, and the per-forward context it belongs to.

Adapters project q, k, v exactly as the stock processor of their model family does and describe the call in one
layout (`[B, H, S, D]`, as `F.scaled_dot_product_attention`), so methods never see family details.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from .geometry import TokenGrid

Role = Literal["self", "cross", "cross_image", "joint"]


@dataclass
class ForwardContext:
    """What one model forward looks like, as the attention processors see it.

    Attributes:
        family: model family name (see `diffattn.adapters.FAMILIES`).
        batch_size: batch of the forward (2 when CFG runs as one batched pass).
        grid: token grid of the video/image stream at the model's own resolution (UNets: the input level; use
            `grid_for_tokens` for the down-sampled levels).
        text_len: number of text tokens (joint sequence part or cross-attention keys), 0 if none.
        text_mask: `[B, text_len]` bool, True for real (non-padding) text tokens, or None if all are real.
        image_len: image-conditioning tokens in cross-attention (Wan I2V: 257 CLIP tokens), else 0.
        step_index: denoising step of this forward, from 0.
        num_steps: total steps of the running generation when known, else None.
        timestep: the model's timestep input as a float (largest entry for per-token timesteps).
        pass_name: `"cond"`, `"uncond"`, `"cond_uncond"` when the pipeline names its pass, else None.
        pass_index: 0 for the first forward of this step, 1 for the second (separate CFG passes), ...
        patch_size: the model's patch (frames, height, width) from latents to tokens, when the family has one.
    """

    family: str
    batch_size: int
    grid: TokenGrid | None
    text_len: int = 0
    text_mask: torch.Tensor | None = None
    image_len: int = 0
    step_index: int = 0
    num_steps: int | None = None
    timestep: float | None = None
    pass_name: str | None = None
    pass_index: int = 0
    patch_size: tuple[int, int, int] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def grid_for_tokens(self, num_tokens: int) -> TokenGrid:
        """The grid of a down-sampled level holding `num_tokens` tokens (UNets), or `grid` itself."""
        if self.grid is None:
            raise ValueError("this forward has no token grid")
        if num_tokens == self.grid.num_tokens:
            return self.grid
        t, h, w = self.grid
        for _ in range(8):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            if t * h * w == num_tokens:
                return TokenGrid(t, h, w)
        raise ValueError(f"no down-sampled level of grid {tuple(self.grid)} holds {num_tokens} tokens")


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

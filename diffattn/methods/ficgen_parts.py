"""Pieces FICGen's method and its trainable modules share: layer names, the pooled text feature, the region bias.

Pure functions (no Diffusers import); `diffattn.methods.ficgen` re-exports them.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..layout import background_map

_LAYER_NAME = re.compile(r"^(mid|up(\d+)|down(\d+))$")


# ---- layers -----------------------------------------------------------------------------------------------------
def parse_layers(spec: Any) -> tuple[frozenset[str], frozenset[int], bool]:
    """`"mid,up1"` / `"all"` / `[15, "up1"]` -> (block names, layer indices, all)."""
    accepted = "expected comma-separated block names (mid, up0..up3, down0..down3), layer indices, or 'all'"
    items = spec.split(",") if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else [spec]
    names: set[str] = set()
    indices: set[int] = set()
    every = False
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"option 'layers' of method 'ficgen': cannot use {item!r}; {accepted}")
        if isinstance(item, int):
            if item < 0:
                raise ValueError(f"option 'layers' of method 'ficgen': layer index {item} must be >= 0")
            indices.add(item)
            continue
        text = str(item).strip().lower()
        if not text:
            continue
        if text == "all":
            every = True
        elif text.isdigit():
            indices.add(int(text))
        elif _LAYER_NAME.match(text):
            names.add(text)
        else:
            raise ValueError(f"option 'layers' of method 'ficgen': cannot parse {item!r}; {accepted}")
    if not (names or indices or every):
        raise ValueError(f"option 'layers' of method 'ficgen' is empty; {accepted}")
    return frozenset(names), frozenset(indices), every


def block_name(path: str) -> str | None:
    """`"up_blocks.1.attentions.0.transformer_blocks.0.attn2"` -> `"up1"`; mid block -> `"mid"`."""
    if path.startswith("mid_block"):
        return "mid"
    m = re.match(r"^(up|down)_blocks\.(\d+)\.", path)
    return f"{m.group(1)}{m.group(2)}" if m else None


def pooled(embeds: torch.Tensor) -> torch.Tensor:
    """The pooled text feature the trained modules use: the mean over the text tokens (`[..., L, D]` -> `[..., D]`).

    Available for every encoder from what the UNet receives (FICGen uses CLIP's EOS pooler output, which needs the
    token ids)."""
    return embeds.mean(dim=-2)


def region_bias(maps: torch.Tensor, strength: float) -> torch.Tensor:
    """Additive self-attention bias `[b, 1, S, S]` from instance maps `[b, n, S]`: `-strength * (1 - A)`,
    `A = clip(sum_m m m^T, 0, 1)` over the instances and the background `1 - max_i M_i`; `strength=inf` gives
    -inf only where A == 0 (query and key share no region)."""
    bg = background_map(maps.unsqueeze(-1)).squeeze(-1) if maps.shape[1] else maps.new_ones(maps.shape[0], maps.shape[2])
    regions = torch.cat([maps, bg.unsqueeze(1)], dim=1).float()  # [b, n + 1, S]
    share = torch.einsum("bms,bmt->bst", regions, regions).clamp(0, 1)
    if math.isinf(strength):
        bias = torch.zeros_like(share).masked_fill(share <= 0, float("-inf"))
    else:
        bias = -strength * (1 - share)
    return bias.unsqueeze(1)

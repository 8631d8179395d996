"""What every model-family adapter shares: the processor base class and the family description.

An adapter reproduces the stock processor of its family (projections, fused QKV, norms, RoPE, joint text order),
hands q, k, v `[B, H, S, D]` to the method as an `AttentionCall`, and finishes exactly as the stock processor.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..call import AttentionCall, LayerInfo, Role
from ..context import ContextSlot, ForwardContext, TokenGrid, timestep_value
from ..token_order import TokenStream

logger = logging.getLogger("diffattn")


def _as_grid(grid: Any) -> TokenGrid | None:
    if grid is None:
        return None
    values = tuple(int(g) for g in grid)
    if len(values) == 2:
        values = (1, *values)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"grid must be (frames, height, width) or (height, width) of positive ints, got {grid!r}")
    return TokenGrid(*values)


class DiffattnProcessor:
    """Base of diffattn's Diffusers attention processors.

    Works with `diffattn.apply` (which passes the layer position and the per-forward context) and with Diffusers'
    own `model.set_attn_processor(...)`: then pass `method` (a name or a built method), its options, and, for
    methods that need the token geometry, `grid=(frames, height, width)` in tokens.
    """

    # Diffusers skips processors without these attributes when setting backends / context parallelism.
    _attention_backend = None
    _parallel_config = None
    family: ClassVar[str] = ""

    def __init__(
        self,
        method: Any = "dense",
        *,
        layer: LayerInfo | None = None,
        slot: ContextSlot | None = None,
        grid: Any = None,
        **options: Any,
    ) -> None:
        if isinstance(method, str):
            from ..registry import build_method

            method = build_method(method, **options)
        elif options:
            raise ValueError(f"options {sorted(options)} given with an already built method; pass them to the method")
        self.method = method
        self.layer = layer
        self.slot = slot
        self.fixed_grid = _as_grid(grid)

    def __repr__(self) -> str:
        where = f"layer {self.layer.index} {self.layer.slot}" if self.layer else "unplaced"
        return f"{type(self).__name__}({getattr(self.method, 'name', self.method)!r}, {where})"

    # ---- context ---------------------------------------------------------------------------------------------
    def context(self) -> ForwardContext | None:
        return self.slot.current if self.slot is not None else None

    def layer_info(self, role: Role) -> LayerInfo:
        if self.layer is not None:
            return self.layer
        return LayerInfo(index=-1, slot="?", path="?", role=role, num_layers=0)

    def grid_for(self, ctx: ForwardContext | None, num_visual: int) -> TokenGrid | None:
        """The token grid of this call's video/image tokens: from the context, else the constructor's."""
        if ctx is not None and ctx.grid is not None:
            try:
                return ctx.grid_for_tokens(num_visual)
            except ValueError:
                return None
        if self.fixed_grid is not None:
            if self.fixed_grid.num_tokens != num_visual:
                raise ValueError(
                    f"{type(self).__name__}: grid={tuple(self.fixed_grid)} holds {self.fixed_grid.num_tokens} tokens "
                    f"but the attention call has {num_visual} video/image tokens"
                )
            return self.fixed_grid
        return None

    def attend(self, call: AttentionCall) -> torch.Tensor:
        """Run the method; returns `[B, H, Sq, D]`."""
        if self._parallel_config is not None:
            # Each rank holds a shard of the sequence: the method must see the whole one (diffattn.parallel).
            from ..parallel import parallel_attend

            return parallel_attend(self.method, call, self._parallel_config)
        return self.method.attend(call)


def to_heads_first(x: torch.Tensor) -> torch.Tensor:
    """`[B, S, H, D]` -> `[B, H, S, D]` (a view, as Diffusers' native dispatch does)."""
    return x.transpose(1, 2)


@dataclass(frozen=True)
class Slot:
    """One attention module to be given a diffattn processor."""

    path: str
    module: torch.nn.Module
    layer: LayerInfo


@dataclass(frozen=True)
class FamilyAdapter:
    """A model family: how to recognise it, which modules to replace, how to read its forward inputs.

    `layer_doc` says how layer indices count for this family (users pick layers by index). `token_stream` says
    where its visual tokens enter and leave the block stack, for methods that run the stack in another token order
    (`diffattn.token_order`); None: the family has none.
    """

    name: str
    model_classes: tuple[str, ...]
    processor_cls: type[DiffattnProcessor]
    slots: Callable[[torch.nn.Module], list[Slot]]
    read_inputs: Callable[[torch.nn.Module, dict[str, Any]], ForwardContext]
    layer_doc: str
    token_stream: TokenStream | None = None

    def matches(self, model: torch.nn.Module) -> bool:
        names = {cls.__name__ for cls in type(model).__mro__}
        return any(name in names for name in self.model_classes)

    def forward_signature(self, model: torch.nn.Module) -> inspect.Signature:
        """The model's `forward` signature without `self` (hooks wrap the bound method)."""
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
        return inspect.Signature(params)


def block_slots(
    model: torch.nn.Module, block_lists: list[str], attn_names: dict[str, Role], num_layers: int | None = None
) -> list[Slot]:
    """Slots for `model.<block_list>[i].<attn_name>` in order; the layer index counts blocks across the lists."""
    blocks: list[tuple[str, torch.nn.Module]] = []
    for list_name in block_lists:
        for i, block in enumerate(getattr(model, list_name, None) or []):
            blocks.append((f"{list_name}.{i}", block))
    total = len(blocks) if num_layers is None else num_layers
    slots = []
    for index, (prefix, block) in enumerate(blocks):
        for attn_name, role in attn_names.items():
            module = getattr(block, attn_name, None)
            if module is None or not hasattr(module, "set_processor"):
                continue
            path = f"{prefix}.{attn_name}"
            slots.append(Slot(path, module, LayerInfo(index=index, slot=attn_name, path=path, role=role, num_layers=total)))
    return slots


def forward_context(family: str, args: dict[str, Any], latent: str, grid: TokenGrid | None, **extra: Any) -> ForwardContext:
    """The fields every family reads the same way (batch from the latent input, text length from
    `encoder_hidden_states`, the timestep), plus the family's `extra` fields."""
    text = args.get("encoder_hidden_states")
    return ForwardContext(
        family=family,
        batch_size=args[latent].shape[0],
        grid=grid,
        text_len=0 if text is None else text.shape[1],
        timestep=timestep_value(args.get("timestep")),
        **extra,
    )


def legacy_qkv(attn, hidden_states: torch.Tensor, context: torch.Tensor | None = None):
    """q, k, v `[B, S, inner]` of Diffusers' legacy `Attention`, fused projections included.

    `context` is the key/value source for cross-attention (None: self-attention). Split as the stock `Fused*`
    processors do.
    """
    if getattr(attn, "fused_projections", False):
        if context is None:
            qkv = attn.to_qkv(hidden_states)
            return torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        kv = attn.to_kv(context)
        key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        return attn.to_q(hidden_states), key, value
    source = hidden_states if context is None else context
    return attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)


def split_heads(x: torch.Tensor, batch_size: int, heads: int) -> torch.Tensor:
    """`[B, S, H*D]` -> `[B, H, S, D]` as the legacy processors do (view + transpose)."""
    return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, S, D]` -> `[B, S, H*D]` as the legacy processors do (transpose + reshape)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)

"""Running a model's block stack in another token order: permuted once per forward, undone once, exactly.

A method whose attention works on blocks of consecutive tokens (Rectified SpaAttn) wants each block to be a compact
3-D box (`diffattn.masks.reorder`). Gathering q, k, v and the output of every layer costs four gathers of the whole
sequence per layer; everything between attention layers (norms, MLPs, modulation, cross-attention queries) acts on
each token alone, so the whole block stack can instead run in the new order. A `TokenStream` (one per model family,
declared by its adapter) names where the visual tokens enter and leave that stack and where the rotary table comes
from; `install_token_stream` puts three small hooks there, at the same points Diffusers' own context-parallel plans
split and gather the sequence:

- entry: the first block's `hidden_states` (its first argument) is permuted;
- rope: the rotary table (a module's output, or a forward argument) is permuted the same way, so each token still
  gets the rotation of its original position (RoPE sees the original positions);
- exit: the first input of the output norm is put back in the model's order, before anything that unpatchifies.

The hooks do nothing unless the forward's context holds a `TokenOrder` (under `ORDER_KEY`), which a method sets in
its `prepare_forward` through `begin`. `begin` refuses (sets no order, logs once why) for the forwards that carry
other per-token inputs in the model's order (Wan 2.2 TI2V's per-token timesteps, HunyuanVideo I2V's token-replace
frame, FLUX ControlNet residuals, token sets that are not the grid, context parallelism); the method then keeps the
model's order and gathers per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .call import AttentionCall, ForwardContext
from .log import log_once

logger = logging.getLogger("diffattn")

__all__ = ["ORDER_KEY", "TokenOrder", "TokenStream", "active_order", "begin", "install_token_stream",
           "remove_token_stream"]

ORDER_KEY = "token_order"
_HANDLES_ATTR = "_diffattn_token_stream"


@dataclass(frozen=True)
class TokenOrder:
    """One forward's token order: `perm[i]` is the model-order index of the i-th token (`x[:, perm]` is the new
    order), `inverse` undoes it (`y[:, inverse]`)."""

    perm: torch.Tensor
    inverse: torch.Tensor


@dataclass(frozen=True)
class TokenStream:
    """Where one family's visual tokens enter and leave the block stack, and where its rotary table comes from.

    Attributes:
        blocks: attribute of the first block list (its block 0 is the entry).
        exit: module whose first input holds the visual tokens `[B, S, C]` after the last block.
        rope_module: module returning the rotary table `(cos, sin)`, or None.
        rope_argument: forward argument holding `(cos, sin)` (CogVideoX), or None.
        rope_axis: the token axis of `cos` and `sin`.
        rope_text_first: the table holds the text tokens first (FLUX: `ids = [txt_ids; img_ids]`).
        refuse: `(model, arguments, ctx) -> reason or None`: why this forward must keep the model's order.
    """

    blocks: str
    exit: str
    rope_module: str | None = None
    rope_argument: str | None = None
    rope_axis: int = 0
    rope_text_first: bool = False
    refuse: Callable[[torch.nn.Module, dict[str, Any], ForwardContext], str | None] | None = None

    def permute_rope(self, rope: Any, order: TokenOrder, text_len: int) -> Any:
        """The rotary table `(cos, sin)` with its visual rows in `order` (text rows, if any, as they are)."""
        if rope is None:
            return None

        def one(t: torch.Tensor) -> torch.Tensor:
            n = order.perm.numel()
            if self.rope_text_first:
                if t.shape[self.rope_axis] != text_len + n:
                    raise RuntimeError(f"token order: rotary table has {t.shape[self.rope_axis]} rows for "
                                       f"{text_len} text + {n} visual tokens")
                text, visual = t.split([text_len, n], dim=self.rope_axis)
                return torch.cat([text, visual.index_select(self.rope_axis, order.perm)], dim=self.rope_axis)
            if t.shape[self.rope_axis] != n:
                raise RuntimeError(f"token order: rotary table has {t.shape[self.rope_axis]} rows for {n} tokens")
            return t.index_select(self.rope_axis, order.perm)

        return tuple(one(t) for t in rope)


def active_order(call: AttentionCall) -> TokenOrder | None:
    """The token order the visual tokens of `call` are already in (None: the model's order)."""
    ctx = call.context
    return None if ctx is None else ctx.extras.get(ORDER_KEY)


def begin(ctx: ForwardContext, arguments: dict[str, Any], order: TokenOrder) -> dict[str, Any] | None:
    """Run this forward's block stack in `order`, if the model's stream allows it (else the forward keeps the
    model's order and the reason is logged once; `active_order` tells the attention calls which case they are in).

    Returns the forward arguments to replace (a rotary table passed as an argument), or None.
    """
    model = ctx.extras.get("module")
    installed = getattr(model, _HANDLES_ATTR, None) if model is not None else None
    stream = installed[0] if installed is not None else None
    reason = None
    if stream is None:
        reason = "no token-stream hooks are installed (diffattn.apply installs them on families that declare one)"
    elif getattr(model, "_parallel_config", None) is not None:
        reason = "context parallelism splits the sequence at the same points"
    elif ctx.grid is None or ctx.grid.num_tokens != order.perm.numel():
        reason = f"the forward's visual tokens are not the {order.perm.numel()} tokens of its order"
    elif stream.refuse is not None:
        reason = stream.refuse(model, arguments, ctx)
    if reason is not None:
        log_once(f"token_order:refused:{ctx.family}:{reason}", "diffattn: this %s forward keeps the model's token "
                 "order (%s); the attention layers gather their tokens per call instead", ctx.family, reason)
        ctx.extras.pop(ORDER_KEY, None)
        return None
    ctx.extras[ORDER_KEY] = order
    if stream.rope_argument is not None and arguments.get(stream.rope_argument) is not None:
        return {stream.rope_argument: stream.permute_rope(arguments[stream.rope_argument], order, ctx.text_len)}
    return None


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise RuntimeError(f"token stream: {type(model).__name__} has no module {path!r}") from err


def install_token_stream(model: torch.nn.Module, stream: TokenStream, current: Callable[[], ForwardContext | None]) -> None:
    """Put the entry, rope and exit hooks of `stream` on `model`; `current()` returns the running forward's context.
    The hooks act only while that context holds a `TokenOrder`."""
    remove_token_stream(model)

    def order_now() -> TokenOrder | None:
        ctx = current()
        return None if ctx is None else ctx.extras.get(ORDER_KEY)

    def entry(module, args, kwargs):
        order = order_now()
        if order is None:
            return None
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].index_select(1, order.perm)}
            return args, kwargs
        return (args[0].index_select(1, order.perm), *args[1:]), kwargs

    def leave(module, args, kwargs):
        order = order_now()
        if order is None:
            return None
        return (args[0].index_select(1, order.inverse), *args[1:]), kwargs

    def rope(module, args, output):
        order = order_now()
        if order is None:
            return None
        ctx = current()
        return stream.permute_rope(output, order, ctx.text_len if ctx is not None else 0)

    blocks = getattr(model, stream.blocks, None)
    if not blocks:
        raise RuntimeError(f"token stream: {type(model).__name__}.{stream.blocks} holds no blocks")
    handles = [
        blocks[0].register_forward_pre_hook(entry, with_kwargs=True),
        _module(model, stream.exit).register_forward_pre_hook(leave, with_kwargs=True),
    ]
    if stream.rope_module is not None:
        handles.append(_module(model, stream.rope_module).register_forward_hook(rope))
    setattr(model, _HANDLES_ATTR, (stream, handles))


def remove_token_stream(model: torch.nn.Module) -> None:
    """Remove the hooks `install_token_stream` put on `model` (a no-op if there are none)."""
    _, handles = getattr(model, _HANDLES_ATTR, None) or (None, [])
    for handle in handles:
        handle.remove()
    if hasattr(model, _HANDLES_ATTR):
        delattr(model, _HANDLES_ATTR)

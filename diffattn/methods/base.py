"""The runtime interface every attention method implements, and the two fallbacks every method shares."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..call import AttentionCall, ForwardContext
from ..config import MethodConfig
from ..geometry import TokenGrid


class AttentionMethod:
    """One method with its validated options, shared by all processors of one `apply` call.

    `attend(call)` returns the attention output `[B, H, Sq, D]` for one invocation. The forward hooks below are
    no-ops here; a method that changes whole model forwards (extra batch rows: FreeSwim, SoftPAG) overrides them.
    `name` is set by the method's `MethodSpec` (declared once, in the spec).
    """

    name: ClassVar[str] = ""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def attend(self, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    # ---- forward hooks: called by the context hook around every model forward (see diffattn.context) ---------
    def prepare_forward(self, ctx: ForwardContext, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """Before a model forward, after its context is read: the arguments to change (name -> value), or None."""
        return None

    def finish_forward(self, ctx: ForwardContext | None, output: Any) -> Any:
        """After a model forward: its output, possibly changed (rows dropped, guidance folded in)."""
        return output

    def bind_pipeline(self, pipe: Any) -> None:
        """`diffattn.apply` on a pipeline calls this with the pipeline (methods that read its settings keep it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def dense_attention(call: AttentionCall) -> torch.Tensor:
    """Exactly what the stock processor computes: every method's fallback."""
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=call.attn_mask, scale=call.scale)


def require_grid(call: AttentionCall, method: str) -> TokenGrid:
    """The call's token grid, or a clear error saying how to provide one."""
    if call.grid is None:
        raise RuntimeError(
            f"method {method!r} needs the token grid (frames, height, width) of layer {call.layer.path!r}, and no "
            "per-forward context provides it: install it with diffattn.apply(pipe_or_model, ...) or pass "
            "grid=(frames, height, width) to the processor's constructor"
        )
    return call.grid

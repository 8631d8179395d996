"""The runtime interface every attention method implements, and the two fallbacks every method shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..call import AttentionCall, ForwardContext
from ..config import MethodConfig
from ..geometry import TokenGrid


@dataclass(frozen=True)
class RunPlan:
    """What a generation will run, as far as it is known before it starts: for `AttentionMethod.notices`."""

    family: str | None  # diffattn's model family (None: unknown)
    steps: int | None  # denoising steps
    grid: tuple[int, int, int] | None  # (frames, height, width) token grid of the denoiser (frames 1 for images)
    layers: int | None  # transformer blocks (the index space of layer options)


class AttentionMethod:
    """One method with its validated options, shared by all processors of one `apply` call.

    `attend(call)` returns the attention output `[B, H, Sq, D]` for one invocation. The forward hooks below are
    no-ops here; a method that changes whole model forwards (extra batch rows: FreeSwim, SoftPAG) overrides them.
    `name` is set by the method's `MethodSpec` (declared once, in the spec).
    """

    name: ClassVar[str] = ""
    # whether `apply` puts the token-stream hooks on the model (`diffattn.token_order`): methods that may run a
    # forward's block stack in their own token order set it
    reorders_tokens: ClassVar[bool] = False

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

    def effective_options(self, family: str | None) -> dict[str, Any]:
        """The options as they run on `family` (family defaults filled in), for sidecars and logs. Default: the
        config's values; methods with per-family defaults override it."""
        return self.config.to_dict()

    def notices(self, plan: RunPlan) -> list[str]:
        """Sentences saying where this method will not do what was asked at `plan` (all steps in a dense warm-up,
        a window covering the whole grid), so callers can warn without knowing the method. Default: none."""
        return []

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

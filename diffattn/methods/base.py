"""The runtime interface every attention method implements."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..call import AttentionCall
from ..config import MethodConfig


class AttentionMethod:
    """One method with its validated options, shared by all processors of one `apply` call.

    `attend(call)` returns the attention output `[B, H, Sq, D]` for one invocation.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def attend(self, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def require_grid(call: AttentionCall, method: str):
    """The call's token grid, or a clear error saying how to provide one."""
    if call.grid is None:
        raise RuntimeError(
            f"method {method!r} needs the token grid (frames, height, width) of layer {call.layer.path!r}, and no "
            "per-forward context provides it: install it with diffattn.apply(pipe_or_model, ...) or pass "
            "grid=(frames, height, width) to the processor's constructor"
        )
    return call.grid

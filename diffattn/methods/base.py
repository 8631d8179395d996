"""The runtime interface every attention method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..call import AttentionCall
from ..config import MethodConfig


@dataclass(frozen=True)
class RunPlan:
    """What a generation will run, as far as it is known before it starts: for `AttentionMethod.notices`."""

    family: str | None  # diffattn's model family (None: unknown)
    steps: int | None  # denoising steps
    grid: tuple[int, int, int] | None  # (frames, height, width) token grid of the denoiser (frames 1 for images)
    layers: int | None  # transformer blocks (the index space of layer options)


class AttentionMethod:
    """One method with its validated options, shared by all processors of one `apply` call.

    `attend(call)` returns the attention output `[B, H, Sq, D]` for one invocation.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def attend(self, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

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


def require_grid(call: AttentionCall, method: str):
    """The call's token grid, or a clear error saying how to provide one."""
    if call.grid is None:
        raise RuntimeError(
            f"method {method!r} needs the token grid (frames, height, width) of layer {call.layer.path!r}, and no "
            "per-forward context provides it: install it with diffattn.apply(pipe_or_model, ...) or pass "
            "grid=(frames, height, width) to the processor's constructor"
        )
    return call.grid

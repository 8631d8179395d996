"""What methods share, in one import: `from diffattn.methods.toolkit import ...`.

- `DenseWarmup`: dense first layers, dense first steps, dense last steps (Radial, GNA, and any method with a
  warm-up), with one clear error when the step is unknown.
- The text split (`visual_with_text`, `can_split`, `text_key_groups`; defined in `text_split`) and the two
  fallbacks (`dense_attention`, `require_grid`; defined in `base`).
- Extra batch rows: a method that runs a second branch inside the same model forward (FreeSwim's full branch,
  SoftPAG's perturbed pass) appends rows to the forward's arguments in `prepare_forward` and takes them back out
  of the output in `finish_forward` (`append_rows`, `take_rows`, `output_sample`, `with_output_sample`,
  `keep_rows`).
- `per_forward`: a value built once per model forward (kept in the forward context), e.g. a method's settings and
  token permutation, so that every layer's call reuses it.
- `log_once` (defined in `diffattn.log`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..call import AttentionCall
from ..log import log_once
from .base import dense_attention, require_grid
from .text_split import can_split, text_key_groups, visual_with_text

__all__ = [
    "DenseWarmup", "append_rows", "can_split", "dense_attention", "keep_rows", "log_once", "output_sample",
    "per_forward", "require_grid", "take_rows", "text_key_groups", "visual_with_text", "with_output_sample",
]

_T = TypeVar("_T")


def per_forward(call: AttentionCall, key: Hashable, build: Callable[[], _T]) -> _T:
    """`build()` once per model forward: the result is kept in the forward context's `extras` under `key` and
    returned to every later call of the same forward (a call without a context builds it each time)."""
    ctx = call.context
    if ctx is None:
        return build()
    if key not in ctx.extras:
        ctx.extras[key] = build()
    return ctx.extras[key]


# ---- dense warm-up ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseWarmup:
    """Which calls run dense: layers with index < `layers`, the first `first_steps` denoising steps and the last
    `last_steps` (the options `dense_layers`, `dense_timesteps` and `dense_last_steps` of the methods using it)."""

    layers: int = 0
    first_steps: int = 0
    last_steps: int = 0

    def runs_dense(self, call: AttentionCall, method: str) -> bool:
        """Whether `call` runs dense. Step rules need the per-forward context (and the last steps the step count):
        without it, a `RuntimeError` names the options that need it."""
        if 0 <= call.layer.index < self.layers:
            return True
        if not (self.first_steps or self.last_steps):
            return False
        ctx = call.context
        if ctx is None:
            zeros = " and ".join(
                f"{name}=0" for name, value in (("dense_timesteps", self.first_steps), ("dense_last_steps", self.last_steps))
                if value
            )
            raise RuntimeError(
                f"{method}: dense warm-up steps need the denoising step, and this processor has no per-forward "
                f"context: install it with diffattn.apply(...), or pass {zeros}"
            )
        if ctx.step_index < self.first_steps:
            return True
        if self.last_steps:
            if ctx.num_steps is None:
                raise RuntimeError(
                    f"{method}: dense_last_steps needs the number of steps, which this pipeline does not expose"
                )
            if ctx.step_index >= ctx.num_steps - self.last_steps:
                return True
        return False


# ---- extra batch rows ----------------------------------------------------------------------------------------------
# FLUX's 2-D position ids [S, 3] have no batch dimension (S may equal the batch by chance); SDXL's `time_ids` do.
_POSITION_IDS = ("img_ids", "txt_ids")


def _batched(value: Any, batch: int, name: str) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.ndim > 0
        and value.shape[0] == batch
        and not (name in _POSITION_IDS and value.ndim == 2)
    )


def take_rows(value: Any, batch: int, rows: slice, name: str = "") -> Any:
    """`value` restricted to batch `rows`: tensors whose first dim is the batch, dicts (a forward's arguments)
    recursively; everything else as it is."""
    if isinstance(value, dict):
        return {k: take_rows(v, batch, rows, k) for k, v in value.items()}
    return value[rows] if _batched(value, batch, name) else value


def append_rows(value: Any, batch: int, rows: slice, name: str = "") -> Any:
    """`value` with copies of its batch `rows` appended (dicts recursively): the extra rows of a second branch."""
    if isinstance(value, dict):
        return {k: append_rows(v, batch, rows, k) for k, v in value.items()}
    return torch.cat([value, value[rows]], dim=0) if _batched(value, batch, name) else value


def output_sample(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output (a tuple's first item, `.sample`, or the tensor itself)."""
    if isinstance(output, tuple):
        return output[0]
    if hasattr(output, "sample"):
        return output.sample
    return output


def with_output_sample(output: Any, sample: torch.Tensor) -> Any:
    """`output` with its prediction tensor replaced by `sample`, in the same container."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    if hasattr(output, "sample"):
        output.sample = sample
        return output
    return sample


def keep_rows(output: Any, batch: int) -> Any:
    """`output` with only the first `batch` rows of its prediction (the extra rows dropped)."""
    return with_output_sample(output, output_sample(output)[:batch])

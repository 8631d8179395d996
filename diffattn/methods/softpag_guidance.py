"""SoftPAG's guidance: the forward-level half of the method (see `diffattn.methods.softpag` for the rule).

Each guided forward either appends the perturbed rows to the batch (`batched=True`, the toolkit's extra batch rows)
or runs a second model call (`batched=False`), and shifts the conditional and unconditional predictions by
s_t (eps_c - eps_ptb). `SoftPAGGuidance` holds the forward hooks; `SoftPAGMethod` adds the attention.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..call import ForwardContext
from .toolkit import append_rows, output_sample, take_rows, with_output_sample

__all__ = ["SoftPAGGuidance"]

STATE_KEY = "softpag"  # where a forward's decision lives in the context's extras


@dataclass
class ForwardState:
    """What prepare_forward decided for one model forward (kept in the context's extras)."""

    rows: slice | None  # rows whose chosen heads are perturbed; None = all rows
    kind: str | None = None  # None (perturbation only), "cfg_batch", "cond", "uncond"
    scale: float = 0.0
    batch: int = 0
    cond: slice | None = None
    arguments: dict[str, Any] | None = None


_LATENT_ARGS = ("hidden_states", "sample")


class SoftPAGGuidance:
    """The forward hooks and pipeline binding of SoftPAG (a mixin of `SoftPAGMethod`: it reads `self.config`,
    keeps `self._pending`, `self._inner` and the pipeline/model references)."""

    def _init_guidance(self) -> None:
        self._pipeline: Any = None
        self._model: Any = None
        self._inner = False
        self._pending: dict[int, torch.Tensor] = {}  # step -> shift of that step's conditional pass

    # ---- binding ------------------------------------------------------------------------------------------------
    def bind_pipeline(self, pipe: Any) -> None:
        """Tell the method which pipeline drives it (weakly held): turns `guidance="auto"` on and lets `cfg=None`
        read `pipe.do_classifier_free_guidance`. `diffattn.apply` on a pipeline calls this."""
        self._pipeline = weakref.ref(pipe)

    def bind_model(self, model: torch.nn.Module) -> None:
        """The model the separate perturbed pass (`batched=False`) re-runs (found automatically otherwise)."""
        self._model = weakref.ref(model)

    def _pipe(self) -> Any:
        return self._pipeline() if self._pipeline is not None else None

    # ---- forward level: guidance ------------------------------------------------------------------------------
    def _guiding(self, ctx: ForwardContext) -> bool:
        if self.config.guidance == "on":
            return True
        if self.config.guidance == "off":
            return False
        return self._pipe() is not None or ctx.num_steps is not None

    def scale_at(self, ctx: ForwardContext) -> float:
        """The guidance scale s_t of this forward (0 outside the step window)."""
        cfg = self.config
        if ctx.num_steps:
            frac = ctx.step_index / ctx.num_steps
            if not (cfg.start <= frac < cfg.end):
                return 0.0
        s = cfg.scale
        if cfg.adaptive_scale and ctx.timestep is not None:
            t = ctx.timestep * 1000.0 if ctx.family == "flux" else ctx.timestep
            s = max(0.0, s - cfg.adaptive_scale * (1000.0 - t))
        return float(s)

    def _cfg_batch(self, ctx: ForwardContext, args: dict[str, Any]) -> bool:
        if self.config.cfg is not None:
            return self.config.cfg and ctx.batch_size % 2 == 0
        pipe = self._pipe()
        if pipe is not None and hasattr(pipe, "do_classifier_free_guidance"):
            return bool(pipe.do_classifier_free_guidance) and ctx.batch_size % 2 == 0
        if ctx.pass_name == "cond_uncond":
            return True
        if ctx.batch_size % 2:
            return False
        latent = next((args[n] for n in _LATENT_ARGS if isinstance(args.get(n), torch.Tensor)), None)
        n = ctx.batch_size // 2
        return latent is not None and torch.equal(latent[:n], latent[n:])

    def prepare_forward(self, ctx: ForwardContext, args: dict[str, Any]) -> dict[str, Any] | None:
        self._check_family(ctx.family)
        if self._inner or not self._guiding(ctx):
            ctx.extras[STATE_KEY] = ForwardState(rows=None)
            return None
        b = ctx.batch_size
        if ctx.step_index == 0 and ctx.pass_index == 0:
            self._pending.clear()
        s = self.scale_at(ctx)
        if ctx.pass_name == "uncond":
            ctx.extras[STATE_KEY] = ForwardState(rows=slice(0, 0), kind="uncond", scale=s, batch=b)
            return None
        if ctx.pass_name != "cond" and self._cfg_batch(ctx, args):
            kind, cond = "cfg_batch", slice(b // 2, b)
        else:  # "cond", or an unnamed forward without CFG halves (FLUX-dev; second-order solvers' repeated t)
            kind, cond = "cond", slice(0, b)
        state = ForwardState(rows=slice(0, 0), kind=kind, scale=s, batch=b, cond=cond)
        ctx.extras[STATE_KEY] = state
        if s == 0.0:
            return None
        if not self.config.batched:
            state.arguments = take_rows(args, b, cond)
            return None
        state.rows = slice(b, b + cond.stop - cond.start)
        return append_rows(args, b, cond)

    def _find_model(self, ctx: ForwardContext) -> torch.nn.Module:
        """The model whose forward is finishing (the separate perturbed pass re-runs it).

        Found in `ctx.extras["module"]` (the context hook records the running model, so Wan 2.2's two experts,
        which share one method, each re-run themselves), else the model given to `bind_model`.
        """
        module = ctx.extras.get("module")
        if isinstance(module, torch.nn.Module):
            return module
        if self._model is not None and self._model() is not None:
            return self._model()
        raise RuntimeError(
            "softpag (batched=False): cannot find the model to run the perturbed pass; call "
            "method.bind_model(model) or use batched=True"
        )

    def finish_forward(self, ctx: ForwardContext | None, output: Any) -> Any:
        state: ForwardState | None = None if ctx is None else ctx.extras.get(STATE_KEY)
        if state is None or state.kind is None or self._inner:
            return output
        sample = output_sample(output)
        if state.kind == "uncond":
            if state.scale == 0.0:
                return output
            shift = self._pending.get(ctx.step_index)
            if shift is None or shift.shape != sample.shape:
                raise RuntimeError(
                    "softpag: an unconditional pass came before the conditional pass of its step (or with another "
                    "batch); the guidance shift is computed in the conditional pass, which must come first"
                )
            return with_output_sample(output, sample + shift.to(sample.dtype))
        if state.scale == 0.0:
            return output
        b, cond = state.batch, state.cond
        if self.config.batched:
            eps, perturbed = sample[:b], sample[b:]
        else:
            eps = sample
            model = self._find_model(ctx)
            self._inner = True
            try:
                perturbed = output_sample(model(**state.arguments))
            finally:
                self._inner = False
        shift = state.scale * (eps[cond] - perturbed)
        if state.kind == "cfg_batch":
            guided = eps + shift.repeat(2, *([1] * (shift.ndim - 1)))
        else:
            guided = eps + shift
            self._pending = {ctx.step_index: shift}
        return with_output_sample(output, guided)

    # ---- attention --------------------------------------------------------------------------------------------
    def _rows(self, ctx: ForwardContext | None) -> slice | None:
        state = None if ctx is None else ctx.extras.get(STATE_KEY)
        if self._inner or state is None:
            return None
        return state.rows

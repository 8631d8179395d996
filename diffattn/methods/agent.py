"""`agent`: AgentSD, training-free agent attention (Han et al., ECCV 2024) on stock Diffusers models.

UNets (SD1.5, SD2.1, SDXL; `attn1` self-attention of the top-resolution blocks only, `downsample <= max_downsample`):
ToMe bipartite merge (one destination per `sx x sy` cell, cosine similarity on the block's pre-norm input, recorded
by a forward pre-hook on each `BasicTransformerBlock`), agents = the tokens merged further (`agent_ratio`), agent
attention with upstream's broadcast temperature `(D^-0.5)^k_scale2` and the `k_shortcut * V` term, unmerge. When
agents would not pay (`2 n >= N'`) the merged tokens run plain softmax attention (ToMe). Cross-attention untouched.

Merging happens on q, k, v after the projections instead of on the block's normed input before them: the
projections are affine, so the mean of projected tokens is the projection of the mean and the result is the same;
only the projection FLOPs of the merged tokens are not saved. Unmerging before `to_out` is equal likewise.

The step schedule is data (`schedule`): the top-level options hold from step 0; each stage `{"start": fraction,
...overrides}` holds from `start * num_steps` on (default "upstream": 2x2 cells and agent_ratio 0.5 from 40% of the
steps, upstream's step 20 of 50). The step comes from the per-forward context, not from counting calls.

DiT families (SD3, FLUX): agents by average-pooling Q on the image token grid (`agent_num`), text tokens exact (text
queries attend every key; image queries attend the agents and the text keys in one softmax).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..call import AttentionCall, ForwardContext
from ..config import MethodConfig, option
from ..kernels.agent import (
    agent_attention,
    agent_count,
    bipartite_partition,
    downsample_of,
    merge_many,
    merge_plans,
    merged_count,
    pool_agents,
    unmerge,
)
from .base import AttentionMethod
from .spec import MethodSpec
from .toolkit import dense_attention, log_once, require_grid, visual_with_text

STAGE_KEYS = ("sx", "sy", "ratio", "agent_ratio", "k_scale2", "k_shortcut", "agent_num")
UPSTREAM_SCHEDULE = ({"start": 0.4, "sx": 2, "sy": 2, "agent_ratio": 0.5},)


@dataclass(frozen=True)
class Stage:
    """The settings in force from `start` (a fraction of the steps) on."""

    start: float
    sx: int
    sy: int
    ratio: float
    agent_ratio: float
    k_scale2: float
    k_shortcut: float
    agent_num: int


@dataclass
class AgentConfig(MethodConfig):
    ratio: float = option(0.4, low=0.0, high=1.0, high_inclusive=False,
                          help="fraction of the tokens merged away (ToMe r = int(N * ratio)); UNets")
    agent_ratio: float = option(0.95, low=0.0, high=1.0,
                                help="fraction of the tokens merged further into agents (n = N - int(N * agent_ratio)); UNets")
    sx: int = option(4, low=1, help="destination cell width in tokens (one destination per sx x sy cell); UNets")
    sy: int = option(4, low=1, help="destination cell height in tokens; UNets")
    max_downsample: int = option(1, low=1, help="UNet levels patched: ceil(sqrt(N_latent / N)) <= this (1 = top level only)")
    k_scale2: float = option(0.3, low=0.0, help="broadcast temperature exponent: softmax(Q A^T (D^-0.5)^k_scale2)")
    k_shortcut: float = option(0.075, help="weight of the V shortcut added to the agent output")
    schedule: Any = option("upstream", help='"upstream" (2x2, agent_ratio 0.5 from 40% of the steps), "none", or '
                           'a list of {"start": fraction, sx/sy/ratio/agent_ratio/k_scale2/k_shortcut/agent_num: ...}')
    attn_precision: str | None = option(None, choices=(None, "fp32"), help='"fp32": both softmaxes in float32 (SD 2.1)')
    seed: int | None = option(None, help="seed of the random destination choice (None: torch's global RNG)")
    agent_num: int = option(64, low=1, help="DiT variant (SD3, FLUX): agents pooled from Q on the image grid")

    def check(self) -> None:
        self.stages()

    def stages(self) -> tuple[Stage, ...]:
        """The schedule as stages ordered by start, the first at 0 with the top-level options."""
        base = Stage(0.0, self.sx, self.sy, self.ratio, self.agent_ratio, self.k_scale2, self.k_shortcut, self.agent_num)
        spec = self.schedule
        if spec is None or spec == "none":
            entries: tuple = ()
        elif spec == "upstream":
            entries = UPSTREAM_SCHEDULE
        elif isinstance(spec, (list, tuple)) and all(isinstance(e, dict) for e in spec):
            entries = tuple(spec)
        else:
            raise ValueError(f"option 'schedule' of method 'agent' must be \"upstream\", \"none\" or a list of stage dicts, got {spec!r}")
        stages = [base]
        for entry in sorted(entries, key=lambda e: e.get("start", -1)):
            unknown = set(entry) - {"start", *STAGE_KEYS}
            start = entry.get("start")
            if unknown or not isinstance(start, (int, float)) or isinstance(start, bool) or not 0 <= start <= 1:
                raise ValueError(f"option 'schedule' of method 'agent': a stage needs \"start\" in [0, 1] and only keys "
                                 f"{', '.join(STAGE_KEYS)}; got {entry!r}")
            stage = replace(stages[-1], start=float(start), **{k: v for k, v in entry.items() if k != "start"})
            _check_stage(stage, entry)
            stages.append(stage)
        return tuple(stages)


def _check_stage(s: Stage, entry: dict) -> None:
    ok = (isinstance(s.sx, int) and isinstance(s.sy, int) and s.sx >= 1 and s.sy >= 1 and 0 <= s.ratio < 1
          and 0 <= s.agent_ratio <= 1 and s.k_scale2 >= 0 and isinstance(s.agent_num, int) and s.agent_num >= 1
          and math.isfinite(s.k_shortcut))
    if not ok:
        raise ValueError(f"option 'schedule' of method 'agent': stage {entry!r} out of range (sx, sy, agent_num ints "
                         ">= 1; 0 <= ratio < 1; 0 <= agent_ratio <= 1; k_scale2 >= 0)")


def _agent_grid(height: int, width: int, agent_num: int) -> tuple[int, int]:
    """A pooled grid of about `agent_num` cells with the token grid's aspect ratio."""
    gh = max(1, min(height, round(math.sqrt(agent_num * height / width))))
    gw = max(1, min(width, round(agent_num / gh)))
    return gh, gw


def _range(name: str):
    """A named profiler range around one phase of the UNet path (`diffattn bench agent --profile` sums the device
    time of the kernels under each); a no-op context when no profiler runs, so the eager step pays nothing for it."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        return record_function(name)
    return nullcontext()


class AgentMethod(AttentionMethod):
    """Shared by every processor of one `apply`; holds the block-input metrics of the running forward."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        self._stages = config.stages()
        self._metrics: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._partitions: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- per forward: the pre-norm metric of each transformer block ------------------------------------------
    def prepare_forward(self, ctx: ForwardContext, arguments: dict[str, Any]) -> None:
        self._release()
        model = ctx.extras.get("module")
        if ctx.family != "unet" or model is None:
            return None
        latent = ctx.grid.num_tokens if ctx.grid is not None else None
        for name, module in model.named_modules():
            if type(module).__name__ == "BasicTransformerBlock":
                self._handles.append(module.register_forward_pre_hook(self._recorder(name, latent), with_kwargs=True))
        return None

    def finish_forward(self, ctx: ForwardContext | None, output: Any) -> Any:
        self._release()
        return output

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._metrics.clear()

    def _recorder(self, name: str, latent: int | None):
        """Keep the block input only where the gate lets the method run (the metric is held until its attn1
        uses it, so the other levels' inputs are not kept alive)."""
        def record(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if x is not None and (latent is None or downsample_of(latent, x.shape[1]) <= self.config.max_downsample):
                self._metrics[name] = x
        return record

    # ---- the schedule and the random destinations -----------------------------------------------------------
    def stage(self, ctx: ForwardContext | None) -> Stage:
        if ctx is None or len(self._stages) == 1:
            return self._stages[0]
        if not ctx.num_steps:
            log_once("agent-no-num-steps", "diffattn agent: the number of steps is unknown (a bare model call); the "
                     "schedule's first stage is used throughout")
            return self._stages[0]
        fraction = ctx.step_index / ctx.num_steps
        current = self._stages[0]
        for s in self._stages[1:]:
            if fraction + 1e-9 >= s.start:
                current = s
        return current

    def partition(self, ctx: ForwardContext | None, height: int, width: int, s: Stage, device) -> tuple:
        """Destinations of this forward for this grid, drawn once per forward (all blocks of a level share them)."""
        key = ("agent_partition", height, width, s.sx, s.sy, str(device))
        if ctx is not None and key in ctx.extras:
            return ctx.extras[key]
        gen = None
        seeded = self.config.seed is not None
        step = ctx.step_index if ctx is not None else 0
        if seeded:  # a pure function of (seed, step, grid, cells): kept on the device, no host copy per forward
            cached = self._partitions.get((*key, step))
            if cached is not None:
                out = cached
                if ctx is not None:
                    ctx.extras[key] = out
                return out
            gen = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + step * 7919 + height * 31 + width)
        out = bipartite_partition(height, width, s.sx, s.sy, generator=gen, device=device)
        if seeded:
            if len(self._partitions) >= 512:
                self._partitions.clear()
            self._partitions[(*key, step)] = out
        if ctx is not None:
            ctx.extras[key] = out
        return out

    # ---- attention ------------------------------------------------------------------------------------------
    def attend(self, call: AttentionCall) -> torch.Tensor:
        if call.role in ("cross", "cross_image"):
            return dense_attention(call)
        if call.layer.slot != "attn1" and call.context is not None and call.context.family == "unet":
            return dense_attention(call)
        family = call.context.family if call.context is not None else None
        if family == "unet" or (family is None and call.role == "self" and call.layer.slot == "attn1"):
            return self._unet(call)
        return self._dit(call)

    def _unet(self, call: AttentionCall) -> torch.Tensor:
        grid = require_grid(call, "agent")
        ctx = call.context
        n = call.q.shape[2]
        latent = ctx.grid.num_tokens if ctx is not None and ctx.grid is not None else n
        if downsample_of(latent, n) > self.config.max_downsample:
            return dense_attention(call)
        if call.attn_mask is not None:
            log_once("agent-mask", "diffattn agent: a self-attention mask was given; that layer runs dense")
            return dense_attention(call)
        s = self.stage(ctx)
        dst, src = self.partition(ctx, grid.height, grid.width, s, call.q.device)
        r = merged_count(n, src.numel(), s.ratio)
        agents_n = agent_count(n, src.numel(), s.agent_ratio)
        use_agents = 2 * agents_n < n - r
        if r == 0 and not use_agents:
            return dense_attention(call)
        block = call.layer.path.rsplit(".", 1)[0]
        metric = self._metrics.pop(block, None)
        if metric is None or metric.shape[:2] != call.q.shape[0:1] + (n,):
            log_once("agent-metric", "diffattn agent: no block input recorded for %s (processor used without "
                     "diffattn.apply?); the keys are the similarity metric", call.layer.path)
            metric = call.k.transpose(1, 2).flatten(2)
        with _range("agent::similarity"):
            plans = merge_plans(metric, dst, src, [r, n - agents_n] if use_agents else [r])
        assign, slots, weights = plans[0]
        fp32 = self.config.attn_precision == "fp32"
        with _range("agent::merge"):
            q, k, v = merge_many([call.q, call.k, call.v], assign, slots, weights)
            if use_agents:
                agents, = merge_many([call.q], *plans[1])
        with _range("agent::attention"):
            if use_agents:
                out = agent_attention(q, k, v, agents, scale=call.scale, broadcast_power=s.k_scale2,
                                      shortcut=s.k_shortcut, fp32=fp32)
            else:
                dtype = q.dtype
                if fp32:
                    q, k, v = q.float(), k.float(), v.float()
                out = F.scaled_dot_product_attention(q, k, v, scale=call.scale).to(dtype)
        with _range("agent::unmerge"):
            return unmerge(out, assign)

    def _dit(self, call: AttentionCall) -> torch.Tensor:
        grid = require_grid(call, "agent")
        if call.attn_mask is not None and call.key_padding is None:
            log_once("agent-dit-mask", "diffattn agent: an attention mask without a padding mask; that layer runs dense")
            return dense_attention(call)
        s = self.stage(call.context)
        h, w = grid.height, grid.width
        if grid.frames != 1 or call.num_visual != h * w:
            return dense_attention(call)
        agent_grid = _agent_grid(h, w, s.agent_num)
        fp32 = self.config.attn_precision == "fp32"

        def visual(batch_index, q_v, k_v, v_v, extra_k, extra_v):
            agents = pool_agents(q_v, h, w, agent_grid)
            return agent_attention(q_v, k_v, v_v, agents, scale=call.scale, broadcast_power=s.k_scale2,
                                   shortcut=s.k_shortcut, extra_k=extra_k, extra_v=extra_v, fp32=fp32)

        return visual_with_text(call, visual)


SPEC = MethodSpec(
    name="agent",
    summary="AgentSD: ToMe-merged agent tokens + agent attention, training-free (UNet top levels; pooled agents on DiTs)",
    config_cls=AgentConfig,
    families=("unet", "sd3", "flux"),
    build=AgentMethod,
)

"""`diffattn bench e2e`: whole generations as users run them (issue #20).

Builds a whole `WanPipeline` (the transformer from `diffattn.bench.step`'s real configs, the Wan 2.1 VAE, the UMT5-XXL text
encoder, an offline tokenizer, UniPC with a flow shift: `diffattn.bench.highres.build_pipeline`, random bf16 weights), then
times one full pipeline call per variant (same prompt, seed and step count): text encoding, denoising (cond +
uncond forward per step, the scheduler) and the VAE decode, each as a stage with its peak memory, and the whole
call's wall time. Each variant's video is compared with the first variant's (the stock baseline) by PSNR; random
weights make that a consistency figure, not a quality claim (`diffattn bench quality` measures quality on the demo
models).

Variants (`--variants`): `stock` (Diffusers' own processors), or method names joined with `+` to a Diffusers cache
(`dense`, `radial`, `radial+fbc`, `radial+softpag`, `stock+fbc`), each part optionally with `:key=value,key=value`
options (`radial:decay_factor=0.5+fbc:threshold=0.08`). On CUDA every SDPA call prefers cuDNN.

Projection to `--target-steps` (default 50) from a short run (`--steps`), exactly: every denoising step is timed
(from one step-end callback to the next; the first from the first transformer forward) and classified by two
things, whether the method's attention runs dense at that step (its warm-up schedule: radial's `dense_timesteps` /
`dense_last_steps`) and whether a cache skipped work in it (some forward of the step did not run the last
transformer block's feed-forward: block caches such as FirstBlockCache; attention-only caches (PAB, FasterCache)
leave it running, so their steps all count as full and the medians mix both). The projection is
`text + decode + sum over kinds n_kind(target) * median_step_s(kind)`,
with `n_dense(target)` from the method's schedule at the target step count, and the cached share of the remaining
steps equal to the share measured in the short run (an assumption for content-dependent caches such as
FirstBlockCache, stated in the report). With `--scale-schedule` (default on) the short run's `dense_timesteps` is
scaled to `round(dense_timesteps * steps / target)` (at least 1 when it is > 0), so that it contains both kinds.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..compose import CACHES, check_cache, enable_cache
from .harness import GIB, gib
from .highres import DEFAULT_NEGATIVE, DEFAULT_PROMPT, MODEL_NAMES, ModelPreset, StageClock, build_pipeline, presets
from .models import MODELS

logger = logging.getLogger("diffattn")

STAGES = ("text encoding", "denoising", "decode")


# ------------------------------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    methods: list[str] = field(default_factory=list)  # empty: stock processors
    options: dict[str, Any] = field(default_factory=dict)  # per method name
    cache: str | None = None
    cache_options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None  # `@N`: this variant's step count (None: the run's --steps)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _structured(value: Any, text: str) -> Any:
    """A free-typed option (gna's `kernel_size`) parsed as a string: a tuple/list/dict literal becomes that value."""
    if isinstance(value, str):
        lit = _literal(text)
        if isinstance(lit, (tuple, list, dict)):
            return lit
    return value


def _split(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside brackets: `kernel_size=(-1,12,24),stride=(1,4,8)` is two options."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_variant(text: str) -> Variant:
    """`stock`, `radial`, `radial:decay_factor=0.5+fbc:threshold=0.08`, `radial+softpag:heads=L3`,
    `gna:kernel_size=(-1,12,24)`, with an optional `@N` (run this variant with N steps) -> Variant."""
    import diffattn

    variant = Variant(label=text)
    body, at, count = text.rpartition("@") if "@" in text else (text, "", "")
    if at:
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"variant {text!r}: '@' is followed by a step count >= 1, got {count!r}")
        variant.steps = int(count)
    for part in _split(body, "+"):
        name, _, opts = part.partition(":")
        name = name.strip()
        pairs = [p for p in _split(opts, ",") if p.strip()]
        if any("=" not in p for p in pairs):
            raise ValueError(f"variant {text!r}: options are key=value separated by commas, got {opts!r}")
        if name in CACHES:
            if variant.cache is not None:
                raise ValueError(f"variant {text!r} names two caches")
            variant.cache = name
            variant.cache_options = {k.strip(): _literal(v.strip()) for k, v in (p.split("=", 1) for p in pairs)}
        elif name == "stock":
            if pairs:
                raise ValueError(f"variant {text!r}: 'stock' takes no options")
        else:
            cfg = diffattn.registry.get_method(name).config_cls
            variant.methods.append(name)
            variant.options[name] = {k.strip(): _structured(cfg.parse_option(k.strip(), v.strip()), v.strip())
                                     for k, v in (p.split("=", 1) for p in pairs)}
    if "stock" in [p.partition(":")[0].strip() for p in _split(body, "+")] and variant.methods:
        raise ValueError(f"variant {text!r}: 'stock' cannot be combined with a method")
    if variant.cache is not None and variant.methods:
        check_cache(variant.methods)
    return variant


def dense_steps(runtime: Any, total: int) -> set[int]:
    """Steps (of `total`) in which `runtime` runs dense attention by its warm-up schedule."""
    if runtime is None:
        return set(range(total))
    attention = getattr(runtime, "attention", runtime)  # a composition: its attention method
    if getattr(attention, "name", "") == "dense":
        return set(range(total))
    if hasattr(attention, "settings"):
        s = attention.settings("wan")
    else:
        s = {k: getattr(attention.config, k, 0) for k in ("dense_timesteps", "dense_last_steps")}
    first, last = int(s.get("dense_timesteps") or 0), int(s.get("dense_last_steps") or 0)
    return {i for i in range(total) if i < first or i >= total - last}


def cache_schedule(cache: str | None, options: dict[str, Any], total: int) -> set[int] | None:
    """The steps (of `total`) a cache skips when its decision does not depend on the content, else None.

    TaylorSeer decides from the step index only (Diffusers' rule: full compute while `step <
    disable_cache_before_step`, at `step == disable_cache_before_step + 1 + k * cache_interval`, and from
    `disable_cache_after_step` on; predicted otherwise), so its schedule at the target step count is exact, and the
    same on trained and random weights. FirstBlockCache and MagCache decide from the residuals (MagCache from a
    calibrated ratio table): None, the projection then uses the measured share."""
    if cache != "taylorseer":
        return None
    before = int(options.get("disable_cache_before_step", 3))
    interval = int(options.get("cache_interval", 5))
    after = options.get("disable_cache_after_step")
    full = {i for i in range(total) if i < before or (i - before - 1) % interval == 0
            or (after is not None and i >= int(after))}
    return set(range(total)) - full


def _scaled_options(variant: Variant, steps: int, target: int,
                    run_dense: int | None = None) -> tuple[dict[str, Any], int | None]:
    """The short run's per-method options with `dense_timesteps` scaled from the target schedule (or set to
    `run_dense`), and the target's `dense_timesteps` (None when the variant has no warm-up schedule to scale)."""
    from ..registry import build_method

    options = {n: dict(o) for n, o in variant.options.items()}
    if len(variant.methods) != 1 or variant.methods[0] == "dense":
        return options, None
    name = variant.methods[0]
    runtime = build_method(name, **options[name])
    if not hasattr(runtime.config, "dense_timesteps"):
        return options, None
    first = int((runtime.settings("wan") if hasattr(runtime, "settings") else vars(runtime.config))["dense_timesteps"] or 0)
    if run_dense is not None:
        options[name]["dense_timesteps"] = run_dense
    else:
        options[name]["dense_timesteps"] = 0 if first == 0 else max(1, round(first * steps / target))
    return options, first


# ------------------------------------------------------------------------------------------------------------------
# probe
# ------------------------------------------------------------------------------------------------------------------
class LayerTimer:
    """A method's `attend` between CUDA events (the host clock on the CPU), summed per step into self-attention,
    layer 0's self-attention (Radial's dense layer) and cross-attention: what separates a step's attention time
    from the rest of it (`--attention-times`). Built on `diffattn.bench.step.AttentionTimer`."""

    def __init__(self, method: Any, cuda: bool) -> None:
        from .step import AttentionTimer

        self.timer = AttentionTimer(method, cuda=cuda)
        self.name = self.timer.name
        self.layers: list[bool] = []

    def attend(self, call):
        self.layers.append(call.layer.index == 0)
        return self.timer.attend(call)

    def collect(self) -> dict[str, float]:
        if self.timer.cuda:
            torch.cuda.synchronize()
        out = {"self": 0.0, "self_layer0": 0.0, "cross": 0.0}
        for (role, start, end), first in zip(self.timer.events, self.layers):
            seconds = start.elapsed_time(end) / 1e3 if self.timer.cuda else end - start
            key = "self" if role in ("self", "joint") else "cross"
            out[key] += seconds
            if first and key == "self":
                out["self_layer0"] += seconds
        self.timer.events.clear()
        self.layers.clear()
        return out


class Probe:
    """Stage boundaries from the pipeline's own seams (text encoder and transformer forward pre-hooks, a wrapper of
    `vae.decode`), per-step wall times from `callback_on_step_end`, which forwards reached the last block, the
    final latents, and (FirstBlockCache) the relative first-block residual change it decided on, per forward."""

    def __init__(self, pipe: Any, clock: StageClock) -> None:
        self.pipe, self.clock = pipe, clock
        self.step_ends: list[float] = []
        self.first_forward: float | None = None
        self.last_block_calls: list[int] = []  # per step: forwards that reached the last block
        self.forwards: list[int] = []  # per step: transformer forwards
        self.fbc_diffs: list[list[float | None]] = []  # per step, per forward (None: nothing to compare with yet)
        self.latents: torch.Tensor | None = None
        self.timer: LayerTimer | None = None  # set by run_variant with --attention-times
        self.attention: list[dict[str, float] | None] = []
        self._last = 0
        self._fwd = 0
        self._diffs: list[float | None] = []
        tr = pipe.transformer
        self._handles = [
            pipe.text_encoder.register_forward_pre_hook(lambda m, a: clock.enter("text encoding")),
            tr.register_forward_pre_hook(self._transformer_pre),
            # the last block's feed-forward, not the block: Diffusers' cache hooks wrap a block's forward, so a
            # pre-hook on the block fires even when the cache skips it
            tr.blocks[-1].ffn.register_forward_pre_hook(self._last_block),
        ]
        self._fbc = self._watch_fbc(tr)
        decode = pipe.vae.decode

        def wrapped(*args, **kwargs):
            clock.enter("decode")
            return decode(*args, **kwargs)

        pipe.vae.decode = wrapped

    def _watch_fbc(self, model: torch.nn.Module) -> list[Any]:
        """Wrap FirstBlockCache's decision (instance attribute) to record the value it compares with `threshold`:
        mean |r - r_prev| / mean |r_prev| of the first block's residual (Diffusers' formula, recomputed)."""
        try:
            from diffusers.hooks.first_block_cache import FBCHeadBlockHook
        except ImportError:
            return []
        hooks = []
        for module in model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for hook in (getattr(registry, "hooks", None) or {}).values():
                if isinstance(hook, FBCHeadBlockHook):
                    hooks.append(hook)
        for hook in hooks:
            decide = hook._should_compute_remaining_blocks

            def recorded(residual, hook=hook, decide=decide):
                prev = hook.state_manager.get_state().head_block_residual
                self._diffs.append(None if prev is None else
                                   ((residual - prev).abs().mean() / prev.abs().mean()).item())
                return decide(residual)

            hook._should_compute_remaining_blocks = recorded
        return hooks

    def _transformer_pre(self, module, args) -> None:
        self.clock.enter("denoising")
        self._fwd += 1
        if self.first_forward is None:
            self.first_forward = self.clock.now()

    def _last_block(self, module, args) -> None:
        self._last += 1

    def on_step_end(self, pipe, i: int, t, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.step_ends.append(self.clock.now())
        self.last_block_calls.append(self._last)
        self.forwards.append(self._fwd)
        self.fbc_diffs.append(self._diffs)
        self.attention.append(self.timer.collect() if self.timer is not None else None)
        if "latents" in kwargs:
            self.latents = kwargs["latents"].detach().float().cpu()
        self._last = self._fwd = 0
        self._diffs = []
        return kwargs

    def step_seconds(self) -> list[float]:
        starts = [self.first_forward, *self.step_ends[:-1]]
        return [end - start for start, end in zip(starts, self.step_ends)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        for hook in self._fbc:
            hook.__dict__.pop("_should_compute_remaining_blocks", None)
        self.pipe.vae.__dict__.pop("decode", None)


# ------------------------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------------------------
MODEL_CHOICES = (*MODEL_NAMES[:1], "wan2.1-14b", *MODEL_NAMES[1:])


def e2e_preset(model: str) -> ModelPreset:
    """The highres presets plus Wan2.1-T2V-14B (its real transformer config, the same VAE and UMT5-XXL; native
    720x1280x81)."""
    import dataclasses

    known = presets()
    if model == "wan2.1-14b":
        return dataclasses.replace(known["wan2.1-1.3b"], transformer=dict(MODELS["wan2.1-14b"]["config"]),
                                   height=720, width=1280, base_height=720, base_width=1280)
    if model not in known:
        raise ValueError(f"model must be one of {', '.join(MODEL_CHOICES)}, got {model!r}")
    return known[model]


def _size(text: str | tuple | None) -> tuple[int, int, int] | None:
    if text is None or isinstance(text, tuple):
        return text
    try:
        h, w, f = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size is HxWxF (e.g. 480x832x21), got {text!r}") from None
    return h, w, f


@dataclass
class E2ESettings:
    model: str = "wan2.1-1.3b"
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int = 50
    target_steps: int = 50
    guidance: float = 5.0
    seed: int = 0
    device: str = "cuda"
    variants: tuple[str, ...] = ("stock", "dense", "radial", "radial+fbc")
    scale_schedule: bool = True
    warmup_steps: int = 1
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE
    run_dense_timesteps: int | None = None  # the short runs' dense_timesteps (None: scaled, or as given)
    warmup_size: tuple[int, int, int] | None = None  # HxWxF of the untimed warm-ups (None: the run's size)
    decode: str = "all"  # "first": only the first variant decodes, the others reuse its time; "none"
    assume_cached_share: float | None = None  # the projection's cached share instead of the measured one
    borrow_dense: str | None = None  # a variant whose dense full-step median stands in where a row has none
    build_device: str | None = None  # where the random weights are filled (None: `device`)
    attention_times: bool = False  # CUDA events around every attention call of a method's rows, per step

    def __post_init__(self) -> None:
        preset = e2e_preset(self.model)
        if self.steps < 1 or self.target_steps < 1:
            raise ValueError(f"steps and target_steps must be >= 1, got {self.steps}, {self.target_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.variants:
            raise ValueError("variants must name at least one variant")
        if self.decode not in ("all", "first", "none"):
            raise ValueError(f"decode must be 'all', 'first' or 'none', got {self.decode!r}")
        if self.run_dense_timesteps is not None and self.run_dense_timesteps < 0:
            raise ValueError(f"run_dense_timesteps must be >= 0, got {self.run_dense_timesteps}")
        if self.assume_cached_share is not None and not 0.0 <= self.assume_cached_share <= 1.0:
            raise ValueError(f"assume_cached_share must be in [0, 1], got {self.assume_cached_share}")
        if self.borrow_dense is not None and self.borrow_dense not in self.variants:
            raise ValueError(f"borrow_dense must be one of the variants {list(self.variants)}, got {self.borrow_dense!r}")
        self.warmup_size = _size(self.warmup_size)
        # the e2e default geometry is the model's native size (480x832x81 for Wan2.1-1.3B, 720x1280x81 for 14B)
        self.height = self.height or preset.base_height
        self.width = self.width or preset.base_width
        self.frames = self.frames or preset.frames


def _sdpa_context(cuda: bool):
    from contextlib import nullcontext

    from .step import sdpa_backend

    return sdpa_backend("cudnn") if cuda else nullcontext()


def _generate(pipe, settings: E2ESettings, steps: int, callback=None, output_type: str = "pt",
              size: tuple[int, int, int] | None = None):
    h, w, f = size or (settings.height, settings.width, settings.frames)
    return pipe(
        settings.prompt, negative_prompt=settings.negative_prompt, height=h, width=w,
        num_frames=f, num_inference_steps=steps, guidance_scale=settings.guidance,
        max_sequence_length=e2e_preset(settings.model).max_sequence_length,
        generator=torch.Generator(device="cpu").manual_seed(settings.seed), output_type=output_type,
        callback_on_step_end=callback,
    ).frames


def _install(pipe, variant: Variant, options: dict[str, Any]) -> Any:
    import diffattn

    diffattn.remove(pipe)
    if not variant.methods:
        return None
    if len(variant.methods) == 1:
        diffattn.apply(pipe, variant.methods[0], **options.get(variant.methods[0], {}))
    else:
        diffattn.apply(pipe, variant.methods, **{n: options.get(n, {}) for n in variant.methods})
    return diffattn.api.installed(pipe.transformer).runtime


def _kind(dense: bool, cached: bool) -> str:
    return f"{'dense' if dense else 'sparse'}/{'cached' if cached else 'full'}"


def project(steps: list[dict[str, Any]], dense_at_target: set[int], target: int, *,
            cached_share: float | None = None, borrowed: dict[str, float] | None = None,
            cached_at_target: set[int] | None = None) -> dict[str, Any]:
    """The denoising time of a `target`-step generation from the measured steps (module docstring).

    `cached_share` replaces the measured share of cached steps (an assumption the report states); `borrowed`
    gives per-kind medians of another variant, used where this row did not measure a kind (before substituting
    one of its own kinds). `cached_at_target`: the steps a content-independent cache skips at the target
    (`cache_schedule`); the kind counts are then exact instead of a share."""
    def med(rows):
        return statistics.median(r["seconds"] for r in rows) if rows else None

    kinds = {(d, c): [s for s in steps if s["dense"] == d and s["cached"] == c] for d in (True, False) for c in (True, False)}
    measured_share = sum(s["cached"] for s in steps) / len(steps)
    share = measured_share if cached_share is None else cached_share
    n_dense = len(dense_at_target)
    total, used, terms = 0.0, {}, []
    if cached_at_target is not None:
        share = len(cached_at_target) / target
    for dense, n in ((True, n_dense), (False, target - n_dense)):
        phase = {i for i in range(target) if (i in dense_at_target) == dense}
        n_cached = len(phase & cached_at_target) if cached_at_target is not None else round(share * n)
        for cached, count in ((True, n_cached), (False, n - n_cached)):
            if not count:
                continue
            kind = _kind(dense, cached)
            t = med(kinds[(dense, cached)])
            if t is None and borrowed and borrowed.get(kind) is not None:
                t = borrowed[kind]
                used[kind] = "borrowed"
            if t is None:  # kind not measured: the same cache state with the other attention kind, else any step
                t = med(kinds[(not dense, cached)]) or med(steps)
                used[kind] = "substituted"
            total += count * t
            terms.append({"kind": kind, "count": count, "median_s": t})
    return {"denoise_s": total, "dense_steps": n_dense, "cached_share": share, "measured_cached_share": measured_share,
            "cached_share_assumed": cached_share is not None and cached_at_target is None,
            "cached_from_schedule": cached_at_target is not None, "substituted": used, "terms": terms,
            "median_s": {_kind(d, c): med(v) for (d, c), v in kinds.items()}}


def formula(p: dict[str, Any]) -> str:
    """`text + n x median (kind) + ... + decode = total`, as printed beside each row."""
    terms = " + ".join(f"{t['count']} x {t['median_s']:.3f} ({t['kind']}"
                       + (f", {p['substituted'][t['kind']]}" if t["kind"] in p["substituted"] else "") + ")"
                       for t in p["terms"])
    return f"{p['text_s']:.2f} + {terms} + {p['decode_s']:.2f} = {p['total_s']:.1f} s"


def _latent_psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of final latents against the reference's, with the reference's value range as the peak."""
    mse = torch.mean((x.float() - ref.float()) ** 2).item()
    if mse == 0.0:
        return math.inf
    rng = (ref.max() - ref.min()).item()
    return 10.0 * math.log10(rng * rng / mse)


def run_variant(pipe, settings: E2ESettings, variant: Variant, cuda: bool, *, decode: bool = True,
                warmed: set | None = None) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    n_steps = variant.steps or settings.steps
    options, target_dense_first = (_scaled_options(variant, n_steps, settings.target_steps, settings.run_dense_timesteps)
                                   if settings.scale_schedule or settings.run_dense_timesteps is not None
                                   else (dict(variant.options), None))
    key = repr((variant.methods, options))
    if settings.warmup_steps and variant.methods and (warmed is None or key not in warmed):
        # untimed: compiles the method's kernels (its sparse path: no dense warm-up) and plans; no VAE decode
        warm = {n: {**o, **({"dense_timesteps": 0} if n in ("radial", "rectified") or "dense_timesteps" in o else {})}
                for n, o in options.items()}
        _install(pipe, variant, warm)
        with _sdpa_context(cuda):
            _generate(pipe, settings, settings.warmup_steps, output_type="latent", size=settings.warmup_size)
        if warmed is not None:
            warmed.add(key)
    runtime = _install(pipe, variant, options)
    if variant.cache is not None:
        enable_cache(pipe, variant.cache, method=variant.methods or None, **variant.cache_options)
    clock = StageClock(cuda)
    probe = Probe(pipe, clock)
    if settings.attention_times and runtime is not None:
        import diffattn

        probe.timer = LayerTimer(runtime, cuda)
        diffattn.api.replace_runtime(pipe, probe.timer)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = clock.now()
        clock.enter("text encoding")
        with _sdpa_context(cuda):
            frames = _generate(pipe, settings, n_steps, probe.on_step_end,
                               output_type="pt" if decode else "latent")
        clock.close()
        wall = time.perf_counter() - t0
    finally:
        probe.detach()
        if variant.cache is not None:
            pipe.transformer.disable_cache()
    run_dense = dense_steps(runtime, n_steps)
    seconds = probe.step_seconds()
    steps = [{"step": i, "seconds": s, "dense": i in run_dense,
              "cached": probe.last_block_calls[i] < probe.forwards[i], "forwards": probe.forwards[i],
              "last_block": probe.last_block_calls[i], "fbc_diffs": probe.fbc_diffs[i],
              "attention_s": probe.attention[i]}
             for i, s in enumerate(seconds)]
    stages = {st.name: st for st in clock.stages}
    text_s = stages["text encoding"].seconds if "text encoding" in stages else 0.0
    decode_s = stages["decode"].seconds if "decode" in stages else 0.0
    target_runtime = runtime
    if target_dense_first is not None:
        from ..registry import build_method

        target_runtime = build_method(variant.methods[0], **variant.options[variant.methods[0]])
    row = {
        "variant": variant.label, "methods": variant.methods, "options": options, "cache": variant.cache,
        "cache_options": variant.cache_options, "steps_run": n_steps, "wall_s": wall, "decoded": decode,
        "stages": {n: {"seconds": st.seconds, "peak_allocated_bytes": st.peak_allocated_bytes,
                       "peak_reserved_bytes": st.peak_reserved_bytes} for n, st in stages.items()},
        "peak_allocated_bytes": max((st.peak_allocated_bytes or 0) for st in clock.stages) if cuda else None,
        "steps": steps, "text_s": text_s, "decode_s": decode_s,
        "forwards": sum(probe.forwards), "skipped_forwards": sum(f - b for f, b in zip(probe.forwards,
                                                                                     probe.last_block_calls)),
        "cached_steps": sum(s["cached"] for s in steps),
        "cache_schedule_run": (None if (sched := cache_schedule(variant.cache, variant.cache_options, n_steps)) is None
                               else sorted(sched)),
        "_dense_at_target": sorted(dense_steps(target_runtime, settings.target_steps)),
    }
    return row, (frames if decode else None), probe.latents


def _finish_projections(report: dict[str, Any], settings: E2ESettings) -> None:
    """Per row: the projection to the target step count (and, for a cache row, the same medians without the
    cache), decode time from the first decoded row where the row did not decode."""
    rows = [r for r in report["rows"] if "error" not in r]
    decoded = next((r for r in rows if r["decoded"]), None)
    borrowed = None
    if settings.borrow_dense is not None:
        lender = next((r for r in rows if r["variant"] == settings.borrow_dense), None)
        if lender is not None:
            meds = project(lender["steps"], set(lender["_dense_at_target"]), settings.target_steps)["median_s"]
            borrowed = {"dense/full": meds["dense/full"], "dense/cached": meds["dense/cached"]}
    for r in rows:
        decode_s = r["decode_s"] if r["decoded"] else (decoded["decode_s"] if decoded else 0.0)
        r["decode_from"] = r["variant"] if r["decoded"] else (decoded["variant"] if decoded else None)
        dense_at = set(r["_dense_at_target"])
        share = settings.assume_cached_share if r["cache"] is not None else None
        lend = borrowed if r["variant"] != settings.borrow_dense else None
        schedule = None if share is not None else cache_schedule(r["cache"], r["cache_options"], settings.target_steps)
        p = project(r["steps"], dense_at, settings.target_steps, cached_share=share, borrowed=lend,
                    cached_at_target=schedule)
        p.update(text_s=r["text_s"], decode_s=decode_s, total_s=r["text_s"] + p["denoise_s"] + decode_s)
        p["formula"] = formula(p)
        r["projection"] = p
        r["wall_with_decode_s"] = r["wall_s"] + (0.0 if r["decoded"] else decode_s)
        if r["cache"] is not None and any(not s["cached"] for s in r["steps"]):
            q = project(r["steps"], dense_at, settings.target_steps, cached_share=0.0, borrowed=lend)
            q.update(text_s=r["text_s"], decode_s=decode_s, total_s=r["text_s"] + q["denoise_s"] + decode_s)
            q["formula"] = formula(q)
            r["projection_without_cache"] = q
    if rows:
        base = rows[0]
        for r in rows:
            r["speedup_measured"] = (base["wall_with_decode_s"] / r["wall_with_decode_s"]
                                     if r["steps_run"] == base["steps_run"] else None)
            r["speedup_projected"] = base["projection"]["total_s"] / r["projection"]["total_s"]
            if "projection_without_cache" in r:
                r["speedup_projected_without_cache"] = base["projection"]["total_s"] / r["projection_without_cache"]["total_s"]


def run(settings: E2ESettings, dump=None) -> dict[str, Any]:
    from .metrics import psnr

    dump = dump or (lambda report: None)
    cuda = settings.device.startswith("cuda")
    variants = [parse_variant(v) for v in settings.variants]
    report: dict[str, Any] = {
        "settings": asdict(settings), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name() if cuda else settings.device,
        "versions": {"torch": torch.__version__}, "rows": [],
    }
    try:
        import diffusers
        import triton

        report["versions"].update(diffusers=diffusers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    t = time.perf_counter()
    built = build_pipeline(settings.model, seed=settings.seed, preset=e2e_preset(settings.model),
                           device=settings.build_device or settings.device)
    from diffusers import WanPipeline

    src = built.pipe
    pipe = WanPipeline(tokenizer=src.tokenizer, text_encoder=src.text_encoder, transformer=src.transformer,
                       vae=src.vae, scheduler=src.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(settings.device)
    report["build_s"] = time.perf_counter() - t
    report["parameters"] = built.parameters
    if settings.warmup_steps:
        t = time.perf_counter()
        with _sdpa_context(cuda):
            _generate(pipe, settings, settings.warmup_steps, size=settings.warmup_size)  # stock, with the decode
        report["warmup_s"] = time.perf_counter() - t
    dump(report)
    baseline = None  # (label, frames or None, latents)
    warmed: set = set()
    for i, variant in enumerate(variants):
        logger.info("diffattn e2e: %s ...", variant.label)
        decode = settings.decode == "all" or (settings.decode == "first" and i == 0)
        try:
            row, frames, latents = run_variant(pipe, settings, variant, cuda, decode=decode, warmed=warmed)
        except Exception as exc:  # one variant's failure (a method's error, out of memory) is a result
            logger.exception("diffattn e2e: %s failed", variant.label)
            report["rows"].append({"variant": variant.label, "error": f"{type(exc).__name__}: {exc}"})
            import diffattn

            diffattn.remove(pipe)
            if variant.cache is not None:
                try:
                    pipe.transformer.disable_cache()
                except Exception:  # noqa: BLE001 - the cache may not have been enabled
                    pass
            if cuda:
                torch.cuda.empty_cache()
            dump(report)
            continue
        if frames is not None:
            frames = frames[0].float().cpu().permute(0, 2, 3, 1)  # [F, H, W, C] in [0, 1]
            row["finite"] = bool(torch.isfinite(frames).all())
        else:
            row["finite"] = bool(latents is not None and torch.isfinite(latents).all())
        if baseline is None:
            baseline = (variant.label, frames, latents)
        row["psnr_vs"] = baseline[0]
        row["psnr_db"] = psnr(frames, baseline[1]) if frames is not None and baseline[1] is not None else None
        row["latent_psnr_db"] = (_latent_psnr(latents, baseline[2])
                                 if latents is not None and baseline[2] is not None else None)
        report["rows"].append(row)
        _finish_projections(report, settings)
        dump(report)
    import diffattn

    diffattn.remove(pipe)
    _finish_projections(report, settings)
    dump(report)
    return report


# ------------------------------------------------------------------------------------------------------------------
# output, CLI
# ------------------------------------------------------------------------------------------------------------------
def _db(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows = [r for r in report["rows"] if "error" not in r]
    first = rows[0]["variant"] if rows else "-"
    lines = [
        f"e2e: {s['model']} {s['height']}x{s['width']}x{s['frames']}, {s['steps']} steps run "
        f"(projected to {s['target_steps']}), CFG {s['guidance']}, {report['device']}, {report['date']}",
        "| variant | steps | wall (s) | text (s) | denoise (s) | decode (s) | peak GiB | skipped fwd | x vs first | "
        f"PSNR vs {first} (dB) | latent PSNR (dB) | {s['target_steps']}-step projected (s) | x projected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:160]} |")
            continue
        st = r["stages"]
        sec = lambda n: f"{st[n]['seconds']:.2f}" if n in st else "—"  # noqa: E731
        x = "—" if r.get("speedup_measured") is None else f"{r['speedup_measured']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['steps_run']} | {r['wall_s']:.2f} | {sec('text encoding')} | {sec('denoising')} | "
            f"{sec('decode') if r['decoded'] else 'from ' + str(r['decode_from'])} | {gib(r['peak_allocated_bytes'])} | "
            f"{r['skipped_forwards']}/{r['forwards']} | {x} | {_db(r['psnr_db'])} | {_db(r['latent_psnr_db'])} | "
            f"{r['projection']['total_s']:.1f} | {r['speedup_projected']:.2f} |"
        )
    lines.append("projection per row (text + n x median step of each kind + decode), dense steps at the target, "
                 "cached share:")
    for r in rows:
        p = r["projection"]
        share = f"{p['cached_share']:.2f}" + (" (assumed)" if p["cached_share_assumed"] else "") + (
            " (the cache's fixed schedule at the target)" if p.get("cached_from_schedule") else "")
        lines.append(f"  {r['variant']}: {p['formula']}; {p['dense_steps']} dense of {s['target_steps']}, cached "
                     f"share {share}")
        if "projection_without_cache" in r:
            q = r["projection_without_cache"]
            lines.append(f"    without the cache: {q['formula']} ({r['speedup_projected_without_cache']:.2f}x)")
        diffs = [d for st in r["steps"] for d in st.get("fbc_diffs") or [] if d is not None]
        if diffs:
            lines.append(f"    FirstBlockCache residual change per forward: min {min(diffs):.3f}, median "
                         f"{statistics.median(diffs):.3f}, max {max(diffs):.3f} (threshold "
                         f"{r['cache_options'].get('threshold', 'default')}); cached steps {r['cached_steps']}")
        if r.get("cache_schedule_run") is not None:
            ran = [st["step"] for st in r["steps"] if st["cached"]]
            lines.append(f"    cached steps run {ran}, the cache's schedule says {r['cache_schedule_run']}"
                         + ("" if ran == r["cache_schedule_run"] else "  (MISMATCH)"))
        if any(st.get("attention_s") for st in r["steps"]):
            lines.append("    attention per step (s): " + "; ".join(
                f"{st['step']}: self {st['attention_s'].get('self', 0.0):.2f} (layer 0 "
                f"{st['attention_s'].get('self_layer0', 0.0):.2f}), cross {st['attention_s'].get('cross', 0.0):.2f}, "
                f"rest {st['seconds'] - sum(v for k, v in st['attention_s'].items() if k != 'self_layer0'):.2f}"
                for st in r["steps"] if st.get("attention_s")))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffattn bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan2.1-1.3b", choices=MODEL_CHOICES)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native 480, 14B 720)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native 832, 14B 1280)")
    p.add_argument("--frames", type=int, default=None, help="default 81")
    p.add_argument("--steps", type=int, default=50, help="denoising steps actually run per variant (VARIANT@N overrides)")
    p.add_argument("--target-steps", type=int, default=50, help="step count the projection is for")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--build-device", default=None, help="where random weights are filled (default: --device)")
    p.add_argument("--variants", nargs="+", default=list(E2ESettings.variants),
                   help="stock | METHOD[:k=v,...][+METHOD2][+CACHE[:k=v,...]][@STEPS]; caches: " + ", ".join(CACHES))
    p.add_argument("--no-scale-schedule", action="store_true", help="run the methods' warm-up schedules unscaled")
    p.add_argument("--run-dense-timesteps", type=int, default=None,
                   help="the short runs' dense_timesteps for methods with a warm-up schedule (the projection keeps "
                        "the method's own schedule at --target-steps)")
    p.add_argument("--warmup-steps", type=int, default=1,
                   help="untimed: a stock generation of this many steps first, and per method a run without "
                        "decode (0: none)")
    p.add_argument("--warmup-size", default=None, metavar="HxWxF", help="geometry of the warm-ups (default: the run's)")
    p.add_argument("--decode", default="all", choices=("all", "first", "none"),
                   help="first: only the first variant decodes, the others reuse its decode time (same VAE, same "
                        "size) and are compared by latent PSNR; none: no decode (the projections leave it out)")
    p.add_argument("--assume-cached-share", type=float, default=None,
                   help="project cache rows with this share of cached steps instead of the measured one")
    p.add_argument("--borrow-dense", default=None, metavar="VARIANT",
                   help="a variant whose dense step medians stand in where a row ran no dense step")
    p.add_argument("--attention-times", action="store_true",
                   help="time every attention call of the method rows (CUDA events), per step: self-attention, "
                        "its layer 0, cross-attention, and the rest of the step")
    p.add_argument("--json", default=None, help="write the report here (rewritten as each variant ends)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = E2ESettings(
            model=args.model, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
            target_steps=args.target_steps, guidance=args.guidance, seed=args.seed, device=args.device,
            variants=tuple(args.variants), scale_schedule=not args.no_scale_schedule, warmup_steps=args.warmup_steps,
            run_dense_timesteps=args.run_dense_timesteps, warmup_size=args.warmup_size, decode=args.decode,
            assume_cached_share=args.assume_cached_share, borrow_dense=args.borrow_dense,
            build_device=args.build_device, attention_times=args.attention_times,
        )
        for v in settings.variants:
            parse_variant(v)
    except ValueError as exc:
        print(f"diffattn bench e2e: {exc}", file=sys.stderr)
        return 2

    def dump(report):
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=2, default=str)

    report = run(settings, dump)
    print(render(report))
    return 0 if all("error" not in r for r in report["rows"]) else 1

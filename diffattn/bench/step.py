"""`diffattn bench step`: one denoising step of a full-size video transformer (real config, random weights, bf16)
with dense attention (cuDNN SDPA and SDPA's flash backend, FA2-class) and with a sparse method, on a GPU.

Reports step time, the attention share of it (CUDA events around every self/joint attention call), the 50-step
projection with the method's dense warm-up, and the attention-output error of the method against dense on the same
inputs, per layer type. Random weights give near-uniform attention maps, so the errors are an upper-bound style
sanity check, not a quality claim (quality is measured on trained models by `diffattn bench quality`).

`--pipeline` times denoising steps as a pipeline runs them instead of bare forwards: each step is a conditional and
an unconditional forward (CFG as separate passes, like Diffusers' Wan pipelines) inside `model.cache_context(...)`
with the step index advancing, over whole periods of the method's step schedule (FreeSwim's `cache_steps`: steps
where the full branch runs and steps where its cached cross-attention is reused). `--variant` runs several option
sets of one method in the same process; `--vae` adds the peak memory of the Wan VAE at the shape.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .harness import write_json
from .models import MODELS
logger = logging.getLogger("diffattn")

def parse_shape(text: str) -> tuple[int, int, int]:
    """`HxWxF` in pixels and frames, e.g. 768x1280x69."""
    try:
        h, w, f = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be HEIGHTxWIDTHxFRAMES, got {text!r}") from None
    return h, w, f


def build_model(name: str, device: str) -> torch.nn.Module:
    """The model with random weights, built directly on `device` in bf16 (no fp32 copy)."""
    import diffusers

    spec = MODELS[name]
    cls = getattr(diffusers, spec["class"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(**spec["config"])
    finally:
        torch.set_default_dtype(previous)
    if hasattr(model, "rope") and spec["class"] == "WanTransformer3DModel":
        cfg = spec["config"]  # rebuild the RoPE tables in float32, as a normally loaded model has them
        with torch.device(device):
            model.rope = type(model.rope)(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"])
    return model.eval().requires_grad_(False)


def make_inputs(name: str, shape: tuple[int, int, int], device: str, seed: int = 0) -> dict[str, Any]:
    spec = MODELS[name]
    h, w, f = shape
    t_c, s_c = spec["vae"]
    gen = torch.Generator(device=device).manual_seed(seed)
    frames = (f - 1) // t_c + 1
    latent = torch.randn(1, 16, frames, h // s_c, w // s_c, generator=gen, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, spec["text_len"], spec["text_dim"], generator=gen, device=device, dtype=torch.bfloat16)
    inputs: dict[str, Any] = {"hidden_states": latent, "encoder_hidden_states": text}
    if spec["class"] == "WanTransformer3DModel":
        inputs["timestep"] = torch.tensor([700.0], device=device)
    else:
        mask = torch.zeros(1, spec["text_len"], dtype=torch.long, device=device)
        mask[:, :100] = 1  # a typical prompt: ~100 real tokens, the rest padding
        inputs.update(
            timestep=torch.tensor([700.0], device=device),
            encoder_attention_mask=mask,
            pooled_projections=torch.randn(1, 768, generator=gen, device=device, dtype=torch.bfloat16),
            guidance=torch.tensor([6000.0], device=device, dtype=torch.bfloat16),
        )
    return inputs


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device | str, reset: bool = False) -> tuple[int | None, int | None, int | None]:
    """(allocated, peak allocated, peak reserved by the caching allocator) bytes on a CUDA device, resetting the
    peaks after reading if asked; Nones elsewhere."""
    if torch.device(device).type != "cuda":
        return None, None, None
    out = (torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device),
           torch.cuda.max_memory_reserved(device))
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _empty_cache(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class AttentionTimer:
    """Wraps a method's `attend` with CUDA events (no synchronisation inside the step); on the CPU (tests) with the
    host clock, which is exact there because CPU ops are synchronous."""

    def __init__(self, method, cuda: bool = True) -> None:
        self.method = method
        self.cuda = cuda
        self.events: list[tuple[str, Any, Any]] = []
        self.name = getattr(method, "name", "?")

    def attend(self, call):
        if not self.cuda:
            t0 = time.perf_counter()
            out = self.method.attend(call)
            self.events.append((call.role, t0, time.perf_counter()))
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.method.attend(call)
        end.record()
        self.events.append((call.role, start, end))
        return out

    def collect(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for role, start, end in self.events:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            totals[role] = totals.get(role, 0.0) + seconds
        self.events.clear()
        return totals


class ErrorProbe:
    """Runs the method and dense on every self/joint call; records relative errors per layer type."""

    def __init__(self, method, layer_type) -> None:
        self.method = method
        self.layer_type = layer_type
        self.errors: dict[str, list[float]] = {}
        self.name = getattr(method, "name", "?")

    def attend(self, call):
        from ..methods.base import dense_attention

        out = self.method.attend(call)
        if call.role in ("self", "joint"):
            ref = dense_attention(call).float()
            parts = {"video": call.visual_slice()}
            if call.role == "joint" and call.text_len:
                parts["text"] = call.text_slice()
            for part, sl in parts.items():
                o, r = out[:, :, sl].float(), ref[:, :, sl]
                err = ((o - r).norm() / r.norm().clamp_min(1e-12)).item()
                self.errors.setdefault(f"{self.layer_type(call)} {part} queries", []).append(err)
        return out


def _layer_type(family: str, num_dual: int):
    def classify(call) -> str:
        if family == "hunyuan_video":
            return "dual-stream" if call.layer.index < num_dual else "single-stream"
        return "self-attention"

    return classify


@contextmanager
def sdpa_backend(name: str):
    """Prefer cuDNN (or flash) for every SDPA call, falling back where a call's mask rules it out (HunyuanVideo's
    token refiner and padded joint attention: flash takes no mask, so mem-efficient runs there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    }[name]
    with sdpa_kernel(order + [SDPBackend.MATH], set_priority=True):
        yield


@dataclass
class StepResult:
    variant: str
    step_s: float
    attention_s: float
    cross_s: float


def time_step(model, inputs, variant: str, repeats: int, method: str, options: dict) -> StepResult:
    import diffattn

    backend = "flash" if variant == "dense-flash" else "cudnn"
    if variant.startswith("dense"):
        diffattn.apply(model, "dense")
    else:
        diffattn.apply(model, method, **options)
    state = diffattn.api.installed(model)
    device = inputs["hidden_states"].device
    timer = AttentionTimer(state.runtime, cuda=device.type == "cuda")
    diffattn.api.replace_runtime(model, timer)
    steps, attn, cross = [], [], []
    try:
        with torch.no_grad(), sdpa_backend(backend):
            for i in range(repeats + 1):
                _sync(device)
                t0 = time.perf_counter()
                model(**inputs, return_dict=False)
                _sync(device)
                elapsed = time.perf_counter() - t0
                totals = timer.collect()
                if i == 0:
                    continue  # warm-up: compilation, mask and index building
                steps.append(elapsed)
                attn.append(totals.get("self", 0.0) + totals.get("joint", 0.0))
                cross.append(totals.get("cross", 0.0) + totals.get("cross_image", 0.0))
    finally:
        diffattn.remove(model)
    return StepResult(variant, statistics.median(steps), statistics.median(attn), statistics.median(cross))


def method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options for a sparse step: a bare forward is step 0, so a method with a dense warm-up (`dense_timesteps`)
    gets it switched off; methods without that option are left as they are."""
    import dataclasses

    import diffattn

    cfg_cls = diffattn.registry.get_method(method).config_cls
    if "dense_timesteps" in {f.name for f in dataclasses.fields(cfg_cls)}:
        return {**options, "dense_timesteps": 0}
    return dict(options)


def schedule_period(method: str, options: dict[str, Any]) -> int:
    """Steps after which a method's per-step work repeats (its spec's `schedule_period`: FreeSwim's `cache_steps`;
    dense and the others: 1)."""
    from ..registry import get_method

    spec = get_method(method)
    return spec.schedule_period(spec.config_cls.from_options(**options))


@dataclass
class PipelineResult:
    """Per-step time of one variant, averaged over whole periods of its schedule (CFG: cond + uncond per step)."""

    variant: str
    period: int
    step_s: float  # median over periods of (period time / period), cond + uncond forwards
    cond_step_s: float  # the same, conditional forwards only (no CFG)
    forwards: dict[str, float]  # median seconds per forward kind (dense, dual, cached, window, ...)
    schedule: list[list[str]]  # per timed step: the kind of each forward (cond, uncond)
    step_times: list[list[float]]  # per timed step: seconds of each forward (cond, uncond)
    attention_s: float  # self/joint attention per step (CUDA events), mean over the timed steps
    cross_s: float  # cross-attention per step (FreeSwim's cached steps: the cache read back)
    peak_bytes: int | None  # torch.cuda.max_memory_allocated over the variant (weights included)
    peak_reserved_bytes: int | None  # torch.cuda.max_memory_reserved (what the caching allocator took from the GPU)
    base_bytes: int | None  # allocated before the variant ran (weights + inputs)
    cache_bytes: int = 0  # what the method holds between steps (FreeSwim's cross-attention cache)
    cache_device: str = ""


def _run_step(model, inputs: dict[str, Any], name: str, step: int, num_steps: int) -> Any:
    timestep = torch.full_like(inputs["timestep"], 1000.0 * (1.0 - step / max(num_steps, 1)))
    with model.cache_context(name, step_index=step, num_inference_steps=num_steps):
        return model(**{**inputs, "timestep": timestep}, return_dict=False)


def _held_bytes(runtime: Any) -> tuple[int, str]:
    cache = getattr(runtime, "cache", None)
    if not isinstance(cache, dict) or not cache:
        return 0, ""
    tensors = [t for t in cache.values() if isinstance(t, torch.Tensor)]
    devices = sorted({str(t.device) for t in tensors})
    return sum(t.numel() * t.element_size() for t in tensors), ",".join(devices)


def time_pipeline(
    model,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    variant: str,
    method: str,
    options: dict[str, Any],
    periods: int = 1,
    num_steps: int = 50,
    warmup: bool = True,
    backend: str = "cudnn",
) -> PipelineResult:
    """Time whole periods of denoising steps with the step index advancing as in a pipeline.

    Step 0 is an untimed warm-up forward (compilation, plans, pinned host memory) when `warmup`; the timed steps are
    `period * (1 + p) ... period * (2 + p) - 1` for each period p, so each period starts where the schedule starts
    (FreeSwim: the full branch runs, then its cache is reused). `uncond=None` runs without CFG.
    """
    import diffattn

    device = cond["hidden_states"].device
    cuda = device.type == "cuda"
    dense = variant.startswith("dense")
    diffattn.apply(model, "dense" if dense else method, **({} if dense else options))
    state = diffattn.api.installed(model)
    period = 1 if dense else schedule_period(method, options)
    timer = AttentionTimer(state.runtime, cuda=cuda)
    diffattn.api.replace_runtime(model, timer)
    passes = [("cond", cond)] + ([("uncond", uncond)] if uncond is not None else [])
    base = peak = reserved = None
    per_period: list[tuple[float, float]] = []
    kinds: dict[str, list[float]] = {}
    schedule: list[list[str]] = []
    step_times: list[list[float]] = []
    attn, cross = [], []
    try:
        with torch.no_grad(), sdpa_backend(backend):
            _sync(device)
            base, _, _ = _memory(device, reset=True)
            if warmup:
                _run_step(model, cond, "cond", 0, num_steps)
                _sync(device)
                timer.collect()
            for p in range(periods):
                total = cond_total = 0.0
                for step in range(period * (1 + p), period * (2 + p)):
                    kinds_of_step, times_of_step = [], []
                    for name, inputs in passes:
                        _sync(device)
                        t0 = time.perf_counter()
                        _run_step(model, inputs, name, step, num_steps)
                        _sync(device)
                        elapsed = time.perf_counter() - t0
                        ctx = state.slot.current
                        kind = "dense" if dense else str(ctx.extras.get("freeswim_mode", method))
                        kinds.setdefault(kind, []).append(elapsed)
                        kinds_of_step.append(kind)
                        times_of_step.append(elapsed)
                        total += elapsed
                        cond_total += elapsed if name == "cond" else 0.0
                    totals = timer.collect()
                    attn.append(totals.get("self", 0.0) + totals.get("joint", 0.0))
                    cross.append(totals.get("cross", 0.0) + totals.get("cross_image", 0.0))
                    schedule.append(kinds_of_step)
                    step_times.append(times_of_step)
                per_period.append((total / period, cond_total / period))
            cache_bytes, cache_device = _held_bytes(state.runtime)
            _sync(device)
            _, peak, reserved = _memory(device)
    finally:
        diffattn.remove(model)
        del state, timer
        gc.collect()  # the removed method can sit in a reference cycle; free its cache before the next variant
    return PipelineResult(
        variant=variant,
        period=period,
        step_s=statistics.median(t for t, _ in per_period),
        cond_step_s=statistics.median(c for _, c in per_period),
        forwards={k: statistics.median(v) for k, v in kinds.items()},
        schedule=schedule,
        step_times=step_times,
        attention_s=statistics.mean(attn),
        cross_s=statistics.mean(cross),
        peak_bytes=peak,
        peak_reserved_bytes=reserved,
        base_bytes=base,
        cache_bytes=cache_bytes,
        cache_device=cache_device,
    )


def measure_vae(shape: tuple[int, int, int], frames: tuple[int, ...] = (5, 9), device: str = "cuda") -> dict[str, Any]:
    """Peak memory and time of the Wan 2.1 VAE (random weights, bf16) encoding and decoding short clips at the
    target size, untiled and tiled. The VAE runs chunk by chunk along time (causal feature cache), so the peak grows
    about linearly with the frames (the whole input/output video stays allocated): two clip lengths give the slope,
    and the 81-frame figure is extrapolated from them (reported as such)."""
    from diffusers import AutoencoderKLWan

    h, w, f_target = shape
    start, _, _ = _memory(device)  # what others hold (the transformer): not the VAE's
    with torch.device(device):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    out: dict[str, Any] = {"weights_bytes": sum(p.numel() * p.element_size() for p in vae.parameters()), "runs": []}
    for tiled in (False, True):
        if tiled:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        for f in frames:
            for what in ("encode", "decode"):
                if what == "encode":
                    x = torch.randn(1, 3, f, h, w, generator=gen, device=device, dtype=torch.bfloat16)
                else:
                    x = torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=gen, device=device,
                                    dtype=torch.bfloat16)
                _sync(device)
                _memory(device, reset=True)
                t0 = time.perf_counter()
                with torch.no_grad():
                    y = vae.encode(x).latent_dist.mode() if what == "encode" else vae.decode(x).sample
                _sync(device)
                seconds = time.perf_counter() - t0
                _, peak, _ = _memory(device)
                out["runs"].append({
                    "what": what, "tiled": tiled, "frames": f, "seconds": seconds, "output_shape": list(y.shape),
                    "peak_bytes": None if peak is None else peak - start,  # VAE weights + input + activations
                })
                del x, y
                _empty_cache(device)
    extrapolated = {}
    for tiled in (False, True):
        for what in ("encode", "decode"):
            pts = [(r["frames"], r["peak_bytes"]) for r in out["runs"] if r["tiled"] == tiled and r["what"] == what]
            if len(pts) >= 2 and None not in (pts[0][1], pts[-1][1]):
                (f1, p1), (f2, p2) = pts[0], pts[-1]
                extrapolated[f"{what}{' tiled' if tiled else ''}"] = p2 + (p2 - p1) * (f_target - f2) / (f2 - f1)
    out["extrapolated_peak_bytes"] = extrapolated
    del vae
    _empty_cache(device)
    return out


def measure_errors(model, inputs, family: str, method: str, options: dict) -> dict[str, float]:
    import diffattn

    diffattn.apply(model, method, **options)
    state = diffattn.api.installed(model)
    num_dual = len(getattr(model, "transformer_blocks", []) or [])
    probe = ErrorProbe(state.runtime, _layer_type(family, num_dual))
    diffattn.api.replace_runtime(model, probe)
    try:
        with torch.no_grad(), sdpa_backend("cudnn"):
            model(**inputs, return_dict=False)
    finally:
        diffattn.remove(model)
    return {k: statistics.mean(v) for k, v in probe.errors.items()}


def parse_variant(method: str, text: str) -> dict[str, Any]:
    """`"key=value key=value"` (space-separated, each value parsed by the method's config) -> options."""
    import diffattn

    cfg_cls = diffattn.registry.get_method(method).config_cls
    options: dict[str, Any] = {}
    for item in text.split():
        if "=" not in item:
            raise ValueError(f"--variant takes space-separated key=value method options, got {item!r} in {text!r}")
        key, value = item.split("=", 1)
        options[key] = cfg_cls.parse_option(key, value)
    return options


def text_encoder_bytes(model: str) -> int | None:
    """Weights of the pipeline's text encoder in bf16, counted on the meta device (Wan: UMT5-XXL encoder, the config
    `diffattn bench highres` builds)."""
    if not model.startswith("wan"):
        return None
    try:
        from .models import umt5_xxl_parameters

        return umt5_xxl_parameters() * 2
    except ImportError:
        return None


def run(args: argparse.Namespace, device: str = "cuda") -> dict[str, Any]:
    import diffattn
    from diffattn.adapters import family_of

    model = build_model(args.model, device)
    family = family_of(model).name
    spec = diffattn.registry.get_method(args.method)
    base_options = dict(args.opt)
    variants = [
        (args.method + (f" {text}" if text else ""), {**base_options, **parse_variant(args.method, text)})
        for text in (args.variant or [""])
    ]
    report: dict[str, Any] = {
        "model": args.model, "method": args.method, "options": base_options,
        "mode": "pipeline" if args.pipeline else "forward", "cfg": args.pipeline and not args.no_cfg,
        "device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "shapes": [], "steps": args.steps, "repeats": args.repeats,
    }
    try:
        import diffusers
        import triton

        report["triton"], report["diffusers"] = triton.__version__, diffusers.__version__
    except ImportError:
        pass
    settings_of: dict[str, dict[str, Any]] = {}
    for name, options in variants:
        runtime = spec.build(spec.config_cls.from_options(**options))
        settings_of[name] = runtime.settings(family) if hasattr(runtime, "settings") else {}
    report["settings"] = settings_of[variants[0][0]]
    dense = [b for b in args.dense.split(",") if b and b != "none"]
    for shape in args.shape:
        inputs = make_inputs(args.model, shape, device)
        grid = diffattn.adapters.FAMILIES[family].read_inputs(model, inputs).grid
        entry: dict[str, Any] = {"shape": "x".join(map(str, shape)), "grid": list(grid), "tokens": grid.num_tokens}
        entry["results"] = results = {}
        report["shapes"].append(entry)
        if args.pipeline:
            uncond = None
            if not args.no_cfg:
                gen = torch.Generator(device=device).manual_seed(1)
                text = inputs["encoder_hidden_states"]
                uncond = {**inputs, "encoder_hidden_states": torch.randn(text.shape, generator=gen, device=device,
                                                                         dtype=text.dtype)}
            warmed: set[Any] = set()
            runs = [(f"dense-{b}", {}, b) for b in dense] + [(n, o, "cudnn") for n, o in variants]
            for name, options, backend in runs:
                # compilation and plans are per kernel, not per schedule: warm up once per option set that changes
                # the kernels or the cache placement (FreeSwim's cache_steps does not)
                key = (name.split(" ")[0], backend, tuple(sorted((k, str(v)) for k, v in options.items()
                                                                 if k != "cache_steps")))
                r = time_pipeline(model, inputs, uncond, name, args.method, options, periods=args.repeats,
                                  num_steps=args.steps, warmup=args.warmup == "each" or (args.warmup == "once" and key not in warmed),
                                  backend=backend)
                warmed.add(key)
                results[name] = vars(r)
                logger.info("%s %s: %.3f s per step (%s)", entry["shape"], name, r.step_s, r.forwards)
                _empty_cache(device)
                write_json(report, args.json)
            ref = results.get("dense-cudnn") or next(iter(results.values()))
            entry["projected"] = {k: args.steps * v["step_s"] for k, v in results.items()}
            entry["speedup"] = {k: ref["step_s"] / v["step_s"] for k, v in results.items()}
            ref_cond = ref["cond_step_s"]
            entry["speedup_cond_only"] = {k: ref_cond / v["cond_step_s"] for k, v in results.items()}
        else:
            for variant in [f"dense-{b}" for b in dense]:
                results[variant] = vars(time_step(model, inputs, variant, args.repeats, args.method, {}))
            for name, options in variants:
                results[name] = vars(time_step(model, inputs, name, args.repeats, args.method,
                                               method_options(args.method, options)))
                logger.info("%s %s: %.3f s", entry["shape"], name, results[name]["step_s"])
                write_json(report, args.json)
            runtime = spec.build(spec.config_cls.from_options(**variants[0][1]))
            if hasattr(runtime, "mask_for"):
                mask = runtime.mask_for(grid.frames, grid.tokens_per_frame, report["settings"], torch.device("cpu"))
                entry["mask_density"] = mask.float().mean().item()
            n = args.steps
            entry["projected"] = {}
            for k, r in results.items():
                dense_steps = 0 if k.startswith("dense") else settings_of[k].get("dense_timesteps", 0)
                d = results.get("dense-cudnn", r)
                entry["projected"][k] = dense_steps * d["step_s"] + (n - dense_steps) * r["step_s"]
            if not args.no_errors:
                entry["errors"] = {
                    f"{name}: {k}" if len(variants) > 1 else k: v
                    for name, options in variants
                    for k, v in measure_errors(model, inputs, family, args.method,
                                               method_options(args.method, options)).items()
                }
        del inputs
        _empty_cache(device)
        write_json(report, args.json)
    if args.vae:
        report["vae"] = measure_vae(args.shape[0], device=device)
        report["text_encoder_bytes"] = text_encoder_bytes(args.model)
        write_json(report, args.json)
    return report


def _gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.1f}"


def render_pipeline(report: dict[str, Any]) -> list[str]:
    cfg = "cond + uncond" if report.get("cfg") else "cond only"
    lines = [
        (f"| shape (tokens) | variant | period (steps) | step s ({cfg}) | cond-only step s | forwards (median s) | "
        f"self-attn s/step | cross-attn s/step | peak GiB (reserved) | cache GiB | projected {report['steps']}-step s | "
        "vs dense cuDNN | vs dense cuDNN, cond only |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["shapes"]:
        for variant, r in e["results"].items():
            forwards = ", ".join(f"{k} {v:.2f}" for k, v in r["forwards"].items())
            cache = f"{_gib(r['cache_bytes'])} ({r['cache_device']})" if r["cache_bytes"] else "—"
            peak = f"{_gib(r['peak_bytes'])} ({_gib(r.get('peak_reserved_bytes'))})"
            lines.append(
                f"| {e['shape']} ({e['tokens']:,}) | {variant} | {r['period']} | {r['step_s']:.2f} | "
                f"{r['cond_step_s']:.2f} | {forwards} | {r['attention_s']:.2f} | {r['cross_s']:.3f} | "
                f"{peak} | {cache} | {e.get('projected', {}).get(variant, float('nan')):.0f} | "
                f"{e.get('speedup', {}).get(variant, float('nan')):.2f}x | "
                f"{e.get('speedup_cond_only', {}).get(variant, float('nan')):.2f}x |"
            )
    return lines


def render_vae(report: dict[str, Any]) -> list[str]:
    vae = report["vae"]
    lines = [
        "",
        f"Wan VAE (bf16, random weights; weights {_gib(vae['weights_bytes'])} GiB) at {report['shapes'][0]['shape']}:",
        "", "| what | tiled | frames | s | peak GiB |", "|---|---|---|---|---|",
    ]
    for r in vae["runs"]:
        lines.append(f"| {r['what']} | {r['tiled']} | {r['frames']} | {r['seconds']:.2f} | {_gib(r['peak_bytes'])} |")
    for k, v in vae["extrapolated_peak_bytes"].items():
        lines.append(f"| {k} (extrapolated) | | {report['shapes'][0]['shape'].split('x')[-1]} | | {_gib(v)} |")
    if report.get("text_encoder_bytes"):
        lines.append(f"\nText encoder weights (bf16, from its config): {_gib(report['text_encoder_bytes'])} GiB")
    return lines


def render(report: dict[str, Any]) -> str:
    m = report["method"]
    lines = [
        (f"{report['model']}, {m} {report['settings']}; {report['device']}, torch {report['torch']}, "
        f"triton {report.get('triton', '?')}, diffusers {report.get('diffusers', '?')}, {report['date']}"),
        "",
    ]
    if report.get("mode") == "pipeline":
        lines += render_pipeline(report)
    else:
        lines += [
            (f"| shape (tokens) | mask density | variant | step s | self-attn s | cross-attn s | projected "
            f"{report['steps']}-step s | speed-up vs cuDNN | vs flash |"),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in report["shapes"]:
            p = e["projected"]
            for variant, r in e["results"].items():
                proj = p[variant]
                vs = [f"{p[d] / proj:.2f}x" if d in p else "—" for d in ("dense-cudnn", "dense-flash")]
                density = "1.000" if variant.startswith("dense") else (
                    f"{e['mask_density']:.3f}" if "mask_density" in e else "—")
                lines.append(
                    f"| {e['shape']} ({e['tokens']:,}) | {density} | {variant} | "
                    f"{r['step_s']:.2f} | {r['attention_s']:.2f} | {r['cross_s']:.3f} | {proj:.0f} | {vs[0]} | "
                    f"{vs[1]} |"
                )
        if any(e.get("errors") for e in report["shapes"]):
            lines += ["", "| shape | layer type | relative error of attention output vs dense |", "|---|---|---|"]
            for e in report["shapes"]:
                for k, v in e.get("errors", {}).items():
                    lines.append(f"| {e['shape']} | {k} | {v:.3e} |")
    if report.get("vae"):
        lines += render_vae(report)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="wan2.1-14b")
    parser.add_argument("--shape", type=parse_shape, action="append", required=True, help="HxWxF, repeatable")
    parser.add_argument("--method", default="radial")
    parser.add_argument(
        "--opt", type=lambda s: tuple(s.split("=", 1)), action="append", default=[],
        help="method option key=value (parsed by the method's config)",
    )
    parser.add_argument(
        "--variant", action="append", default=[],
        help='a set of method options run as its own variant, e.g. "cache_steps=2 cache_device=cpu" (repeatable; '
        "merged over --opt)",
    )
    parser.add_argument("--dense", default="cudnn,flash", help="dense SDPA backends to time: cudnn, flash, none")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed forwards per variant (--pipeline: timed periods of the schedule)")
    parser.add_argument("--steps", type=int, default=50, help="steps of the projected generation")
    parser.add_argument("--pipeline", action="store_true",
                        help="time whole periods of steps as a pipeline runs them (cond + uncond under cache_context)")
    parser.add_argument("--no-cfg", action="store_true", help="--pipeline: conditional forwards only")
    parser.add_argument("--warmup", choices=("once", "each", "none"), default="once",
                        help="--pipeline: one untimed forward per kernel configuration (once) or per variant (each); "
                        "none: time compilation too (for memory-only runs)")
    parser.add_argument("--no-errors", action="store_true", help="skip the attention-output error probe")
    parser.add_argument("--vae", action="store_true", help="also measure the Wan VAE's peak memory at the first shape")
    parser.add_argument("--vae-only", action="store_true", help="only the Wan VAE measurement (no transformer)")
    parser.add_argument("--json", help="write the full report here (rewritten after every variant)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (method options parsed by the method's config)."""
    import diffattn

    parser = build_parser()
    args = parser.parse_args(argv)
    spec = diffattn.registry.get_method(args.method)
    if spec.pipeline_only and not args.pipeline:
        parser.error(f"{spec.pipeline_only}: use --pipeline")
    cfg_cls = spec.config_cls
    args.opt = [(k, cfg_cls.parse_option(k, v)) for k, v in args.opt]
    for text in args.variant:
        parse_variant(args.method, text)  # fail before building the model
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("diffattn bench step needs a CUDA GPU", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    if args.vae_only:
        report = {"vae": measure_vae(args.shape[0]), "text_encoder_bytes": text_encoder_bytes(args.model),
                  "shapes": [{"shape": "x".join(map(str, args.shape[0]))}], "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        write_json(report, args.json)
        print("\n".join(render_vae(report)))
        return 0
    report = run(args)
    write_json(report, args.json)
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

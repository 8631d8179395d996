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
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..compose import CACHES, check_cache, enable_cache
from .harness import GIB, gib
from .highres import DEFAULT_NEGATIVE, DEFAULT_PROMPT, MODEL_NAMES, StageClock, build_pipeline, presets

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


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(text: str) -> Variant:
    """`stock`, `radial`, `radial:decay_factor=0.5+fbc:threshold=0.08`, `radial+softpag:heads=L3` -> Variant."""
    import diffattn

    variant = Variant(label=text)
    for part in text.split("+"):
        name, _, opts = part.partition(":")
        name = name.strip()
        pairs = [p for p in opts.split(",") if p.strip()]
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
            variant.options[name] = {k.strip(): cfg.parse_option(k.strip(), v.strip())
                                     for k, v in (p.split("=", 1) for p in pairs)}
    if "stock" in [p.partition(":")[0].strip() for p in text.split("+")] and variant.methods:
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


def _scaled_options(variant: Variant, steps: int, target: int) -> tuple[dict[str, Any], int | None]:
    """The short run's per-method options with `dense_timesteps` scaled from the target schedule, and the target's
    `dense_timesteps` (None when the variant has no warm-up schedule to scale)."""
    from ..registry import build_method

    options = {n: dict(o) for n, o in variant.options.items()}
    if len(variant.methods) != 1 or variant.methods[0] == "dense":
        return options, None
    name = variant.methods[0]
    runtime = build_method(name, **options[name])
    if not hasattr(runtime.config, "dense_timesteps"):
        return options, None
    first = int((runtime.settings("wan") if hasattr(runtime, "settings") else vars(runtime.config))["dense_timesteps"] or 0)
    options[name]["dense_timesteps"] = 0 if first == 0 else max(1, round(first * steps / target))
    return options, first


# ------------------------------------------------------------------------------------------------------------------
# probe
# ------------------------------------------------------------------------------------------------------------------
class Probe:
    """Stage boundaries from the pipeline's own seams (text encoder and transformer forward pre-hooks, a wrapper of
    `vae.decode`), per-step wall times from `callback_on_step_end`, and which forwards reached the last block."""

    def __init__(self, pipe: Any, clock: StageClock) -> None:
        self.pipe, self.clock = pipe, clock
        self.step_ends: list[float] = []
        self.first_forward: float | None = None
        self.last_block_calls: list[int] = []  # per step: forwards that reached the last block
        self.forwards: list[int] = []  # per step: transformer forwards
        self._last = 0
        self._fwd = 0
        tr = pipe.transformer
        self._handles = [
            pipe.text_encoder.register_forward_pre_hook(lambda m, a: clock.enter("text encoding")),
            tr.register_forward_pre_hook(self._transformer_pre),
            # the last block's feed-forward, not the block: Diffusers' cache hooks wrap a block's forward, so a
            # pre-hook on the block fires even when the cache skips it
            tr.blocks[-1].ffn.register_forward_pre_hook(self._last_block),
        ]
        decode = pipe.vae.decode

        def wrapped(*args, **kwargs):
            clock.enter("decode")
            return decode(*args, **kwargs)

        pipe.vae.decode = wrapped

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
        self._last = self._fwd = 0
        return kwargs

    def step_seconds(self) -> list[float]:
        starts = [self.first_forward, *self.step_ends[:-1]]
        return [end - start for start, end in zip(starts, self.step_ends)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self.pipe.vae.__dict__.pop("decode", None)


# ------------------------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------------------------
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

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, got {self.model!r}")
        if self.steps < 1 or self.target_steps < 1:
            raise ValueError(f"steps and target_steps must be >= 1, got {self.steps}, {self.target_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.variants:
            raise ValueError("variants must name at least one variant")
        preset = presets()[self.model]
        # the e2e default geometry is the model's native size (480x832x81 for Wan2.1-1.3B)
        self.height = self.height or preset.base_height
        self.width = self.width or preset.base_width
        self.frames = self.frames or preset.frames


def _sdpa_context(cuda: bool):
    from contextlib import nullcontext

    from .step import sdpa_backend

    return sdpa_backend("cudnn") if cuda else nullcontext()


def _generate(pipe, settings: E2ESettings, steps: int, callback=None, output_type: str = "pt"):
    return pipe(
        settings.prompt, negative_prompt=settings.negative_prompt, height=settings.height, width=settings.width,
        num_frames=settings.frames, num_inference_steps=steps, guidance_scale=settings.guidance,
        max_sequence_length=presets()[settings.model].max_sequence_length,
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


def project(steps: list[dict[str, Any]], dense_at_target: set[int], target: int) -> dict[str, Any]:
    """The denoising time of a `target`-step generation from the measured steps (module docstring)."""
    def med(rows):
        return statistics.median(r["seconds"] for r in rows) if rows else None

    kinds = {(d, c): [s for s in steps if s["dense"] == d and s["cached"] == c] for d in (True, False) for c in (True, False)}
    cached_share = sum(s["cached"] for s in steps) / len(steps)
    n_dense = len(dense_at_target)
    total, used = 0.0, {}
    for dense, n in ((True, n_dense), (False, target - n_dense)):
        n_cached = round(cached_share * n)
        for cached, count in ((True, n_cached), (False, n - n_cached)):
            if not count:
                continue
            t = med(kinds[(dense, cached)])
            if t is None:  # kind not measured: the same cache state with the other attention kind, else any step
                t = med(kinds[(not dense, cached)]) or med(steps)
                used[f"{'dense' if dense else 'sparse'}/{'cached' if cached else 'full'}"] = "substituted"
            total += count * t
    return {"denoise_s": total, "dense_steps": n_dense, "cached_share": cached_share, "substituted": used,
            "median_s": {f"{'dense' if d else 'sparse'}/{'cached' if c else 'full'}": med(v) for (d, c), v in kinds.items()}}


def run_variant(pipe, settings: E2ESettings, variant: Variant, cuda: bool) -> tuple[dict[str, Any], torch.Tensor]:
    options, target_dense_first = (_scaled_options(variant, settings.steps, settings.target_steps)
                                   if settings.scale_schedule else (dict(variant.options), None))
    if settings.warmup_steps and variant.methods:
        # untimed: compiles the method's kernels (its sparse path: no dense warm-up) and plans; no VAE decode
        warm = {n: {**o, **({"dense_timesteps": 0} if n == "radial" or "dense_timesteps" in o else {})}
                for n, o in options.items()}
        _install(pipe, variant, warm)
        with _sdpa_context(cuda):
            _generate(pipe, settings, settings.warmup_steps, output_type="latent")
    runtime = _install(pipe, variant, options)
    if variant.cache is not None:
        enable_cache(pipe, variant.cache, method=variant.methods or None, **variant.cache_options)
    clock = StageClock(cuda)
    probe = Probe(pipe, clock)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = clock.now()
        clock.enter("text encoding")
        with _sdpa_context(cuda):
            frames = _generate(pipe, settings, settings.steps, probe.on_step_end)
        clock.close()
        wall = time.perf_counter() - t0
    finally:
        probe.detach()
        if variant.cache is not None:
            pipe.transformer.disable_cache()
    run_dense = dense_steps(runtime, settings.steps)
    seconds = probe.step_seconds()
    steps = [{"step": i, "seconds": s, "dense": i in run_dense,
              "cached": probe.last_block_calls[i] < probe.forwards[i], "forwards": probe.forwards[i],
              "last_block": probe.last_block_calls[i]} for i, s in enumerate(seconds)]
    stages = {st.name: st for st in clock.stages}
    text_s = stages["text encoding"].seconds if "text encoding" in stages else 0.0
    decode_s = stages["decode"].seconds if "decode" in stages else 0.0
    target_runtime = runtime
    if target_dense_first is not None:
        from ..registry import build_method

        target_runtime = build_method(variant.methods[0], **variant.options[variant.methods[0]])
    proj = project(steps, dense_steps(target_runtime, settings.target_steps), settings.target_steps)
    row = {
        "variant": variant.label, "methods": variant.methods, "options": options, "cache": variant.cache,
        "cache_options": variant.cache_options, "wall_s": wall,
        "stages": {n: {"seconds": st.seconds, "peak_allocated_bytes": st.peak_allocated_bytes,
                       "peak_reserved_bytes": st.peak_reserved_bytes} for n, st in stages.items()},
        "peak_allocated_bytes": max((st.peak_allocated_bytes or 0) for st in clock.stages) if cuda else None,
        "steps": steps, "projection": {**proj, "text_s": text_s, "decode_s": decode_s,
                                       "total_s": text_s + proj["denoise_s"] + decode_s},
    }
    return row, frames


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
    built = build_pipeline(settings.model, seed=settings.seed)
    from diffusers import WanPipeline

    src = built.pipe
    pipe = WanPipeline(tokenizer=src.tokenizer, text_encoder=src.text_encoder, transformer=src.transformer,
                       vae=src.vae, scheduler=src.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(settings.device)
    report["build_s"] = time.perf_counter() - t
    if settings.warmup_steps:
        t = time.perf_counter()
        with _sdpa_context(cuda):
            _generate(pipe, settings, settings.warmup_steps)  # stock, with the VAE decode
        report["warmup_s"] = time.perf_counter() - t
    dump(report)
    baseline = None
    for variant in variants:
        logger.info("diffattn e2e: %s ...", variant.label)
        row, frames = run_variant(pipe, settings, variant, cuda)
        frames = frames[0].float().cpu().permute(0, 2, 3, 1)  # [F, H, W, C] in [0, 1]
        if baseline is None:
            baseline = (variant.label, frames)
        row["psnr_vs"] = baseline[0]
        row["psnr_db"] = psnr(frames, baseline[1])
        row["finite"] = bool(torch.isfinite(frames).all())
        report["rows"].append(row)
        dump(report)
    import diffattn

    diffattn.remove(pipe)
    base = report["rows"][0]
    for row in report["rows"]:
        row["speedup_measured"] = base["wall_s"] / row["wall_s"]
        row["speedup_projected"] = base["projection"]["total_s"] / row["projection"]["total_s"]
    dump(report)
    return report


# ------------------------------------------------------------------------------------------------------------------
# output, CLI
# ------------------------------------------------------------------------------------------------------------------
def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"e2e: {s['model']} {s['height']}x{s['width']}x{s['frames']}, {s['steps']} steps run "
        f"(projected to {s['target_steps']}), CFG {s['guidance']}, {report['device']}, {report['date']}",
        "| variant | wall (s) | text (s) | denoise (s) | decode (s) | peak GiB | x vs first | "
        f"PSNR vs {report['rows'][0]['variant'] if report['rows'] else '-'} (dB) | {s['target_steps']}-step projected (s) | x projected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        st = r["stages"]
        sec = lambda n: f"{st[n]['seconds']:.2f}" if n in st else "—"  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['wall_s']:.2f} | {sec('text encoding')} | {sec('denoising')} | {sec('decode')} | "
            f"{gib(r['peak_allocated_bytes'])} | {r['speedup_measured']:.2f} | {r['psnr_db']:.2f} | "
            f"{r['projection']['total_s']:.1f} | {r['speedup_projected']:.2f} |"
        )
    lines.append("per-step medians (s) by kind, dense steps at the target / cached share:")
    for r in report["rows"]:
        p = r["projection"]
        meds = ", ".join(f"{k} {v:.3f}" for k, v in p["median_s"].items() if v is not None)
        lines.append(f"  {r['variant']}: {meds}; {p['dense_steps']} dense of {s['target_steps']}, cached share "
                     f"{p['cached_share']:.2f}{'; substituted ' + str(p['substituted']) if p['substituted'] else ''}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffattn bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan2.1-1.3b", choices=MODEL_NAMES)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native 480)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native 832)")
    p.add_argument("--frames", type=int, default=None, help="default 81")
    p.add_argument("--steps", type=int, default=50, help="denoising steps actually run per variant")
    p.add_argument("--target-steps", type=int, default=50, help="step count the projection is for")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", nargs="+", default=list(E2ESettings.variants),
                   help="stock | METHOD[:k=v,...][+METHOD2][+CACHE[:k=v,...]]; caches: " + ", ".join(CACHES))
    p.add_argument("--no-scale-schedule", action="store_true", help="run the methods' warm-up schedules unscaled")
    p.add_argument("--warmup-steps", type=int, default=1,
                   help="untimed: a stock generation of this many steps first, and per method variant a run without "
                        "decode (0: none)")
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
    return 0

"""`diffattn bench quality`: every applicable method against `dense` on the bundled demo models.

For each model (the video model, Wan architecture; the image model, SD3 architecture; and, with `--models unet`,
the UNet demo model, SD1.5 layout) and each method the model's
family supports, the same prompts and seeds are generated with `dense` (the reference) and with the method, and the
method's output is compared with the dense output: PSNR and SSIM (`diffattn.metrics`), mean and min over the
(prompt, seed) pairs, plus the seconds per generation and the speed-up against dense. `dense` itself is run twice:
its second run shows the noise floor of the comparison (PSNR inf / SSIM 1 when the device is deterministic).
SoftPAG is guidance, not an approximation: its output is meant to differ, so it is listed apart.

One extra dense generation per model records the attention energy decay (`diffattn.energy`): attention mass of
sampled queries against keys binned by temporal and spatial distance, plotted to a PNG.

Method options default to each method spec's `demo_options` (its defaults made sensible for small token grids);
`--method-opt METHOD:key=value` overrides them. See docs/quality.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..geometry import TokenGrid
from ..demo import DEMO_PROMPTS, demo_model_path
from .harness import sync, versions, write_json
from .energy import EnergyDecay, EnergyProbe, plot_energy_decay
from ..methods.spec import DemoGeometry
from .metrics import psnr, ssim
from ..registry import get_method

logger = logging.getLogger("diffattn")

KINDS = ("video", "image", "unet")  # unet: the UNet demo model (SD1.5 layout)
DEFAULT_PLOT = "docs/img/energy_decay.png"


# What the demo options depend on (family, token grid, steps, depth): the methods' `DemoGeometry`.
Geometry = DemoGeometry


def demo_options(method: str, geometry: Geometry, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bench's options for `method` on `geometry` (the spec's `demo_options`), then `overrides`, validated by
    the method."""
    spec = get_method(method)
    options = {**spec.demo_options(geometry), **(overrides or {})}
    spec.config_cls.from_options(**options)
    return options


def parse_method_opts(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """`["radial:block_size=32", "gna:kernel_size=5,7,7"]` -> `{"radial": {"block_size": 32}, ...}` (typed)."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        method, sep, rest = pair.partition(":")
        key, sep2, value = rest.partition("=")
        if not sep or not sep2 or not method or not key:
            raise ValueError(f"--method-opt must be METHOD:key=value, got {pair!r}")
        cfg = get_method(method.strip()).config_cls
        out.setdefault(method.strip(), {})[key.strip()] = cfg.parse_option(key.strip(), value)
    return out


@dataclass
class BenchConfig:
    """Settings of one bench run. `models`: kind ("video"/"image"/"unet") -> pipeline folder or hub id.

    `steps`, `sizes` (kind -> (frames, height, width) or (height, width) in pixels), `guidance` and
    `max_sequence_length` left at None use the pipeline's own defaults (the demo pipelines default to their training
    settings).
    """

    models: dict[str, str]
    methods: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    prompts: list[str] | None = None
    steps: int | None = None
    sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    guidance: float | None = None
    max_sequence_length: int | None = None
    dtype: str | None = None
    device: str = "cpu"
    warmup: int = 1
    queries: int = 64
    method_opts: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.models) - set(KINDS)
        if not self.models or unknown:
            raise ValueError(f"models must map kinds among {KINDS} to model folders, got {sorted(self.models)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts must not be empty (None: the demo prompt of each model)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")
        for kind, size in self.sizes.items():
            if kind not in KINDS or len(size) != (3 if kind == "video" else 2) or min(size) < 1:
                raise ValueError(f"sizes[{kind!r}] must be (frames, height, width) for video, (height, width) for "
                                 f"image and unet, positive; got {size!r}")
        if self.methods is not None:
            for m in self.methods:
                get_method(m)  # unknown or planned -> ValueError naming the available ones
        for m in self.method_opts:
            if self.methods is not None and m not in self.methods:
                raise ValueError(f"--method-opt given for {m!r}, which is not among --methods {self.methods}")


def _call_args(kind: str, cfg: BenchConfig) -> dict[str, Any]:
    size = cfg.sizes.get(kind)
    args: dict[str, Any] = {"num_inference_steps": cfg.steps, "guidance_scale": cfg.guidance,
                            "max_sequence_length": cfg.max_sequence_length, "output_type": "np"}
    if size is not None and kind == "video":
        args.update(num_frames=size[0], height=size[1], width=size[2])
    elif size is not None:
        args.update(height=size[0], width=size[1])
    return args


def _output_array(result: Any) -> np.ndarray:
    """A pipeline result -> float32 `[F, H, W, C]` (video) or `[H, W, C]` (image), values in [0, 1]."""
    frames = getattr(result, "frames", None)
    data = frames[0] if frames is not None else getattr(result, "images", None)[0]
    return np.clip(np.asarray(data, dtype=np.float32), 0.0, 1.0)


def _generate(pipe, prompt: str, seed: int, method: str | None, options: dict[str, Any], call: dict[str, Any],
              device: str) -> tuple[np.ndarray, float]:
    from ..generate import run_generation

    sync(device)
    result, seconds = run_generation(pipe, prompt, method=method, options=options, seed=seed, **call)
    return _output_array(result), seconds


def _probe_run(pipe, prompt: str, seed: int, call: dict[str, Any], queries: int) -> EnergyDecay | None:
    """One dense generation with `EnergyProbe` in place of dense's runtime; its energy decay (largest grid)."""
    import torch

    from ..api import apply, remove, replace_runtime
    from ..generate import call_kwargs

    probe = EnergyProbe(queries=queries, seed=seed)
    apply(pipe, "dense")
    try:
        replace_runtime(pipe, probe)
        pipe(prompt=prompt, generator=torch.Generator(device="cpu").manual_seed(seed), **call_kwargs(pipe, **call))
    finally:
        remove(pipe)
    found = probe.results()
    return max(found, key=lambda d: math.prod(d.grid)) if found else None


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values))}


def _denoiser(pipe) -> Any:
    """The pipeline's transformer, or its UNet (the UNet demo model)."""
    return getattr(pipe, "transformer", None) or pipe.unet


def _model_geometry(pipe, grid: TokenGrid, steps: int) -> Geometry:
    from ..adapters import family_of

    model = _denoiser(pipe)
    adapter = family_of(model)
    layers = max((s.layer.num_layers for s in adapter.slots(model)), default=1)
    return Geometry(adapter.name, grid, steps, layers)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the whole bench; returns the report (what `--json` writes, with inf PSNR as float inf)."""
    from tqdm.auto import tqdm

    from ..adapters import family_of
    from ..generate import load_pipeline
    from ..registry import available_methods

    dtype = cfg.dtype or ("bf16" if cfg.device.startswith("cuda") else "fp32")
    report: dict[str, Any] = {
        **versions(cfg.device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dtype": dtype,
        "steps": cfg.steps or "pipeline default", "seeds": list(cfg.seeds), "warmup": cfg.warmup,
        "queries": cfg.queries, "models": {},
    }
    # Plan first (family per model) so that the progress bar knows its total.
    pipes: dict[str, Any] = {}
    plans: dict[str, tuple[str, list[str], dict[str, str]]] = {}
    for kind, path in cfg.models.items():
        pipe = load_pipeline(path, dtype=dtype, device=cfg.device)
        pipe.set_progress_bar_config(disable=True)  # one bar for the whole bench
        family = family_of(_denoiser(pipe)).name
        wanted = cfg.methods if cfg.methods is not None else available_methods()
        methods, skipped = [], {}
        for m in wanted:
            if family in get_method(m).families:
                methods.append(m)
            else:
                skipped[m] = f"does not support {family}"
        if "dense" not in methods:
            methods.insert(0, "dense")  # the reference is always run; its rerun row shows the noise floor
        pipes[kind] = pipe
        plans[kind] = (family, methods, skipped)
    runs_per = len(cfg.seeds) * len(cfg.prompts or [None])
    total = sum(1 + cfg.warmup + runs_per + sum(cfg.warmup + runs_per for m in p[1]) for p in plans.values())
    bar = tqdm(total=total, disable=not cfg.progress, desc="quality", unit="run")
    try:
        for kind, pipe in pipes.items():
            family, methods, skipped = plans[kind]
            prompts = cfg.prompts or [DEMO_PROMPTS[kind]]
            call = _call_args(kind, cfg)
            pairs = [(p, s) for p in prompts for s in cfg.seeds]
            bar.set_description(f"{kind} energy")
            decay = _probe_run(pipe, prompts[0], cfg.seeds[0], call, cfg.queries)
            bar.update(1)
            if decay is None:
                raise RuntimeError(f"the {kind} model's dense run made no self/joint attention call with a token grid")
            steps = cfg.steps or getattr(pipe, "_num_timesteps", None)  # Diffusers pipelines record their count
            if not steps:
                raise RuntimeError(f"cannot tell how many steps the {kind} pipeline ran; pass --steps")
            geometry = _model_geometry(pipe, TokenGrid(*decay.grid), int(steps))
            entry: dict[str, Any] = {
                "path": cfg.models[kind], "pipeline": type(pipe).__name__, "family": family,
                "steps": int(steps), "grid": list(decay.grid), "tokens": math.prod(decay.grid),
                "layers": geometry.num_layers, "prompts": prompts, "energy": decay.to_dict(), "skipped": skipped,
                "methods": {},
            }
            reference: dict[tuple[str, int], np.ndarray] = {}
            ref_seconds = []
            for _ in range(cfg.warmup):
                bar.set_description(f"{kind} dense warm-up")
                _generate(pipe, prompts[0], cfg.seeds[0], "dense", {}, call, cfg.device)
                bar.update(1)
            for prompt, seed in pairs:
                bar.set_description(f"{kind} dense (reference) seed {seed}")
                out, sec = _generate(pipe, prompt, seed, "dense", {}, call, cfg.device)
                reference[(prompt, seed)] = out
                entry["size"] = list(out.shape[:-1])  # generated [frames,] height, width
                ref_seconds.append(sec)
                bar.update(1)
            ref_median = statistics.median(ref_seconds)
            entry["methods"]["dense (reference)"] = {
                "role": "reference", "method": "dense", "options": {}, "seconds": ref_seconds,
                "seconds_median": ref_median, "speedup": 1.0,
            }
            for method in methods:
                row: dict[str, Any] = {"method": method, "role": "guidance" if get_method(method).role == "guidance" else
                                       ("rerun" if method == "dense" else "approximation")}
                label = "dense (rerun)" if method == "dense" else method
                entry["methods"][label] = row
                try:
                    options = demo_options(method, geometry, cfg.method_opts.get(method))
                    row["options"] = options
                    for _ in range(cfg.warmup):
                        bar.set_description(f"{kind} {method} warm-up")
                        _generate(pipe, prompts[0], cfg.seeds[0], method, options, call, cfg.device)
                        bar.update(1)
                    row.update(psnr=[], ssim=[], seconds=[])
                    for prompt, seed in pairs:
                        bar.set_description(f"{kind} {method} seed {seed}")
                        out, sec = _generate(pipe, prompt, seed, method, options, call, cfg.device)
                        ref = reference[(prompt, seed)]
                        row["psnr"].append(psnr(out, ref))
                        row["ssim"].append(ssim(out, ref))
                        row["seconds"].append(sec)
                        bar.update(1)
                except Exception as exc:  # one failing method must not lose the others' results
                    logger.exception("diffattn bench quality: %s on the %s model failed", method, kind)
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    continue
                row["psnr_mean"], row["psnr_min"] = _summary(row["psnr"]).values()
                row["ssim_mean"], row["ssim_min"] = _summary(row["ssim"]).values()
                row["seconds_median"] = statistics.median(row["seconds"])
                row["speedup"] = ref_median / row["seconds_median"]
            report["models"][kind] = entry
    finally:
        bar.close()
    return report


# ---- output --------------------------------------------------------------------------------------------------

def _fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _fmt_opts(method: str, options: dict[str, Any]) -> str:
    if options:
        return ", ".join(f"{k}={v}" for k, v in options.items())
    return "(defaults)" if get_method(method).config_cls.option_specs() else ""


def _energy_lines(kind: str, e: dict[str, Any]) -> list[str]:
    grid = e["grid"]
    uniform = EnergyDecay.from_dict(e).uniform_level()
    lines = [
        f"Attention energy decay ({kind} model, dense run, {e['calls']} self/joint attention calls, "
        f"{e['queries']:,} sampled query rows; total mass per query {e['total_mass']:.4f}"
        + (f", of which text keys {e['text_mass']:.3f}" if e["text_mass"] > 0 else "") + "):",
        "",
    ]
    profiles = [("temporal distance (frames)", e["by_temporal"])] if grid[0] > 1 else []
    profiles.append(("spatial distance (tokens)", e["by_spatial"]))
    for name, prof in profiles:
        by_d = {p["distance"]: p for p in prof}
        show = sorted({d for d in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96) if d in by_d} | {prof[-1]["distance"]})
        lines.append(f"| {name} | " + " | ".join(str(d) for d in show) + " |")
        lines.append("|---|" + "---|" * len(show))
        lines.append("| mass share | " + " | ".join(f"{by_d[d]['mass']:.3f}" for d in show) + " |")
        lines.append("| mass per key / even spread | "
                     + " | ".join(f"{by_d[d]['mass_per_key'] / uniform:.2f}" for d in show) + " |")
        lines.append("")
    return lines


def render_markdown(report: dict[str, Any], plot: str | None = None) -> str:
    """The markdown section for BENCHMARKS.md."""
    seeds = ", ".join(map(str, report["seeds"]))
    lines = [
        "## Quality vs dense on the demo models (`diffattn bench quality`)",
        "",
        f"{report['device']}; diffattn {report['diffattn']}, torch {report['torch']}, diffusers {report['diffusers']}"
        + (f", triton {report['triton']}" if "triton" in report else "") + f"; {report['date']}. "
        f"{report['dtype']}, seeds {seeds}, {report['warmup']} untimed warm-up run(s) per "
        "method. PSNR/SSIM of each method's output against the dense output of the same prompt and seed (mean / min "
        "over prompts x seeds); seconds = median per generation; speed-up = dense median / method median.",
        "",
    ]
    for kind, m in report["models"].items():
        size = "x".join(map(str, m["size"]))
        grid = "x".join(map(str, m["grid"]))
        lines += [
            (f"### {kind} model: `{m['path']}` ({m['pipeline']}, {m['family']}, {m['layers']} layers, {size} px, "
            f"{m['steps']} steps, "
            f"token grid {grid} = {m['tokens']:,} tokens)"),
            "",
            "Prompts: " + "; ".join(f"\"{p}\"" for p in m["prompts"]),
            "",
        ]
        rows = {"approx": [], "guidance": []}
        for label, r in m["methods"].items():
            target = rows["guidance"] if r["role"] == "guidance" else rows["approx"]
            opts = _fmt_opts(r["method"], r.get("options", {}))
            if "error" in r:
                target.append(f"| {label} | {opts} | failed: {r['error']} | | | |")
            elif r["role"] == "reference":
                target.append(f"| {label} | | (reference) | (reference) | {r['seconds_median']:.2f} | 1.00x |")
            else:
                target.append(
                    f"| {label} | {opts} | {_fmt_db(r['psnr_mean'])} / {_fmt_db(r['psnr_min'])} | "
                    f"{r['ssim_mean']:.4f} / {r['ssim_min']:.4f} | {r['seconds_median']:.2f} | {r['speedup']:.2f}x |"
                )
        header = ["| method | options | PSNR dB mean / min | SSIM mean / min | seconds | speed-up vs dense |",
                  "|---|---|---|---|---|---|"]
        lines += header + rows["approx"] + [""]
        if rows["guidance"]:
            lines += [("Guidance, not an approximation (its output is meant to differ from dense; PSNR/SSIM say how "
                      "far it moves the output):"), ""] + header + rows["guidance"] + [""]
        if m["skipped"]:
            lines += ["Not applicable: " + "; ".join(f"{k} ({v})" for k, v in m["skipped"].items()), ""]
        lines += _energy_lines(kind, m["energy"])
    if plot:
        lines += [f"![attention energy decay]({plot})", ""]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _parse_size(text: str, n: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != n or min(values) < 1:
        what = "FRAMESxHEIGHTxWIDTH" if n == 3 else "HEIGHTxWIDTH"
        raise argparse.ArgumentTypeError(f"size must be {what} (positive ints), got {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffattn bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--video-model", default=None, help="Wan pipeline folder (default: the bundled demo video model)")
    p.add_argument("--image-model", default=None, help="SD3 pipeline folder (default: the bundled demo image model)")
    p.add_argument("--unet-model", default=None,
                   help="SD1.5-layout UNet pipeline folder (default: the bundled demo UNet model)")
    p.add_argument("--models", default="video,image",
                   help="which models to run, comma-separated among video, image, unet (default video,image)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every one the family supports)")
    p.add_argument("--method-opt", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="override a demo option, repeatable (e.g. radial:block_size=32)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (default: each demo model's example prompt)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--video-size", type=lambda s: _parse_size(s, 3), default=None,
                   help="FRAMESxHEIGHTxWIDTH in pixels (default: the pipeline's; the demo model's is its training size)")
    p.add_argument("--image-size", type=lambda s: _parse_size(s, 2), default=None,
                   help="HEIGHTxWIDTH in pixels (default: the pipeline's)")
    p.add_argument("--unet-size", type=lambda s: _parse_size(s, 2), default=None,
                   help="HEIGHTxWIDTH in pixels for the UNet model (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method before the timed ones (default 1)")
    p.add_argument("--queries", type=int, default=64, help="sampled queries per attention call for the energy decay")
    p.add_argument("--md", default=None, help="also write the markdown section here")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--plot", default=DEFAULT_PLOT, help=f"energy-decay PNG (default {DEFAULT_PLOT}; 'none' to skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        print(f"diffattn bench quality: --models takes a comma list among {', '.join(KINDS)}; got {args.models!r}",
              file=sys.stderr)
        return 2
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        models = {}
        for kind in kinds:
            given = {"video": args.video_model, "image": args.image_model, "unet": args.unet_model}[kind]
            models[kind] = given or demo_model_path(kind)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        cfg = BenchConfig(
            models=models, methods=methods, seeds=args.seeds, prompts=args.prompts, steps=args.steps,
            sizes={k: v for k, v in (("video", args.video_size), ("image", args.image_size), ("unet", args.unet_size))
                   if v is not None},
            guidance=args.guidance,
            max_sequence_length=args.max_sequence_length, dtype=args.dtype, device=device, warmup=args.warmup,
            queries=args.queries, method_opts=parse_method_opts(args.method_opt), progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"diffattn bench quality: {exc}", file=sys.stderr)
        return 2
    report = run_bench(cfg)
    plot = None if args.plot.lower() == "none" else args.plot
    if plot:
        decays = {}
        for kind, m in report["models"].items():
            e = m["energy"]
            label = f"{kind} ({m['family']}, grid {'x'.join(map(str, e['grid']))})"
            decays[label] = EnergyDecay.from_dict(e)
        plot_energy_decay(decays, plot)
        report["plot"] = plot
    text = render_markdown(report, plot)
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")
    write_json(_jsonable(report), args.json)
    errors = [f"{k}/{label}" for k, m in report["models"].items() for label, r in m["methods"].items() if "error" in r]
    if errors:
        print(f"diffattn bench quality: failed: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `diffattn` console script.

Subcommands: `generate` (an image or a video with a method), `methods` (what exists, for which families, with which
options), `bench` (GPU benchmarks), `mask` (draw a method's block mask), `render --highres` (FreeSwim), `headhunt`
(HeadHunter search), `app` (the Gradio web app).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import Callable

# `diffattn bench <what>`: module with `main(argv) -> int`, loaded only when asked for.
BENCHES = {
    "kernels": ("diffattn.kernels.block_sparse.bench", "block-sparse attention kernel vs cuDNN SDPA and FlexAttention"),
    "gna": ("diffattn.kernels.neighborhood.bench", "neighborhood attention kernel vs cuDNN SDPA (NATTEN's figures)"),
    "step": ("diffattn.step_bench", "one denoising step of a full-size video transformer, dense vs a method"),
    "quality": ("diffattn.quality_bench", "every method vs dense on the demo models: PSNR, SSIM, attention energy decay"),
}


def _cmd_methods(args: argparse.Namespace) -> int:
    from .registry import PLANNED, _REGISTRY

    for spec in _REGISTRY.values():
        print(f"{spec.name}: {spec.summary}")
        print(f"  families: {', '.join(spec.families)}")
        specs = spec.config_cls.option_specs()
        if not specs:
            print("  options: (none)")
        for opt in specs:
            print(f"  {opt.name}: default {opt.default!r}; {opt.accepted()}. {opt.help}")
    if args.all:
        for name, (summary, families) in PLANNED.items():
            if name not in _REGISTRY:
                print(f"{name}: {summary} [not available yet]")
                print(f"  families: {', '.join(families)}")
    return 0


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    module_name, _ = BENCHES[args.what]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"diffattn bench {args.what}: not available ({exc})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


def _cmd_mask(args: argparse.Namespace, rest: list[str]) -> int:
    if args.method != "radial":
        print(f"diffattn mask: no mask drawing for method {args.method!r} yet (available: radial)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="diffattn mask radial", description="draw the Radial block mask as PNG")
    parser.add_argument("--frames", type=int, required=True, help="latent frames (video tokens along time)")
    parser.add_argument("--tokens-per-frame", type=int, required=True, help="tokens per latent frame (H*W after patchify)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--decay-factor", type=float, default=1.0)
    parser.add_argument("--no-sink", action="store_true", help="no frame-0 attention sink")
    parser.add_argument("--out", default="radial_mask.png", help="PNG path")
    opts = parser.parse_args(rest)
    try:
        from .masks import draw_block_mask, radial_mask
        from .masks.radial import describe
    except ImportError as exc:
        print(f"diffattn mask radial: not available yet ({exc})", file=sys.stderr)
        return 2
    kwargs = dict(block_size=opts.block_size, decay_factor=opts.decay_factor, sink=not opts.no_sink)
    try:
        mask = radial_mask(opts.frames, opts.tokens_per_frame, **kwargs)
        info = describe(opts.frames, opts.tokens_per_frame, **kwargs)
    except ValueError as exc:
        print(f"diffattn mask radial: {exc}", file=sys.stderr)
        return 2
    title = f"radial {opts.frames}x{opts.tokens_per_frame} block {opts.block_size} decay {opts.decay_factor}"
    draw_block_mask(mask, opts.out, title=title, tokens_per_frame=opts.tokens_per_frame, block_size=opts.block_size)
    for key, value in info.items():
        print(f"{key}: {value}")
    print(f"wrote {opts.out}")
    return 0


def _cmd_render(args: argparse.Namespace, rest: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffattn render", description="high-resolution or long video rendering")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--highres", action="store_true", help="FreeSwim: native-size pass, then refine at the target size")
    mode.add_argument("--long", action="store_true", help="Radial long video (not available yet)")
    parser.add_argument("--model", required=True, help="a Wan T2V Diffusers folder or hub id")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--base-height", type=int, default=480)
    parser.add_argument("--base-width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--cache-steps", type=int, default=2)
    parser.add_argument("--cache-device", choices=("same", "cpu"), default="same")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--offload", action="store_true", help="model CPU offload (fits 1080p in 24 GB with the cache on CPU)")
    parser.add_argument("--out", default="freeswim.mp4", help=".mp4 or .gif; a .json sidecar with the settings is written next to it")
    opts = parser.parse_args(rest)
    if opts.long:
        print("diffattn render --long: not available yet (Radial long-video rendering)", file=sys.stderr)
        return 2
    import torch

    from .generate import load_pipeline, write_result, write_sidecar
    from .pipelines import FreeSwimPipeline

    try:
        pipe = load_pipeline(opts.model, dtype=opts.dtype, device=opts.device, offload=opts.offload, cls=FreeSwimPipeline)
        start = time.perf_counter()
        result = pipe(
            opts.prompt, negative_prompt=opts.negative_prompt, height=opts.height, width=opts.width,
            num_frames=opts.frames, base_height=opts.base_height, base_width=opts.base_width,
            num_inference_steps=opts.steps, strength=opts.strength, cache_steps=opts.cache_steps,
            cache_device=opts.cache_device, guidance_scale=opts.guidance, max_sequence_length=opts.max_sequence_length,
            generator=torch.Generator(device="cpu").manual_seed(opts.seed), output_type="np",
        )
        seconds = time.perf_counter() - start
        written = write_result(result, opts.out)
    except torch.cuda.OutOfMemoryError:
        print("diffattn render: CUDA out of memory; try --offload and --cache-device cpu", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"diffattn render: {exc}", file=sys.stderr)
        return 2
    sidecar = write_sidecar(opts.out, vars(opts), written, seconds)
    print(f"wrote {opts.out} ({written.get('frames', 1)} frames, {seconds:.1f} s) and {sidecar}")
    return 0


def _cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffattn generate", description="generate an image or a video")
    parser.add_argument("--model", default=None, help="a Diffusers pipeline folder or hub id")
    parser.add_argument("--attn", default=None, help="attention method (diffattn methods); default: the model's own")
    parser.add_argument("--attn-opt", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None, help="video pipelines only")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--offload", action="store_true", help="model CPU offload")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--out", default=None, help=".mp4/.gif/.webm for video, .png/.webp/.jpg for images")
    opts = parser.parse_args(rest)
    if opts.model is None:
        print("diffattn generate: no bundled demo model yet (it is still being trained); pass --model FOLDER_OR_HUB_ID",
              file=sys.stderr)
        return 2
    import torch

    from .generate import load_pipeline, parse_method_options, run_generation, write_result, write_sidecar

    dtype = opts.dtype or ("bf16" if opts.device.startswith("cuda") else "fp32")
    try:
        options = parse_method_options(opts.attn, opts.attn_opt) if opts.attn else {}
        if opts.attn_opt and not opts.attn:
            raise ValueError("--attn-opt needs --attn METHOD")
        pipe = load_pipeline(opts.model, dtype=dtype, device=opts.device, offload=opts.offload)
        result, seconds = run_generation(
            pipe, opts.prompt, method=opts.attn, options=options, seed=opts.seed,
            negative_prompt=opts.negative_prompt, num_inference_steps=opts.steps, height=opts.height, width=opts.width,
            num_frames=opts.frames, guidance_scale=opts.guidance, max_sequence_length=opts.max_sequence_length,
            output_type="np",
        )
        out = opts.out or ("out.mp4" if getattr(result, "frames", None) is not None else "out.png")
        written = write_result(result, out, fps=opts.fps)
    except torch.cuda.OutOfMemoryError:
        print("diffattn generate: CUDA out of memory; try --offload, a smaller size or --dtype bf16", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"diffattn generate: {exc}", file=sys.stderr)
        return 2
    settings = {**vars(opts), "dtype": dtype, "out": out, "attn_options": options}
    sidecar = write_sidecar(out, settings, written, seconds)
    print(f"wrote {out} ({written['kind']}, {seconds:.1f} s) and {sidecar}")
    return 0


def _app(rest: list[str]) -> int:
    try:
        from .app import main as app_main
    except ImportError as exc:
        print(f"diffattn app: the app needs the app extra (pip install -e '.[app]'): {exc}", file=sys.stderr)
        return 2
    return int(app_main(rest) or 0)


def _headhunt(rest: list[str]) -> int:
    from .pipelines.headhunter import main as headhunt_main

    return headhunt_main(rest)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn", description="Attention methods for Hugging Face Diffusers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list methods, supported model families and options")
    p.add_argument("--all", action="store_true", help="also list the methods that are not available yet")
    p = sub.add_parser("bench", help="benchmarks (GPU)")
    p.add_argument("what", choices=sorted(BENCHES), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    sub.add_parser("generate", help="generate an image or a video with a method (--help for options)", add_help=False)
    sub.add_parser("render", help="--highres (FreeSwim) or --long (Radial) video rendering", add_help=False)
    sub.add_parser("headhunt", help="HeadHunter: greedy search for SoftPAG heads (--help for options)", add_help=False)
    sub.add_parser("app", help="the Gradio web app (--help for options)", add_help=False)
    p = sub.add_parser("mask", help="draw a method's block mask as PNG")
    p.add_argument("method", help="method name (radial)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    handlers: dict[str, Callable[[], int]] = {
        "methods": lambda: _cmd_methods(args) if not rest else parser.error(f"unrecognized arguments: {' '.join(rest)}"),
        "bench": lambda: _cmd_bench(args, rest),
        "mask": lambda: _cmd_mask(args, rest),
        "render": lambda: _cmd_render(args, rest),
        "generate": lambda: _cmd_generate(args, rest),
        "headhunt": lambda: _headhunt(rest),
        "app": lambda: _app(rest),
    }
    return handlers[args.command]()


if __name__ == "__main__":
    sys.exit(main())

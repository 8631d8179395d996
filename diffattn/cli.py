"""The `diffattn` console script (docs/cli.md).

Subcommands: `generate` (an image or a video with a method; the bundled demo model by default), `methods` (what
exists, for which families, with which options), `bench` (GPU benchmarks), `mask` (a method's mask at a model
geometry, via `diffattn.explorer`), `render --highres` (FreeSwim) and `render --long` (Radial long video, with
an optional LoRA), `headhunt` (HeadHunter search), `app` (the Gradio web app).

User errors are one line on stderr and exit status 2 (`_guarded`); generation shares `diffattn.generate`'s
load/run/write helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .bench import BENCHES, bench_module


def _cmd_methods(args: argparse.Namespace) -> int:
    from .registry import PLANNED, available_methods, method_specs

    for spec in method_specs():
        print(f"{spec.name}: {spec.summary}")
        print(f"  families: {', '.join(spec.families)}")
        specs = spec.config_cls.option_specs()
        if not specs:
            print("  options: (none)")
        for opt in specs:
            print(f"  {opt.name}: default {opt.default!r}; {opt.accepted()}. {opt.help}")
    if args.all:
        for name, (summary, families) in PLANNED.items():
            if name not in available_methods():
                print(f"{name}: {summary} [not available yet]")
                print(f"  families: {', '.join(families)}")
    return 0


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.what is None:
        print("usage: diffattn bench NAME [options]   (diffattn bench NAME --help for a benchmark's options)")
        for name, summary in sorted(BENCHES.items()):
            print(f"  {name:<8} {summary}")
        return 0 if {"-h", "--help"} & set(rest) else 2
    try:
        module = importlib.import_module(bench_module(args.what))
    except ImportError as exc:
        return _fail(f"diffattn bench {args.what}", f"not available ({exc})")
    return int(module.main(rest) or 0)


def _fail(prog: str, message: object) -> int:
    """One line on stderr, exit status 2 (the CLI never shows a traceback for a user error)."""
    text = " ".join(str(message).split())
    print(f"{prog}: {text}", file=sys.stderr)
    return 2


def _guarded(prog: str, fn: Callable[[], int], *, oom_advice: str = "try --offload or a smaller size") -> int:
    """Run `fn`; user errors (bad value, missing file, unsupported model, CUDA out of memory) become one line."""
    try:
        import torch

        oom: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)
    except ImportError:  # pragma: no cover - torch is a dependency
        oom = ()
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except oom:
        return _fail(prog, f"CUDA out of memory; {oom_advice}")
    except (ValueError, OSError) as exc:
        return _fail(prog, exc)


# ------------------------------------------------------------------------------------------------------------------
# mask
# ------------------------------------------------------------------------------------------------------------------
def _mask_parser(method: str) -> argparse.ArgumentParser:
    from .explorer import GEOMETRIES, mask_options
    from .registry import get_method

    geometries = "\n".join(f"  {name:16} {'x'.join(map(str, g.grid)):10} {g.doc}" for name, g in GEOMETRIES.items())
    parser = argparse.ArgumentParser(
        prog=f"diffattn mask {method}", description=f"draw the {method} mask at a model geometry, with its density and "
        "predicted attention speed-up", epilog=f"geometries (--geometry NAME):\n{geometries}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--geometry", help="a named model geometry (below)")
    where.add_argument("--grid", help="token grid F,H,W (video) or H,W (image), after patchify")
    parser.add_argument("--family", default=None, help="model family whose defaults apply (default: the geometry's)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="mask option, repeatable")
    parser.add_argument("--frames", type=int, help="latent frames (with --tokens-per-frame, instead of --grid)")
    parser.add_argument("--tokens-per-frame", type=int, help="tokens per latent frame (H*W after patchify)")
    config = get_method(method).config_cls
    kinds = {o.name: o for o in config.option_specs()}
    for name, help_text in mask_options(method).items():
        flag = name.replace("_", "-")
        parser.add_argument(f"--{flag}", dest=f"opt_{name}", metavar=name.upper(), default=None, help=help_text)
        if name in kinds and kinds[name].type in (bool, bool | None):
            parser.add_argument(f"--no-{flag}", dest=f"opt_{name}", action="store_const", const="false",
                                help=f"= --{flag} false")
    parser.add_argument("--out", default=f"{method}_mask.png", help="PNG path")
    return parser


def _mask_usage() -> str:
    from .explorer import GEOMETRIES, METHODS

    geometries = "\n".join(f"  {name:16} {'x'.join(map(str, g.grid)):10} {g.doc}" for name, g in GEOMETRIES.items())
    return (f"usage: diffattn mask METHOD [--geometry NAME | --grid F,H,W | --grid H,W] [options]\n"
            f"draw a method's mask at a model geometry: PNG, density, predicted attention speed-up\n\n"
            f"methods: {', '.join(METHODS)} (diffattn mask METHOD --help for its options)\n"
            f"geometries:\n{geometries}")


def _cmd_mask(args: argparse.Namespace, rest: list[str]) -> int:
    from .explorer import METHODS, explore_mask, parse_mask_options

    if args.method is None or args.method in ("-h", "--help"):
        print(_mask_usage())
        return 0 if args.method is not None or {"-h", "--help"} & set(rest) else 2
    if args.method not in METHODS:
        return _fail("diffattn mask", f"no mask picture for method {args.method!r}; accepted: {', '.join(METHODS)}")
    prog = f"diffattn mask {args.method}"
    opts = _mask_parser(args.method).parse_args(rest)

    def run() -> int:
        pairs = list(opts.opt)
        pairs += [f"{k[4:]}={v}" for k, v in vars(opts).items() if k.startswith("opt_") and v is not None]
        options = parse_mask_options(args.method, pairs)
        geometry = _mask_geometry(opts)
        if Path(opts.out).suffix.lower() != ".png":
            raise ValueError(f"--out must end in .png, got {opts.out!r}")
        view = explore_mask(args.method, geometry, family=opts.family, **options)
        view.save(opts.out)
        for key, value in view.info.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        print(f"predicted attention speed-up: {view.predicted_speedup:.2f}x (1 / density {view.density:.4f}; "
              "the sparse part only, before warm-up steps, dense layers and text)")
        print(f"wrote {opts.out}")
        return 0

    return _guarded(prog, run)


def _mask_geometry(opts: argparse.Namespace) -> str | tuple[int, ...]:
    frames, per_frame = opts.frames, opts.tokens_per_frame
    if frames is not None or per_frame is not None:
        if opts.geometry or opts.grid:
            raise ValueError("--frames/--tokens-per-frame replace --geometry/--grid; give one of them")
        if frames is None or per_frame is None:
            raise ValueError("--frames and --tokens-per-frame go together")
        for name, value in (("num_frames", frames), ("tokens_per_frame", per_frame)):
            if value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value}")
        return (frames, 1, per_frame)
    if opts.geometry:
        return opts.geometry
    if opts.grid:
        try:
            return tuple(int(v) for v in opts.grid.split(","))
        except ValueError:
            raise ValueError(f"--grid must be comma-separated ints F,H,W or H,W, got {opts.grid!r}") from None
    raise ValueError("give --geometry NAME or --grid F,H,W (see --help for the names)")


# ------------------------------------------------------------------------------------------------------------------
# generation: shared by generate, render --long and render --highres
# ------------------------------------------------------------------------------------------------------------------
def _resolve_model(model: str | None) -> tuple[str, bool]:
    """(model, is_demo): the given folder/hub id, or the bundled demo video model (FileNotFoundError if absent)."""
    if model is not None:
        return model, False
    from .demo import demo_model_path

    return demo_model_path("video"), True


def _resolve_prompt(prompt: str | None, is_demo: bool) -> str:
    """The prompt; without --prompt, the demo model's example (only for the demo model). An empty prompt is an error,
    never silently the demo prompt."""
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty; give the text to generate from")
        return prompt
    if is_demo:
        from .demo import DEMO_PROMPTS

        return DEMO_PROMPTS["video"]
    raise ValueError("--prompt is required with --model")


def _check_suffix(out: str | None) -> None:
    """An output suffix no writer knows is refused before the model loads."""
    from .generate import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    if out is not None and Path(out).suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise ValueError(f"unknown output suffix in --out {out!r}; video: {', '.join(VIDEO_SUFFIXES)}, "
                         f"images: {', '.join(IMAGE_SUFFIXES)}")


def _makes_video(pipe) -> bool:
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def _output_for(pipe, out: str | None, stem: str) -> str:
    """`out` checked against what the pipeline makes (before it runs), or `stem` + the first suffix of that kind."""
    from .generate import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    video = _makes_video(pipe)
    suffixes = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
    if out is None:
        return stem + suffixes[0]
    if Path(out).suffix.lower() not in suffixes:
        raise ValueError(f"this pipeline makes {'video' if video else 'images'}; --out must end in "
                         f"{', '.join(suffixes)}, got {out!r}")
    return out


@contextlib.contextmanager
def _decode_notice(pipe, prog: str) -> Iterator[None]:
    """Say when the VAE decode starts (the pipeline's bar covers denoising only; decoding a long video takes a
    while): `pipe.vae.decode` is wrapped on the instance while the block runs, then restored."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not callable(getattr(vae, "decode", None)):
        yield
        return
    own = vae.__dict__.get("decode")
    original = vae.decode

    def decode(*args, **kwargs):
        print(f"{prog}: decoding with the VAE ...", file=sys.stderr, flush=True)
        return original(*args, **kwargs)

    vae.decode = decode
    try:
        yield
    finally:
        if own is None:
            del vae.decode
        else:
            vae.decode = own


def _write(prog: str, result, out: str, fps: int, overwrite: bool = True) -> dict:
    from .generate import write_result

    frames = getattr(result, "frames", None)
    what = f"{len(frames[0])} frames" if frames is not None else "the image"
    print(f"{prog}: writing {what} to {out} ...", file=sys.stderr, flush=True)
    return write_result(result, out, fps=fps, overwrite=overwrite)


def _add_generation_args(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """Options every generating command shares; None defaults leave the pipeline's own defaults."""
    parser.add_argument("--model", default=None,
                        help="a Diffusers pipeline folder or hub id (default: the bundled demo video model)")
    parser.add_argument("--prompt", default=None, help="required with --model (default: the demo model's example)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--height", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--width", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--offload", action="store_true", help="model CPU offload (less GPU memory, slower)")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--out", default=None, help=out_help)


def _cmd_render(args: argparse.Namespace, rest: list[str]) -> int:
    if "--long" in rest:
        return _cmd_render_long([a for a in rest if a != "--long"])
    return _cmd_render_highres(rest)


def _cmd_render_highres(rest: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffattn render", description="high-resolution or long video rendering")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--highres", action="store_true", help="FreeSwim: native-size pass, then refine at the target size")
    mode.add_argument("--long", action="store_true", help="Radial long video (diffattn render --long --help)")
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
    parser.add_argument("--offload", action="store_true", help="model CPU offload (for 1080p on 24 GB: with --cache-device "
                        "cpu and --vae-tiling; see docs/freeswim.md)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode/encode the VAE in tiles (an untiled 1080p x 81 "
                        "decode needs tens of GiB)")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--out", default="freeswim.mp4", help=".mp4, .gif or .webm; a .json sidecar with the settings is written next to it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out and its sidecar (default: refuse, nothing is written)")
    opts = parser.parse_args(rest)
    prog = "diffattn render --highres"

    def run() -> int:
        from .generate import check_output, write_sidecar
        from .pipelines.render import load_highres_pipeline, render_highres
        from .settings import GenerationSettings, validate

        _check_suffix(opts.out)
        validate(GenerationSettings(  # the generate command's checks, before minutes of loading
            prompt=opts.prompt, negative_prompt=opts.negative_prompt, seed=opts.seed, steps=opts.steps,
            height=opts.height, width=opts.width, frames=opts.frames, guidance=opts.guidance,
            max_sequence_length=opts.max_sequence_length, fps=opts.fps, device=opts.device, dtype=opts.dtype))
        check_output(opts.out, opts.overwrite)
        pipe = load_highres_pipeline(opts.model, dtype=opts.dtype, device=opts.device, offload=opts.offload,
                                     vae_tiling=opts.vae_tiling)
        _output_for(pipe, opts.out, "freeswim")
        with _decode_notice(pipe, prog):
            result, seconds = render_highres(
                pipe, opts.prompt, seed=opts.seed, negative_prompt=opts.negative_prompt, height=opts.height,
                width=opts.width, num_frames=opts.frames, base_height=opts.base_height, base_width=opts.base_width,
                num_inference_steps=opts.steps, strength=opts.strength, cache_steps=opts.cache_steps,
                cache_device=opts.cache_device, guidance_scale=opts.guidance,
                max_sequence_length=opts.max_sequence_length,
            )
        written = _write(prog, result, opts.out, opts.fps, overwrite=opts.overwrite)
        sidecar = write_sidecar(opts.out, vars(opts), written, seconds, overwrite=opts.overwrite)
        print(f"wrote {opts.out} ({written.get('frames', 1)} frames, {seconds:.1f} s) and {sidecar}")
        return 0

    return _guarded(prog, run, oom_advice="try --offload and --cache-device cpu")


def _add_option_flags(parser: argparse.ArgumentParser, method: str) -> tuple[str, ...]:
    """`--flag`s for the options the method's spec gives their own flags (`cli_flags`), parsed by its config;
    returns the option names (each flag's value is None when not given)."""
    from .registry import get_method

    spec = get_method(method)
    by_name = {o.name: o for o in spec.config_cls.option_specs()}
    for name in spec.cli_flags:
        def parse(text: str, name: str = name):
            return spec.config_cls.parse_option(name, text)

        parse.__name__ = by_name[name].accepted()  # argparse names the type in "invalid ... value" errors
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=parse, default=None,
                            metavar=name.upper(), help=f"{method} option: {by_name[name].help}")
    return spec.cli_flags


def _cmd_render_long(rest: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="diffattn render --long", description="Radial Attention long video: more frames than the model was "
        "trained on, optionally with a length-extension LoRA (diffattn.pipelines.radial_lora)",
    )
    _add_generation_args(parser, out_help=".mp4, .gif or .webm (default long.mp4); a .json sidecar is written next to it")
    parser.add_argument("--frames", type=int, default=None,
                        help="video frames (default: the LoRA's training length, else --extend x the pipeline's)")
    parser.add_argument("--extend", type=int, default=2, help="without --frames: this many times the pipeline's "
                        "default length, (F - 1) * N + 1 frames (default 2)")
    parser.add_argument("--lora", default=None, help="a LoRA folder or file, loaded with pipe.load_lora_weights; a "
                        "radial LoRA folder (lora_config.json) also gives its radial options and training length")
    flags = _add_option_flags(parser, "radial")
    parser.add_argument("--attn-opt", action="append", default=[], metavar="KEY=VALUE", help="other radial options")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out and its sidecar (default: refuse, nothing is written)")
    opts = parser.parse_args(rest)
    prog = "diffattn render --long"

    def run() -> int:
        from .generate import check_output, load_pipeline, parse_method_options, write_sidecar
        from .pipelines.render import plan_long, render_long
        from .registry import get_method
        from .settings import GenerationSettings, validate

        if opts.extend < 1:
            raise ValueError(f"--extend must be an int >= 1, got {opts.extend}")
        if opts.lora is not None and not Path(opts.lora).exists():
            raise ValueError(f"--lora {opts.lora!r} does not exist")
        _check_suffix(opts.out)
        model, is_demo = _resolve_model(opts.model)
        prompt = _resolve_prompt(opts.prompt, is_demo)
        dtype = opts.dtype or ("bf16" if opts.device.startswith("cuda") else "fp32")
        validate(GenerationSettings(  # the generate command's checks, before minutes of loading
            prompt=prompt, negative_prompt=opts.negative_prompt, seed=opts.seed, steps=opts.steps, height=opts.height,
            width=opts.width, frames=opts.frames, guidance=opts.guidance, max_sequence_length=opts.max_sequence_length,
            fps=opts.fps, device=opts.device, dtype=dtype))
        if opts.out is not None:
            check_output(opts.out, opts.overwrite)  # before minutes of loading and generating
        options = parse_method_options("radial", opts.attn_opt)
        options.update({k: getattr(opts, k) for k in flags if getattr(opts, k) is not None})
        get_method("radial").config_cls.from_options(**options)  # bad values fail before the model loads
        pipe = load_pipeline(model, dtype=dtype, device=opts.device, offload=opts.offload)
        if not _makes_video(pipe):
            raise ValueError(f"needs a video pipeline (Wan, HunyuanVideo, CogVideoX); {type(pipe).__name__} makes images")
        out = _output_for(pipe, opts.out, "long")
        check_output(out, opts.overwrite)
        plan = plan_long(pipe, options=options, frames=opts.frames, extend=opts.extend, height=opts.height,
                         width=opts.width, lora=opts.lora)
        with _decode_notice(pipe, prog):
            result, seconds = render_long(
                pipe, prompt, plan, seed=opts.seed, negative_prompt=opts.negative_prompt,
                num_inference_steps=opts.steps, guidance_scale=opts.guidance,
                max_sequence_length=opts.max_sequence_length,
            )
        written = _write(prog, result, out, opts.fps, overwrite=opts.overwrite)
        settings = {**vars(opts), "model": model, "prompt": prompt, "dtype": dtype, "out": out, "frames": plan.frames,
                    "height": plan.height, "width": plan.width, "default_frames": plan.default_frames,
                    "attn": "radial", "attn_options": plan.options, "lora_kind": plan.lora_kind}
        sidecar = write_sidecar(out, settings, written, seconds, pipe=pipe, overwrite=opts.overwrite)
        print(f"wrote {out} ({written['frames']} frames, radial, {seconds:.1f} s) and {sidecar}")
        return 0

    return _guarded(prog, run, oom_advice="try --offload, fewer --frames or a smaller size")


def _cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffattn generate", description="generate an image or a video")
    _add_generation_args(parser, out_help=".mp4/.gif/.webm for video (default out.mp4), .png/.webp/.jpg for images "
                         "(default out.png); the sidecar OUT.json (e.g. out.mp4.json) has every setting")
    parser.add_argument("--attn", default=None, help="attention method (diffattn methods); default: the model's own")
    parser.add_argument("--attn-opt", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    parser.add_argument("--frames", type=int, default=None, help="video pipelines only")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out and its sidecar (default: refuse, nothing is written)")
    parser.add_argument("--layout", default=None, help="layout.json (phrases + boxes): layout-to-image with ficgen "
                        "(UNet pipelines; trained modules with --attn-opt weights=FOLDER); see docs/ficgen.md")
    opts = parser.parse_args(rest)
    prog = "diffattn generate"
    written_here: list[str] = []

    def run() -> int:
        from .generate import (
            check_model,
            check_output,
            load_pipeline,
            nonfinite,
            parse_method_options,
            run_generation,
            write_sidecar,
        )
        from .settings import GenerationSettings, fit_to_pipeline, method_report, validate

        if opts.attn_opt and not opts.attn:
            raise ValueError("--attn-opt needs --attn METHOD")
        if opts.layout is not None:  # layout-to-image: ficgen with the layout (its phrases use the pipeline's encoder)
            from .layout import Layout

            if opts.attn not in (None, "ficgen"):
                raise ValueError(f"--layout needs --attn ficgen (or no --attn), got --attn {opts.attn}")
            opts.attn = "ficgen"
            opts.attn_opt = [*opts.attn_opt, f"layout={opts.layout}"]
            opts.layout = Layout.load(opts.layout).to_dict()  # validated now; the sidecar records it
        options = parse_method_options(opts.attn, opts.attn_opt) if opts.attn else {}
        _check_suffix(opts.out)
        model, is_demo = _resolve_model(opts.model)
        prompt = _resolve_prompt(opts.prompt, is_demo)
        dtype = opts.dtype or ("bf16" if opts.device.startswith("cuda") else "fp32")
        settings = validate(GenerationSettings(
            prompt=prompt, negative_prompt=opts.negative_prompt, seed=opts.seed, steps=opts.steps, height=opts.height,
            width=opts.width, frames=opts.frames, guidance=opts.guidance, max_sequence_length=opts.max_sequence_length,
            fps=opts.fps, device=opts.device, dtype=dtype,
        ))
        check_model(model)
        if opts.out is not None:
            check_output(opts.out, opts.overwrite)  # before minutes of loading and generating
        pipe = load_pipeline(model, dtype=settings.dtype, device=settings.device, offload=opts.offload)
        out = _output_for(pipe, opts.out, "out")
        check_output(out, opts.overwrite)
        fitted = fit_to_pipeline(pipe, settings)
        report = method_report(opts.attn, options, pipe, fitted) if opts.attn else {"notices": []}
        notices = fitted.notices + report["notices"]
        for notice in notices:
            logging.getLogger("diffattn").warning("%s: %s", prog, notice)
        s = fitted.settings
        with _decode_notice(pipe, prog):
            result, seconds = run_generation(
                pipe, s.prompt, method=opts.attn, options=options, seed=s.seed, negative_prompt=s.negative_prompt,
                num_inference_steps=s.steps, height=s.height, width=s.width, num_frames=s.frames,
                guidance_scale=s.guidance, max_sequence_length=s.max_sequence_length, output_type="np",
            )
        if nonfinite(result):
            raise ValueError("the result holds NaN or infinite pixels (numerical overflow: try --dtype fp32 or a "
                             "smaller --guidance); nothing written")
        written = _write(prog, result, out, s.fps, overwrite=opts.overwrite)
        written_here.append(out)
        record = {**vars(opts), "model": model, "prompt": s.prompt, "dtype": s.dtype, "out": out, "frames": s.frames,
                  "attn_options": options, "requested": fitted.requested, "notices": notices}
        if opts.attn:
            record["attn_effective_options"] = report["effective_options"]
        sidecar = write_sidecar(out, record, written, seconds, pipe=pipe, overwrite=opts.overwrite)
        written_here.clear()
        print(f"wrote {out} ({written['kind']}, {seconds:.1f} s) and {sidecar}")
        return 0

    def guarded_run() -> int:
        try:
            return run()
        except KeyboardInterrupt:
            for path in written_here:  # the result without its sidecar: not a finished output
                Path(path).unlink(missing_ok=True)
            raise

    return _guarded(prog, guarded_run, oom_advice="try --offload, a smaller size or --dtype bf16")


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
    # no -h here: `diffattn bench NAME --help` reaches that benchmark's own parser
    p = sub.add_parser("bench", help="benchmarks (GPU; diffattn bench NAME --help for its options)", add_help=False)
    p.add_argument("what", nargs="?", choices=sorted(BENCHES), help="; ".join(f"{k}: {v}" for k, v in BENCHES.items()))
    sub.add_parser("generate", help="generate an image or a video with a method (--help for options)", add_help=False)
    sub.add_parser("render", help="--highres (FreeSwim) or --long (Radial) video rendering", add_help=False)
    sub.add_parser("headhunt", help="HeadHunter: greedy search for SoftPAG heads (--help for options)", add_help=False)
    sub.add_parser("app", help="the Gradio web app (--help for options)", add_help=False)
    p = sub.add_parser("mask", help="a method's mask at a model geometry: PNG, density, predicted speed-up",
                       add_help=False)
    p.add_argument("method", nargs="?", help="a method with a mask picture (diffattn mask --help lists them; "
                   "diffattn mask METHOD --help for its options)")
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

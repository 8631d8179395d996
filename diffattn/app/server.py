"""`build_app` (the Blocks with every tab) and `main` (the `diffattn app` command line)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from ..settings import Limits, check_device, check_dtype
from .runner import PipelineCache, Runner

logger = logging.getLogger("diffattn")

TITLE = "diffattn: attention methods for Diffusers"
INTRO = (
    "Generate with an attention method, compare it with dense attention at the same seed, or look at the mask a "
    "method computes. Each method's options are generated from its config (defaults, ranges, help). "
    "Models: any Diffusers pipeline folder or hub id; the defaults are the bundled demo models."
)


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def build_app(video_model: str | None = None, image_model: str | None = None, device: str = "cpu",
              dtype: str = "fp32", out_dir: str | None = None, limits: Limits | None = None):
    """The app's `gradio.Blocks` (not launched). `video_model`/`image_model` prefill the model boxes (None: the
    bundled demo models); generations run on `device` in `dtype`, one at a time, each within `limits` (default:
    `Limits.from_env()`); files go to `out_dir` (default: a temp dir)."""
    import gradio as gr

    from .layout_tab import layout_tab
    from .mask_tab import mask_tab
    from .tabs import compare_tab, generation_tab

    check_device(device)  # a bad device or dtype fails here, not at the first click
    check_dtype(dtype, device)
    limits = limits or Limits.from_env()
    out = Path(out_dir or tempfile.mkdtemp(prefix="diffattn-app-"))
    runner = Runner(out, device=device, dtype=dtype, cache=PipelineCache(capacity=3), limits=limits)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\n{INTRO} Running on `{device}` in `{dtype}`.")
        with gr.Tabs():
            with gr.Tab("Video", elem_id="tab-video"):
                generation_tab("video", runner, video_model, demo)
            with gr.Tab("Image", elem_id="tab-image"):
                generation_tab("image", runner, image_model, demo)
            with gr.Tab("Compare", elem_id="tab-compare"):
                compare_tab(runner, video_model, image_model, demo)
            with gr.Tab("Mask explorer", elem_id="tab-mask"):
                mask_tab(demo, limits)
            layout_tab(runner, demo)  # diffattn/app/layout_tab.py (FICGen)
    demo.diffattn_out_dir = str(out)  # the launcher allows Gradio to serve files from here
    demo.diffattn_limits = limits
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn app", description="the diffattn Gradio web app")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument("--video-model", default=None, help="video pipeline folder or hub id (default: the demo model)")
    parser.add_argument("--image-model", default=None, help="image pipeline folder or hub id (default: the demo model)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out-dir", default=None, help="where results and sidecars are written (default: a temp dir)")
    parser.add_argument("--queue-size", type=int, default=16, help="waiting requests beyond this are refused")
    limits = parser.add_argument_group("limits per request (default: the environment variable, else the value shown)")
    for name, env in Limits.ENV.items():
        flag = "--" + name.replace("_", "-")
        what = {"max_steps": "denoising steps", "max_frames": "video frames", "max_pixels": "height x width",
                "max_grid_tokens": "Mask explorer token grid (frames x height x width)"}[name]
        limits.add_argument(flag, type=int, default=None, metavar="N",
                            help=f"{what} (${env}; default {getattr(Limits, name)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`diffattn app ...`: build and serve the app until interrupted. One generation runs at a time (a queue)."""
    opts = build_parser().parse_args(argv)
    device = opts.device or default_device()
    dtype = opts.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    try:
        limits = Limits.from_env(**{name: getattr(opts, name) for name in Limits.ENV})
        demo = build_app(opts.video_model, opts.image_model, device=device, dtype=dtype, out_dir=opts.out_dir,
                         limits=limits)
    except ValueError as exc:  # a bad device, dtype or limit: one line, exit 2
        print(f"diffattn app: {exc}", file=sys.stderr)
        return 2
    demo.queue(default_concurrency_limit=1, max_size=opts.queue_size)
    print(f"diffattn app on http://{opts.host}:{opts.port} ({device}, {dtype}); results in {demo.diffattn_out_dir}; "
          f"limits per request: {limits}", flush=True)
    demo.launch(server_name=opts.host, server_port=opts.port, share=opts.share, allowed_paths=[demo.diffattn_out_dir],
                show_error=True, quiet=True)
    return 0

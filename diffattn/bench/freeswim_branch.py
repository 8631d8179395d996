"""`diffattn bench freeswim-branch`: FreeSwim's sparse full branch (`full_branch="radial"|"gna"`) against its dense
full branch on the bundled demo video model (Wan architecture, trained at 64x64 px, 17 frames: 5 latent frames of
32x32 tokens), generated at twice its training size (128x128 px: 5 x 64 x 64 = 20,480 tokens).

The window is the training grid (32x32 tokens; given through `vae_scale_factor=4`, `base_height=base_width=256`
"pixels", as `diffattn bench quality` expresses the demo's pixel-space grid). For each (prompt, seed) the same
generation runs with plain dense attention, FreeSwim with the dense full branch (upstream), and with each sparse
full branch; reported: PSNR and SSIM of each sparse branch against the dense branch (the quality cost of the change)
and of every FreeSwim variant against plain dense, and the seconds per generation.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from typing import Any

import torch

logger = logging.getLogger("diffattn")

PROMPTS = (
    "a red circle moving right on a blue background",
    "a yellow square moving down on a black background",
    "a white triangle moving left on a purple background",
)
BRANCHES = ("dense", "radial", "gna")


def run(*, steps: int, frames: int, size: int, seeds: list[int], prompts: list[str], device: str, dtype: str,
        branches: tuple[str, ...] = BRANCHES, cache_steps: int = 2, height: int | None = None,
        plain_dense: bool = True) -> dict[str, Any]:
    import diffattn
    from ..demo import demo_model_path
    from ..generate import load_pipeline
    from .metrics import psnr, ssim

    pipe = load_pipeline(demo_model_path("video"), dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    base = dict(vae_scale_factor=4, base_height=256, base_width=256, cache_steps=cache_steps)
    height = height or size
    if "dense" not in branches:
        raise ValueError("branches must include 'dense' (the reference of the comparison)")
    variants = ([("plain dense", None)] if plain_dense else []) + [(f"freeswim full_branch={b}", b) for b in branches]
    videos: dict[str, list[torch.Tensor]] = {name: [] for name, _ in variants}
    seconds: dict[str, list[float]] = {name: [] for name, _ in variants}
    for name, branch in variants:
        diffattn.remove(pipe)
        if branch is not None:
            diffattn.apply(pipe, "freeswim", full_branch=branch, **base)
        for prompt in prompts:
            for seed in seeds:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                frames_out = pipe(prompt, height=height, width=size, num_frames=frames, num_inference_steps=steps,
                                  generator=torch.Generator(device="cpu").manual_seed(seed), output_type="pt").frames
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - t)
                videos[name].append(frames_out[0].float().cpu().permute(0, 2, 3, 1))
        logger.info("diffattn freeswim-branch: %s done (%.1f s / generation)", name, statistics.mean(seconds[name]))
    diffattn.remove(pipe)

    def compare(a: str, b: str) -> dict[str, float]:
        ps = [psnr(x, y) for x, y in zip(videos[a], videos[b])]
        ss = [ssim(x, y) for x, y in zip(videos[a], videos[b])]
        return {"psnr_mean": statistics.mean(ps), "psnr_min": min(ps), "ssim_mean": statistics.mean(ss),
                "ssim_min": min(ss)}

    dense_branch = "freeswim full_branch=dense"
    rows = []
    for name, branch in variants:
        row = {"variant": name, "seconds_mean": statistics.mean(seconds[name]),
               "vs_plain_dense": compare(name, "plain dense") if branch is not None and plain_dense else None,
               "vs_dense_branch": compare(name, dense_branch) if branch not in (None, "dense") else None}
        rows.append(row)
    return {"settings": {"steps": steps, "frames": frames, "size": size, "height": height, "seeds": seeds, "prompts": prompts,
                         "device": device, "dtype": dtype, "cache_steps": cache_steps, **base},
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"freeswim-branch: demo video model at {s['height']}x{s['size']} px (HxW) x {s['frames']} frames (training: "
             f"64x64), {s['steps']} steps, cache_steps={s['cache_steps']}, {len(s['prompts'])} prompts x "
             f"{len(s['seeds'])} seeds, {report['device']} {s['dtype']}, {report['date']}",
             "| variant | s / generation | PSNR / SSIM vs dense full branch (mean, min) | PSNR / SSIM vs plain dense (mean) |",
             "|---|---|---|---|"]
    for r in report["rows"]:
        a, b = r["vs_dense_branch"], r["vs_plain_dense"]
        fa = "—" if a is None else f"{a['psnr_mean']:.2f} / {a['ssim_mean']:.4f} (min {a['psnr_min']:.2f} / {a['ssim_min']:.4f})"
        fb = "—" if b is None else f"{b['psnr_mean']:.2f} / {b['ssim_mean']:.4f}"
        lines.append(f"| {r['variant']} | {r['seconds_mean']:.2f} | {fa} | {fb} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffattn bench freeswim-branch", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16, help="denoising steps (the demo pipeline's default: 16)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128, help="width in pixels, and height unless --height (training: 64)")
    p.add_argument("--height", type=int, default=None, help="height in pixels (default: --size)")
    p.add_argument("--branches", nargs="+", default=list(BRANCHES), choices=BRANCHES)
    p.add_argument("--no-plain-dense", action="store_true", help="skip the plain dense generation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--prompts", type=int, default=3, help=f"how many of the {len(PROMPTS)} prompts")
    p.add_argument("--cache-steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 1 <= args.prompts <= len(PROMPTS) or args.steps < 1 or args.frames < 1 or args.size < 16:
        print("diffattn bench freeswim-branch: --prompts 1..3, --steps >= 1, --frames >= 1, --size >= 16", file=sys.stderr)
        return 2
    report = run(steps=args.steps, frames=args.frames, size=args.size, seeds=args.seeds,
                 prompts=list(PROMPTS[:args.prompts]), device=args.device, dtype=args.dtype,
                 cache_steps=args.cache_steps, height=args.height, branches=tuple(args.branches),
                 plain_dense=not args.no_plain_dense)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(render(report))
    return 0

"""Every benchmark, one module each: `diffattn bench NAME` runs `diffattn.bench.NAME.main(argv) -> int`.

Shared pieces: `harness` (GPU timing, device/version header, JSON writers), `models` (the real model configs,
random weights), `metrics` (PSNR, SSIM), `energy` (attention energy decay), `plot` (PNG line plots).

Adding a benchmark: write `diffattn/bench/<name>.py` with `main(argv: list[str] | None = None) -> int` (its
`argparse` prog `diffattn bench <name>`; time with `harness.median_ms`, print `harness.env_line()` first, write
JSON with `harness.write_json`), and add one line below. Nothing here is imported until a benchmark is asked for.
"""

from __future__ import annotations

# name -> one-line summary (`diffattn bench` lists them); the module is diffattn.bench.<name> ('-' read as '_')
BENCHES: dict[str, str] = {
    "kernels": "block-sparse attention kernel vs cuDNN SDPA and FlexAttention",
    "gna": "neighborhood attention kernel vs cuDNN SDPA (NATTEN's figures)",
    "na-backward": "neighborhood backward: per-kernel times over launch settings, fwd+bwd vs FlexAttention",
    "step": "one denoising step of a full-size video transformer, dense vs a method",
    "quality": "every method vs dense on the demo models: PSNR, SSIM, attention energy decay",
    "dispatch": "one step with a method via the adapter and via the Diffusers dispatcher",
    "e2e": "whole pipeline generations (text, denoise, decode): stock vs methods vs + caches, PSNR",
    "prologue": "fused q/k norm + RoPE + layout vs the stock op sequence (Wan, HunyuanVideo)",
    "freeswim-branch": "FreeSwim's sparse full branch vs its dense one on the demo video model at 2x size",
    "rectified": "Rectified SpaAttn at production shapes: step, selection overhead, error vs top-p and radial",
    "highres": "FreeSwim end to end at 1080p (Wan2.1-1.3B config) under a GPU memory cap",
    "layout": "FICGen layout accuracy on the UNet demo model (stock / training-free / trained); SD1.5 step overhead",
    "gluon-forward": "the Gluon (Hopper) block-sparse forward vs cuDNN SDPA and our Triton kernel at one shape",
    "agent": "AgentSD on SD1.5/SDXL UNet steps (real configs, fp16): dense vs agent vs ToMe, 50-step projection",
}


def bench_module(name: str) -> str:
    """The module of benchmark `name` (`ValueError` listing the benchmarks when unknown)."""
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHES))}")
    return f"{__name__}.{name.replace('-', '_')}"

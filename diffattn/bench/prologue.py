"""`diffattn bench prologue`: the fused pre-attention prologue (`diffattn.kernels.qk_norm_rope`) against the stock
op sequence of Diffusers' processors, at production shapes (GPU).

Per case: the stock sequence (Wan: `torch.nn.RMSNorm` over all heads, unflatten, Wan's RoPE with float32 tables;
HunyuanVideo: Diffusers' `RMSNorm` per head, `apply_rotary_emb`), ending in the `[B, H, S, D]` transposed view the
stock path hands to SDPA (no copy: SDPA reads the strides), against one fused call that writes `[B, H, S, D]`
contiguous; times are `triton.testing.do_bench` medians, the
effective bandwidth counts one read of x, one write of the output and the cos/sin tables. The bf16 error is
reported against the stock output in units of the output's bf16 spacing (ulp), with the share of differing
elements. `--whole-step` also times one Wan transformer forward with the stock processors against `dense` (fused
prologue) and `dense` with the prologue off (`DIFFATTN_PROLOGUE_BACKEND=reference`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

CASES = {
    # name: (tokens, heads, head dim, norm, text tokens after the video (hunyuan single-stream))
    "wan14b-720p": (75600, 40, 128, "across", 0),
    "wan1.3b-480p": (32760, 12, 128, "across", 0),
    "hunyuan-720p": (118800, 24, 128, "head", 256),
}


def _tables(s: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.rand(s, d // 2, device=device, dtype=torch.float64) * 100
    return ang.cos().repeat_interleave(2, -1).float(), ang.sin().repeat_interleave(2, -1).float()


def _stock(case: str):
    """A function x -> [B, H, S, D] contiguous doing what the stock processor does before SDPA, and its inputs."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    from ..adapters.wan import apply_wan_rope

    s, h, d, norm, text = CASES[case]
    dev = "cuda"
    x = torch.randn(1, s + text, h * d, device=dev, dtype=torch.bfloat16) * 2
    cos, sin = _tables(s, d, dev)
    if norm == "across":
        module = torch.nn.RMSNorm(h * d, eps=1e-6, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            module.weight.copy_(1 + 0.2 * torch.randn(h * d, device=dev))

        def stock(t):
            y = module(t).unflatten(2, (h, d))
            return apply_wan_rope(y, cos[None, :, None], sin[None, :, None]).transpose(1, 2)
    else:
        module = RMSNorm(d, eps=1e-6).to(dev, torch.bfloat16)
        with torch.no_grad():
            module.weight.copy_(1 + 0.2 * torch.randn(d, device=dev))

        def stock(t):
            y = module(t.unflatten(2, (h, d)))
            y = torch.cat([apply_rotary_emb(y[:, :s], (cos, sin), sequence_dim=1), y[:, s:]], dim=1)
            return y.transpose(1, 2)
    return stock, module, x, cos, sin


def bench_case(case: str) -> dict[str, Any]:
    from triton.testing import do_bench

    from ..adapters.prologue import fused_norm_rope

    s, h, d, norm, text = CASES[case]
    stock, module, x, cos, sin = _stock(case)
    with torch.no_grad():
        ref = stock(x)
        out = fused_norm_rope(module, x, h, norm, cos, sin)
        t_stock = do_bench(lambda: stock(x), warmup=5, rep=40)
        t_fused = do_bench(lambda: fused_norm_rope(module, x, h, norm, cos, sin), warmup=5, rep=40)
    diff = (out.float() - ref.float()).abs()
    # a rounding step in a normalised value moves both rotated outputs of its pair: count ulps of the pair's norm
    # (a rotation keeps it), not of an output that may have cancelled to near zero
    r = ref.float()
    pair = r.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*r.shape[:-1], -1, 2).flatten(-2)
    spacing = torch.finfo(torch.bfloat16).eps * pair.clamp_min(torch.finfo(torch.bfloat16).tiny)
    moved = 2 * x.numel() * x.element_size() + 2 * cos.numel() * 4
    return {
        "case": case, "tokens": s + text, "heads": h, "head_dim": d, "norm": norm,
        "stock_ms": t_stock, "fused_ms": t_fused, "speedup": t_stock / t_fused,
        "fused_GBps": moved / (t_fused * 1e-3) / 1e9,
        "max_abs_diff": diff.max().item(), "max_ulps": (diff / spacing).max().item(),
        "share_differing": (diff > 0).float().mean().item(), "exact": bool(torch.equal(out, ref)),
    }


def whole_step(model_name: str, shape: tuple[int, int, int]) -> dict[str, Any]:
    """One transformer forward: stock processors vs `dense` with the fused prologue vs `dense` without it."""
    import diffattn
    from .step import build_model, make_inputs, sdpa_backend

    model = build_model(model_name, "cuda")
    inputs = make_inputs(model_name, shape, "cuda")
    results: dict[str, Any] = {"model": model_name, "shape": list(shape)}

    def forward() -> tuple[float, torch.Tensor]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), sdpa_backend("cudnn"):
            out = model(**inputs, return_dict=False)[0]
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    forward()  # warm-up (cuDNN plans, allocator)
    results["stock_s"], ref = forward()
    diffattn.apply(model, "dense")
    forward()  # compiles the prologue kernel
    results["dense_fused_s"], out = forward()
    os.environ["DIFFATTN_PROLOGUE_BACKEND"] = "reference"
    try:
        results["dense_plain_s"], plain = forward()
    finally:
        os.environ.pop("DIFFATTN_PROLOGUE_BACKEND")
        diffattn.remove(model)
    results["fused_vs_stock_rel_l2"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    results["plain_equals_stock"] = bool(torch.equal(plain, ref))
    results["speedup_fused_vs_stock"] = results["stock_s"] / results["dense_fused_s"]
    return results


def render(report: dict[str, Any]) -> str:
    lines = [f"prologue: {report['device']}, torch {report['torch']}, triton {report['triton']}, {report['date']}",
             "| case | tokens x heads x dim | norm | stock (ms) | fused (ms) | x | fused GB/s | max abs diff | max ulps (pair norm) | differing |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        lines.append(f"| {r['case']} | {r['tokens']} x {r['heads']} x {r['head_dim']} | {r['norm']} | {r['stock_ms']:.3f} | "
                     f"{r['fused_ms']:.3f} | {r['speedup']:.2f} | {r['fused_GBps']:.0f} | {r['max_abs_diff']:.3g} | {r['max_ulps']:.2f} | "
                     f"{r['share_differing']:.2e} |")
    w = report.get("whole_step")
    if w:
        lines.append(f"whole forward {w['model']} {'x'.join(map(str, w['shape']))}: stock {w['stock_s']:.3f} s, dense + fused "
                     f"prologue {w['dense_fused_s']:.3f} s ({w['speedup_fused_vs_stock']:.3f}x), dense plain "
                     f"{w['dense_plain_s']:.3f} s; fused vs stock rel L2 {w['fused_vs_stock_rel_l2']:.2e}; plain == stock: "
                     f"{w['plain_equals_stock']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffattn bench prologue", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--whole-step", default=None, metavar="MODEL", help="also time one forward of MODEL "
                   "(wan2.1-14b / wan2.1-1.3b, real config, random weights)")
    p.add_argument("--shape", default="720x1280x81", help="HxWxF for --whole-step")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("diffattn bench prologue: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from .step import parse_shape

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": []}
    for case in args.cases:
        report["cases"].append(bench_case(case))
        torch.cuda.empty_cache()
    if args.whole_step:
        report["whole_step"] = whole_step(args.whole_step, parse_shape(args.shape))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(render(report))
    return 0

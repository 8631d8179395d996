"""Benchmark block_sparse_attention against cuDNN SDPA (dense) and FlexAttention (same block mask) on a GPU.

    diffattn bench kernels                     # the full table (forward; backward subset)
    diffattn bench kernels --shapes wan1.3b --densities 1.0,0.1 --masks random
    diffattn bench kernels --sweep             # kernel-config sweep (tuning aid)
    diffattn bench kernels --backends cudnn,flex,triton,gluon,fa4   # the registry's backends side by side (#18)
    diffattn bench kernels --tune              # measure every capable backend, write diffattn/kernels/tuned/<kind>.json

Effective TFLOP/s = 4*Sq*Sk*D*H*density / time (forward); forward+backward counts 3.5x that (2 + 5 matmuls).
FlexAttention's BlockMask is built from the same CSR index lists (`BlockMask.from_kv_blocks`, all blocks "full",
no mask_mod); its construction time is excluded from its timing and reported separately.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

from .harness import env_line, median_ms, write_json
from .tuning import command_line, geomean_order

SHAPES: dict[str, tuple[int, int, int]] = {
    # name: (heads, tokens, tokens per "frame" used by the radial-like mask)
    "wan1.3b": (12, 32_760, 1_560),  # Wan2.1-1.3B 480p 81 frames: 21 x 30 x 52
    "wan14b": (40, 75_600, 3_600),  # Wan2.1-14B 720p 81 frames: 21 x 45 x 80
    "hunyuan": (24, 118_800, 3_600),  # HunyuanVideo 720p 129 frames: 33 x 45 x 80
    "flux1024": (24, 4_608, 512),  # FLUX 1024^2: 4096 image + 512 text (frame = 8 latent rows)
    "flux4096": (24, 66_048, 2_048),  # FLUX 4096^2: 65536 image + 512 text (frame = 8 latent rows)
}


def _block_centers(nb: int, bs: int) -> torch.Tensor:
    return torch.arange(nb, dtype=torch.float64) * bs + bs / 2


def band_mask(nb: int, density: float) -> torch.Tensor:
    """|i - j| <= w in blocks, w chosen so that the fraction of set blocks is closest to `density`."""
    i = torch.arange(nb)
    dist = (i[:, None] - i[None, :]).abs()
    per_d = torch.cat([torch.tensor([nb]), 2 * (nb - torch.arange(1, nb))]).double()
    frac = per_d.cumsum(0) / nb**2  # frac[w] = density of the band of half-width w
    best = int((frac - density).abs().argmin())
    return dist <= best


def radial_mask(nb: int, bs: int, tpf: int, density: float) -> torch.Tensor:
    """Radial-like: a key block is kept if its in-frame position is within W0 / 2^floor(log2(frame distance + 1))
    of the query block's, so the band narrows as frames get farther; the diagonal is always kept. W0 is bisected
    to hit `density`."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = _block_centers(nb, bs).to(dev)
    f, p = torch.div(c, tpf, rounding_mode="floor"), torch.remainder(c, tpf)
    fd = (f[:, None] - f[None, :]).abs()
    pd = (p[:, None] - p[None, :]).abs()
    shrink = torch.exp2(torch.floor(torch.log2(fd + 1)))
    eye = torch.eye(nb, dtype=torch.bool, device=dev)

    def make(w0: float) -> torch.Tensor:
        return (pd + bs / 2 <= w0 / shrink) | eye

    lo, hi = 0.0, float(tpf) * 64
    for _ in range(40):
        mid = (lo + hi) / 2
        if make(mid).float().mean().item() < density:
            lo = mid
        else:
            hi = mid
    return make(hi).cpu()


def make_mask(kind: str, heads: int, nb: int, bs: int, tpf: int, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1.0:
        return torch.ones(1, heads, nb, nb, dtype=torch.bool)
    if kind == "random":
        return torch.rand(1, heads, nb, nb, generator=gen) < density
    # Structured masks are the same for every head; stored per head anyway so that FlexAttention sees one
    # BlockMask shape per sequence length (no recompilation between mask kinds).
    if kind == "band":
        return band_mask(nb, density)[None, None].expand(1, heads, nb, nb).contiguous()
    if kind == "radial":
        return radial_mask(nb, bs, tpf, density)[None, None].expand(1, heads, nb, nb).contiguous()
    raise ValueError(f"mask kind must be random, band or radial, got {kind!r}")


def _bench(fn, rep: int, grad_to_none=None) -> float:
    return median_ms(fn, warmup=max(25, rep // 4), rep=rep, grad_to_none=grad_to_none, warm_call=False)


class _Flex:
    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        self.BlockMask = BlockMask
        self.fn = torch.compile(flex_attention, dynamic=False)

    def block_mask(self, kv_idx: torch.Tensor, kv_cnt: torch.Tensor, S: int, bs: int):
        zeros = torch.zeros_like(kv_cnt)
        kwargs = dict(full_kv_num_blocks=kv_cnt, full_kv_indices=kv_idx, BLOCK_SIZE=bs)
        try:
            return self.BlockMask.from_kv_blocks(zeros, torch.zeros_like(kv_idx), seq_lengths=(S, S), **kwargs)
        except TypeError:  # older torch without seq_lengths
            return self.BlockMask.from_kv_blocks(zeros, torch.zeros_like(kv_idx), **kwargs)


def sweep(args: argparse.Namespace) -> int:
    """Time the forward and backward kernels over a grid of configs at one shape (tuning aid)."""
    from ..kernels.block_sparse import triton_bwd, triton_fwd
    from ..kernels.block_sparse.index import get_block_index

    H, S, tpf = SHAPES[args.shapes.split(",")[0]]
    D, bs = args.head_dim, args.block_size
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, H, S, D, device="cuda", dtype=dt) for _ in range(4))
    nb = math.ceil(S / bs)
    rows = []
    for dens in [float(x) for x in args.densities.split(",")]:
        mask = make_mask("random", H, nb, bs, tpf, dens, gen).cuda()
        real = mask.float().mean().item()
        idx = get_block_index(mask)
        flops = 4 * S * S * D * H * real
        ref = None
        if args.sweep == "bwd":
            grid = []
        elif args.sweep == "quick":
            grid = [(128, 64, 4, 2, True, True), (128, 64, 4, 3, True, True), (128, 128, 4, 2, True, True),
                    (128, 128, 8, 3, True, False), (128, 64, 8, 2, True, True), (64, 64, 4, 2, True, True),
                    (128, 64, 4, 2, False, False)]
        else:
            grid = [(128, bn, nw, ns, tma, ws) for bn in (64, 128) for nw in (4, 8) for ns in (2, 3, 4)
                    for tma, ws in ((False, False), (True, False), (True, True))]
        for bm, bn, nw, ns, tma, ws in grid:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, tma=tma, warp_specialize=ws)
            try:
                o, _ = triton_fwd.forward(q, k, v, idx.kv_idx, idx.kv_cnt, bs, D**-0.5, None, None, config=cfg)
                if ref is None:
                    ref = o
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = _bench(lambda: triton_fwd.forward(q, k, v, idx.kv_idx, idx.kv_cnt, bs, D**-0.5, None, None, config=cfg), args.rep)
                rows.append(("fwd", dens, cfg, ms, flops / ms * 1e-9, err))
            except Exception as e:  # noqa: BLE001 - report and go on
                rows.append(("fwd", dens, cfg, float("nan"), float("nan"), repr(e)[:80]))
            print(rows[-1], flush=True)
        o, lse = triton_fwd.forward(q, k, v, idx.kv_idx, idx.kv_cnt, bs, D**-0.5, None, None)
        F, T_ = False, True
        bwd_grid = [((64, 128, 8, 2, F, F), (64, 64, 4, 2, F, F)), ((64, 128, 8, 2, T_, F), (64, 64, 4, 2, T_, F)),
                    ((64, 128, 8, 2, T_, T_), (64, 64, 4, 2, T_, T_)), ((64, 128, 8, 3, T_, F), (128, 64, 8, 2, T_, F)),
                    ((32, 128, 4, 2, T_, F), (64, 64, 4, 3, T_, F)), ((64, 128, 4, 2, T_, F), (128, 64, 4, 2, T_, T_)),
                    ((64, 64, 4, 2, T_, F), (64, 128, 4, 2, T_, F)), ((128, 128, 8, 2, T_, F), (128, 128, 8, 2, T_, F))]
        for c1, c2 in bwd_grid:
            cfg = {name: dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3], tma=c[4], warp_specialize=c[5])
                   for name, c in (("dkdv", c1), ("dq", c2))}
            try:
                f = lambda: triton_bwd.backward(do, q, k, v, o, lse, None, idx.kv_idx, idx.kv_cnt, idx.q_idx, idx.q_cnt,  # noqa: E731
                                                bs, D**-0.5, None, None, config=cfg)
                f()
                ms = _bench(f, args.rep)
                rows.append(("bwd", dens, cfg, ms, 2.5 * flops / ms * 1e-9, ""))
            except Exception as e:  # noqa: BLE001
                rows.append(("bwd", dens, cfg, float("nan"), float("nan"), repr(e)[:80]))
            print(rows[-1], flush=True)
    print("\n## sweep results (best first per pass/density)")
    for kind in ("fwd", "bwd"):
        for dens in sorted({r[1] for r in rows}, reverse=True):
            sel = sorted([r for r in rows if r[0] == kind and r[1] == dens and r[3] == r[3]], key=lambda r: r[3])[:6]
            for r in sel:
                print(f"{kind} d={dens} {r[3]:.3f} ms {r[4]:.0f} TF/s {r[2]} {r[5]}")
    return 0


def host_us(fn, n: int = 200) -> float:
    """Host (CPU) time per call with an empty-queue-proof method: a long sleep kernel is queued first, so no call
    ever waits for the GPU; the CPU wall time of `n` calls is then pure host work. Synchronises at the ends only."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time at ~2 GHz: longer than n calls of host work
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def python_profile(fn, n: int, top: int = 14) -> list[dict]:
    """Where a call's host time goes in Python: cProfile over `n` calls queued behind a sleep kernel, the `top`
    functions by own time, per call. cProfile adds ~1 µs per Python call: read the ranking and the call counts,
    not the absolute sum."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # as in host_us: no profiled call waits for a full launch queue
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(pr).stats  # {(file, line, name): (prim calls, calls, own s, cumulative s, callers)}
    ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    out = [dict(function=f"{pathlib.Path(f).name}:{line}:{name}", calls_per_call=calls / n,
                own_us_per_call=own / n * 1e6, cum_us_per_call=cum / n * 1e6)
           for (f, line, name), (_, calls, own, cum, _) in ranked]
    for r in out:
        print(f"  {r['own_us_per_call']:7.2f} µs own {r['cum_us_per_call']:8.2f} cum {r['calls_per_call']:5.1f}x "
              f"{r['function']}", flush=True)
    return out


def _diagnose_backward(q, k, v, mask, g, bs, rows, shape) -> None:
    """Where a fwd+bwd's host time goes: host syncs (CUDA sync-debug warnings), the backward implementation
    called directly on the main thread (plain loop and GPU-busy timing), and a cProfile of it."""
    import warnings

    from ..kernels.block_sparse import op

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            op.block_sparse_attention(q, k, v, mask, block_size=bs, backend="triton").backward(g)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]
    with torch.no_grad():
        out, lse = op._fwd_impl(q, k, v, mask, None, None, bs, q.shape[-1] ** -0.5, None, None, "triton")
    bwd = lambda: op._bwd_impl(g, None, q, k, v, out, lse, mask, None, None, bs, q.shape[-1] ** -0.5)  # noqa: E731
    bwd()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        bwd()
    plain = (time.perf_counter() - t0) / 50 * 1e6
    torch.cuda.synchronize()
    row = dict(shape=shape, path="diagnose backward", syncs_in_fwd_bwd=syncs, bwd_impl_host_us=host_us(bwd, 50),
               bwd_impl_plain_loop_us=plain)
    row["python_profile"] = python_profile(bwd, 20)
    rows.append(row)
    print("ROW", row, flush=True)


def overhead(args: argparse.Namespace) -> int:
    """Small-shape cost: host time per call (GPU kept busy), do_bench time and CUDA-graph replay time, for the
    steady path (cached plan + recorded launch), the same with `DIFFATTN_TRITON_FAST=0` (Triton's own launch) and
    the bare Triton launch of an uncached config; then forward+backward against FlexAttention, with profiles."""
    import os

    from ..kernels import backends as registry
    from ..kernels.block_sparse import triton_fwd
    from ..kernels.block_sparse.index import get_block_index
    from ..kernels.block_sparse.op import block_sparse_attention

    print(env_line(), flush=True)
    rows = []
    flex = None if args.no_flex else _Flex()
    for shape in args.shapes.split(","):
        H, S, tpf = SHAPES[shape]
        D, bs = args.head_dim, args.block_size
        nb = math.ceil(S / bs)
        q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        gen = torch.Generator().manual_seed(0)
        req = registry.make_request("block_sparse", q, head_dim=D, block_size=bs)
        names = [n for n in (args.backends or "triton,gluon").split(",") if n and
                 registry.backends("block_sparse")[n].why_not(req) is None]
        for dens in [float(x) for x in args.densities.split(",")]:
            mask = make_mask("random", 1, nb, bs, tpf, dens, gen).cuda()
            idx = get_block_index(mask)
            fns = {}
            for name in names:
                fns[name] = (lambda n=name: block_sparse_attention(q, k, v, mask, block_size=bs, backend=n), "1")
                fns[name + " TRITON_FAST=0"] = (lambda n=name: block_sparse_attention(q, k, v, mask, block_size=bs, backend=n), "0")
            cfg = triton_fwd.fwd_config(D, bs, q.dtype, False)
            fns["triton bare launch (Triton's path)"] = (
                lambda: triton_fwd.forward(q, k, v, idx.kv_idx, idx.kv_cnt, bs, D**-0.5, None, None, config=cfg), "1")
            if flex is not None:
                bm = flex.block_mask(idx.kv_idx, idx.kv_cnt, S, bs)
                fns["flex (compiled)"] = (lambda: flex.fn(q, k, v, block_mask=bm), "1")
            for label, (fn, fast) in fns.items():
                os.environ["DIFFATTN_TRITON_FAST"] = fast
                row = dict(shape=shape, density=float(mask.float().mean()), path=label)
                try:
                    with torch.no_grad():
                        fn()
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        fn()
                        torch.cuda.synchronize()
                        big = time.perf_counter() - t0 > 2e-3  # device-bound shape: host time only, few calls
                        row["host_us"] = host_us(fn, 10 if big else 200)
                        if big:
                            rows.append(row)
                            print("ROW", row, flush=True)
                            continue
                        if args.profile and fast == "1":
                            print(f"python profile of the steady forward, {label}:", flush=True)
                            row["python_profile"] = python_profile(fn, 400)
                        ms = _bench(fn, args.rep)
                        row["do_bench_us"] = ms * 1e3
                        torch.cuda.synchronize()
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            fn()
                        graph_ms = _bench(g.replay, args.rep)
                        row.update(graph_us=graph_ms * 1e3, ratio_to_graph=ms / graph_ms)
                except Exception as e:  # noqa: BLE001 - one path failing is a result; the others go on
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                print("ROW", row, flush=True)
            os.environ["DIFFATTN_TRITON_FAST"] = "1"
            if args.no_backward:
                continue
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            g = torch.randn_like(q)
            tri = lambda: block_sparse_attention(qg, kg, vg, mask, block_size=bs, backend="triton").backward(g)  # noqa: E731

            def tri_fused():
                os.environ["DIFFATTN_BSA_BWD"] = "fused"
                try:
                    tri()
                finally:
                    os.environ.pop("DIFFATTN_BSA_BWD", None)

            fbs = {"triton fwd+bwd": tri, "triton fwd+bwd (fused bwd)": tri_fused}
            if flex is not None:
                fbs["flex fwd+bwd"] = lambda: flex.fn(qg, kg, vg, block_mask=bm).backward(g)
            for label, fb in fbs.items():
                row = dict(shape=shape, density=float(mask.float().mean()), path=label)
                try:
                    row["host_us"] = host_us(fb, 50)
                    row["do_bench_us"] = _bench(fb, args.rep, [qg, kg, vg]) * 1e3
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                print("ROW", row, flush=True)
            if args.profile:
                _diagnose_backward(qg, kg, vg, mask, g, bs, rows, shape)
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=acts) as prof:
                    for _ in range(10):
                        fbs["triton fwd+bwd"]()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=16, max_name_column_width=60), flush=True)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60), flush=True)
            del qg, kg, vg
        del q, k, v
        torch.cuda.empty_cache()
    if args.out:
        write_json(dict(env=env_line(), argv=sys.argv, rows=rows), args.out + ".json", indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffattn bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default: all five; with "
                   f"--backends/--tune {COMPARE_SHAPES})")
    p.add_argument("--densities", default="1.0,0.5,0.25,0.1,0.05")
    p.add_argument("--masks", default="random,band,radial")
    p.add_argument("--backward", default=None, help="shapes that also time forward+backward ('all', 'none'; default "
                   "wan1.3b,flux1024, with --backends/--tune none)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time per measurement, ms")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--sweep", nargs="?", const="full", default=None, choices=["full", "quick", "bwd"],
                   help="sweep kernel configs at the first shape instead of the table")
    p.add_argument("--overhead", action="store_true", help="diagnose per-call overhead at the first shape instead")
    p.add_argument("--out", default=None, help="write the markdown table (.md) and raw rows (.json) with this stem")
    p.add_argument("--backends", default="", help="compare these (comma list: cudnn and the registry's names, e.g. "
                   "cudnn,flex,triton,gluon,fa4) per case instead of the default table; shapes default to "
                   f"{COMPARE_SHAPES}")
    p.add_argument("--tune", action="store_true", help="measure every capable backend (or --backends) per case and "
                   "write the registry's table (diffattn/kernels/tuned/<device kind>.json, or --tune-out)")
    p.add_argument("--tune-out", default=None, help="where --tune writes the table")
    p.add_argument("--no-backward", action="store_true", help="with --overhead: forward only")
    p.add_argument("--bwd-modes", default="fused,atomic",
                   help="with --backends and --backward: the Triton backward's modes to time (DIFFATTN_BSA_BWD: "
                        "fused, split, atomic), each as a fwd+bwd row <backend>_<mode>")
    p.add_argument("--profile", action="store_true", help="with --overhead: cProfile the steady forward and the "
                   "backward, torch.profiler tables of fwd+bwd")
    p.add_argument("--jsonl", default=None, help="with --backends/--tune: append each case as a JSON line here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.sweep or args.overhead:
        args.shapes = args.shapes or "wan1.3b"
    if args.sweep:
        return sweep(args)
    if args.overhead:
        return overhead(args)
    if args.backends or args.tune:
        args.shapes = args.shapes or COMPARE_SHAPES
        args.backward = args.backward or "none"
        return compare(args)
    args.shapes = args.shapes or "wan1.3b,wan14b,hunyuan,flux1024,flux4096"
    args.backward = args.backward or "wan1.3b,flux1024"

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..kernels.block_sparse.index import get_block_index
    from ..kernels.block_sparse.op import block_sparse_attention

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    D, bs = args.head_dim, args.block_size
    flex = None if args.no_flex else _Flex()
    gen = torch.Generator().manual_seed(0)
    bwd_shapes = set(SHAPES) if args.backward == "all" else set() if args.backward == "none" else set(args.backward.split(","))
    rows: list[dict] = []
    print(env_line(), flush=True)
    for name in args.shapes.split(","):
        H, S, tpf = SHAPES[name]
        nb = math.ceil(S / bs)
        q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=dt) for _ in range(3))
        dense_flops = 4 * S * S * D * H
        with_bwd = name in bwd_shapes
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = _bench(lambda: F.scaled_dot_product_attention(q, k, v), args.rep)
            cudnn_fb = None
            if with_bwd:
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                g = torch.randn_like(q)
                cudnn_fb = _bench(lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(g), args.rep, [qg, kg, vg])
        print(f"{name}: cuDNN dense fwd {cudnn_ms:.3f} ms ({dense_flops / cudnn_ms * 1e-9:.0f} TF/s)"
              + (f", fwd+bwd {cudnn_fb:.3f} ms" if cudnn_fb else ""), flush=True)
        seen_dense = False
        for kind in args.masks.split(","):
            for dens in [float(x) for x in args.densities.split(",")]:
                if dens >= 1.0:
                    if seen_dense:
                        continue
                    seen_dense = True
                mask = make_mask(kind, H, nb, bs, tpf, dens, gen).cuda()
                real = mask.float().mean().item()
                flops = dense_flops * real
                ours = lambda: block_sparse_attention(q, k, v, mask, block_size=bs)  # noqa: E731
                o = ours()
                ms = _bench(ours, args.rep)
                graph_ms = None
                if cudnn_ms < 2.0:  # small shapes are host-bound: also time a CUDA-graph replay (no host work)
                    torch.cuda.synchronize()
                    gr = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(gr):
                        ours()
                    graph_ms = _bench(gr.replay, args.rep)
                row = dict(shape=name, heads=H, tokens=S, mask="dense" if dens >= 1.0 else kind, target=dens, density=real,
                           ours_ms=ms, ours_tflops=flops / ms * 1e-9, cudnn_ms=cudnn_ms,
                           cudnn_tflops=dense_flops / cudnn_ms * 1e-9)
                if graph_ms is not None:
                    row["ours_graph_ms"] = graph_ms
                if flex is not None:
                    idx = get_block_index(mask)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    bm = flex.block_mask(idx.kv_idx, idx.kv_cnt, S, bs)
                    torch.cuda.synchronize()
                    row["flex_build_ms"] = (time.perf_counter() - t0) * 1e3
                    fo = flex.fn(q, k, v, block_mask=bm)
                    row["max_abs_diff_vs_flex"] = (fo.float() - o.float()).abs().max().item()
                    fms = _bench(lambda: flex.fn(q, k, v, block_mask=bm), args.rep)
                    row.update(flex_ms=fms, flex_tflops=flops / fms * 1e-9)
                if with_bwd:
                    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                    g = torch.randn_like(q)
                    row["ours_fb_ms"] = _bench(lambda: block_sparse_attention(qg, kg, vg, mask, block_size=bs).backward(g), args.rep, [qg, kg, vg])
                    row["cudnn_fb_ms"] = cudnn_fb
                    if flex is not None:
                        row["flex_fb_ms"] = _bench(lambda: flex.fn(qg, kg, vg, block_mask=bm).backward(g), args.rep, [qg, kg, vg])
                    del qg, kg, vg
                rows.append(row)
                print(_fmt_row(row), flush=True)
                del mask
        del q, k, v
        torch.cuda.empty_cache()
    md = render(rows, args)
    print(md)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(md)
        write_json(dict(env=env_line(), argv=sys.argv, rows=rows), args.out + ".json", indent=1)
    return 0


def _num(x: float | None, digits: int) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def _fmt_row(r: dict) -> str:
    s = (f"{r['shape']:9s} {r['mask']:6s} d={r['density']:.3f} ours {r['ours_ms']:.3f} ms {r['ours_tflops']:.0f} TF/s "
         f"| cudnn*d {r['cudnn_ms'] * r['density']:.3f}")
    if "flex_ms" in r:
        s += f" | graph {r.get('ours_graph_ms', float('nan')):.3f}"
        s += f" | flex {r['flex_ms']:.3f} ms {r['flex_tflops']:.0f} TF/s (x{r['flex_ms'] / r['ours_ms']:.2f}) build {r['flex_build_ms']:.1f} ms diff {r['max_abs_diff_vs_flex']:.2e}"
    if "ours_fb_ms" in r:
        s += f" | fwd+bwd ours {r['ours_fb_ms']:.3f} flex {r.get('flex_fb_ms', float('nan')):.3f} cudnn {r['cudnn_fb_ms']:.3f}"
    return s


def render(rows: list[dict], args: argparse.Namespace, env: str | None = None) -> str:
    """Markdown tables: forward, then forward+backward, with the targets' verdicts."""
    out = [f"{env or env_line()}; bf16, head dim {args.head_dim}, block {args.block_size}, batch 1; median of "
           f"`triton.testing.do_bench`.", ""]
    out.append("Forward. TF/s = effective (4·S²·D·H·density / time). `vs cuDNN·d` = our time / (cuDNN dense time × density) "
               "(target ≤ 1.2 for d ≤ 0.5; at d = 1 the ratio is our throughput vs cuDNN's, target ≥ 0.85 as 1/ratio). "
               "`vs Flex` = Flex time / our time (target ≥ 1.15).")
    out.append("")
    out.append("| shape | H | tokens | mask | density | ours ms | ours TF/s | ours CUDA-graph ms | cuDNN dense ms | cuDNN TF/s | vs cuDNN·d | Flex ms | Flex TF/s | vs Flex | Flex mask build ms | targets |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["ours_ms"] / (r["cudnn_ms"] * r["density"])
        vs_flex = r["flex_ms"] / r["ours_ms"] if "flex_ms" in r else float("nan")
        g = r.get("ours_graph_ms")
        if r["mask"] == "dense":
            ok = (r["ours_tflops"] / r["cudnn_tflops"] >= 0.85) and (vs_flex != vs_flex or vs_flex >= 1.0)
            verdict = f"{'met' if r['ours_tflops'] / r['cudnn_tflops'] >= 0.85 else 'MISSED'} ({r['ours_tflops'] / r['cudnn_tflops']:.2f}x cuDNN)"
        else:
            ok = ratio <= 1.2 and (vs_flex != vs_flex or vs_flex >= 1.15)
            verdict = "met" if ok else "MISSED" + (" (≤1.2x cuDNN·d)" if ratio > 1.2 else "") + (" (≥1.15x Flex)" if vs_flex == vs_flex and vs_flex < 1.15 else "")
            if g is not None and not ok:
                gok = g / (r["cudnn_ms"] * r["density"]) <= 1.2 and (vs_flex != vs_flex or r["flex_ms"] / g >= 1.15)
                verdict += f"; graph-replayed: {'met' if gok else 'missed'} ({r['flex_ms'] / g:.2f}x Flex)"
        out.append(
            f"| {r['shape']} | {r['heads']} | {r['tokens']:,} | {r['mask']} | {r['density']:.3f} | {r['ours_ms']:.3f} | "
            f"{r['ours_tflops']:.0f} | {_num(r.get('ours_graph_ms'), 3)} | {r['cudnn_ms']:.3f} | {r['cudnn_tflops']:.0f} | {ratio:.2f} | "
            f"{_num(r.get('flex_ms'), 3)} | {_num(r.get('flex_tflops'), 0)} | {_num(vs_flex, 2)} | "
            f"{_num(r.get('flex_build_ms'), 1)} | {verdict} |"
        )
    fb = [r for r in rows if "ours_fb_ms" in r]
    if fb:
        out += ["", "Forward + backward (one fwd and one bwd per iteration; TF/s = 3.5 × forward FLOPs / time). "
                "Target: ours ≤ Flex time.", ""]
        out.append("| shape | mask | density | ours ms | ours TF/s | Flex ms | vs Flex | cuDNN dense ms | vs cuDNN·d | target |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in fb:
            flops = 3.5 * 4 * r["tokens"] ** 2 * args.head_dim * r["heads"] * r["density"]
            vs_flex = r.get("flex_fb_ms", float("nan")) / r["ours_fb_ms"]
            out.append(
                f"| {r['shape']} | {r['mask']} | {r['density']:.3f} | {r['ours_fb_ms']:.3f} | {flops / r['ours_fb_ms'] * 1e-9:.0f} | "
                f"{r.get('flex_fb_ms', float('nan')):.3f} | {vs_flex:.2f} | {r['cudnn_fb_ms']:.3f} | "
                f"{r['ours_fb_ms'] / (r['cudnn_fb_ms'] * r['density']):.2f} | {'met' if vs_flex >= 1.0 else 'MISSED'} |"
            )
    return "\n".join(out) + "\n"




# ---- backend comparison and the measured table (issue #18) ----------------------------------------------------------
#: the comparison's shapes: Wan-14B 720p, HunyuanVideo 720p, FLUX 4096² (names of SHAPES)
COMPARE_SHAPES = "wan14b,hunyuan,flux4096"


def _ceilings() -> tuple[float, float]:
    """Measured in this run: bf16 matmul TFLOP/s (8192³) and device-copy bandwidth GB/s (1 GiB), for the floors."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = _bench(lambda: a @ b, 100)
    x = torch.empty(2**29, device="cuda", dtype=torch.int16)
    y = torch.empty_like(x)
    cp = _bench(lambda: y.copy_(x), 100)
    del a, b, x, y
    torch.cuda.empty_cache()
    return 2 * 8192**3 / mm * 1e-9, 2 * 2**30 / cp * 1e-6


def _emit(row: dict, jsonl: str | None) -> None:
    import json

    print("ROW", json.dumps(row), flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def compare(args: argparse.Namespace) -> int:
    """Each named backend on each case (dense and masked), same inputs, same process; optional fwd+bwd; the table."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..kernels import backends as registry
    from ..kernels.block_sparse.op import block_sparse_attention

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if args.tune and not names:
        names = [n for n in registry.names("block_sparse") if n not in ("blocked", "reference")]
    bad = [n for n in names if n != "cudnn" and n not in registry.names("block_sparse")]
    if bad:
        print(f"--backends: unknown {bad}; known: cudnn, {', '.join(registry.names('block_sparse'))}", file=sys.stderr)
        return 2
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    D, bs = args.head_dim, args.block_size
    gen = torch.Generator().manual_seed(0)
    print(env_line(), flush=True)
    peak, bw = _ceilings()
    print(f"ceilings (this run): bf16 matmul {peak:.0f} TFLOP/s, device copy {bw:.0f} GB/s", flush=True)
    rows: list[dict] = []
    bwd_shapes = set() if args.backward in ("none", "") else set(args.backward.split(","))
    densities = [float(x) for x in args.densities.split(",")]
    for shape in args.shapes.split(","):
        H, S, tpf = SHAPES[shape]
        nb = math.ceil(S / bs)
        q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=dt) for _ in range(3))
        dense_flops = 4 * S * S * D * H
        cases = [("dense", 1.0)] + [(kind, d) for kind in args.masks.split(",") for d in densities if d < 1.0]
        for kind, dens in cases:
            mask = make_mask("random" if kind == "dense" else kind, H, nb, bs, tpf, dens, gen).cuda()
            if kind != "random" and mask.shape[1] > 1:
                mask = mask[:, :1].contiguous()  # structured masks are one per head: broadcast them
            real = mask.float().mean().item()
            flops = dense_flops * real
            row = dict(shape=shape, heads=H, tokens=S, mask=kind, target=dens, density=real,
                       flop_floor_ms=flops / peak * 1e-9, byte_floor_ms=4 * H * S * D * q.element_size() / bw * 1e-6,
                       peak_tflops=peak, bw_gbs=bw, ms={}, refused={}, rel_err_vs_triton={})
            ref = None
            for name in (["triton"] if "triton" in names else []) + [n for n in names if n != "triton"]:
                if name == "cudnn":
                    if kind != "dense":
                        continue
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                        o = fn()
                        ms = _bench(fn, args.rep)
                else:
                    req = registry.make_request("block_sparse", q, head_dim=D, block_size=bs)
                    reason = registry.backends("block_sparse")[name].why_not(req)
                    if reason:
                        row["refused"][name] = reason
                        continue
                    fn = lambda: block_sparse_attention(q, k, v, mask, block_size=bs, backend=name)  # noqa: E731
                    try:
                        o = fn()
                        ms = _bench(fn, args.rep)
                    except Exception as e:  # noqa: BLE001 - a backend failing is a result, the others go on
                        row["refused"][name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                        continue
                if ref is None and name == "triton":
                    ref = o
                elif ref is not None:
                    row["rel_err_vs_triton"][name] = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                row["ms"][name] = ms
                del o
            if shape in bwd_shapes and kind in ("dense", "radial"):
                row["fb_ms"] = {}
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                g = torch.randn_like(q)
                import os

                for label in fwd_bwd_labels(names, args.bwd_modes):
                    name, _, mode = label.partition("_")
                    if name in row["refused"]:
                        continue
                    os.environ["DIFFATTN_BSA_BWD"] = mode or "default"
                    fb = lambda: block_sparse_attention(qg, kg, vg, mask, block_size=bs, backend=name).backward(g)  # noqa: E731
                    try:
                        fb()
                        row["fb_ms"][label] = _bench(fb, args.rep, [qg, kg, vg])
                    except Exception as e:  # noqa: BLE001
                        row["refused"][label + "_fwd_bwd"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    finally:
                        os.environ.pop("DIFFATTN_BSA_BWD", None)
                del qg, kg, vg, g
            rows.append(row)
            _emit(row, args.jsonl)
            print(_fmt_compare(row), flush=True)
            del mask, ref
        del q, k, v
        torch.cuda.empty_cache()
    print(render_compare(rows, args))
    if args.tune:
        table = tune_table(rows, args)
        path = args.tune_out or str(registry.tuned_dir() / f"{registry.device_kind(torch.cuda.get_device_name())}.json")
        write_json(table, path, indent=1)
        print(f"wrote {path}: " + ", ".join(f"{k}: {v['order']}" for k, v in table["ops"]["block_sparse"].items()))
    return 0


def fwd_bwd_labels(names: list[str], modes: str) -> list[str]:
    """The fwd+bwd rows of `--backends`: `<backend>_<mode>` for each of `--bwd-modes` where the backward is our
    Triton one (triton, gluon, fa4: their forward, `triton_bwd`'s backward), the bare name for flex."""
    mode_list = [m for m in modes.split(",") if m]
    out = []
    for n in names:
        if n == "flex":
            out.append(n)
        elif n in ("triton", "gluon", "fa4"):
            out += [f"{n}_{m}" for m in mode_list]
    return out


def _fmt_compare(r: dict) -> str:
    ms = " ".join(f"{n} {t:.3f}" for n, t in r["ms"].items())
    s = f"{r['shape']:8s} {r['mask']:6s} d={r['density']:.3f} floor {r['flop_floor_ms']:.3f} ms | {ms}"
    if r.get("fb_ms"):
        s += " | fwd+bwd " + " ".join(f"{n} {t:.3f}" for n, t in r["fb_ms"].items())
    if r["refused"]:
        s += " | refused " + "; ".join(f"{n}: {w[:60]}" for n, w in r["refused"].items())
    return s


def tune_table(rows: list[dict], args: argparse.Namespace) -> dict:
    """The registry's table: backends ordered by the geometric mean of (time / fastest time) over the cases each
    ran (a backend must have run at least half of them). One row per dtype/head dim/block size: the choice cannot
    depend on the density without a host sync, so the order is the one that is best over the measured densities."""

    ours = {f"case{i}": {n: t for n, t in r["ms"].items() if n != "cudnn"} for i, r in enumerate(rows)}
    ranked = geomean_order(ours, digits=None) or {"order": [], "geomean_time_vs_fastest": {}, "cases": []}
    order, score, n_cases = ranked["order"], ranked["geomean_time_vs_fastest"], len(ranked["cases"])
    key = f"{args.dtype}/d{args.head_dim}/b{args.block_size}"
    return {
        "device": torch.cuda.get_device_name(),
        "generated_by": command_line(),
        "env": env_line(),
        "ops": {"block_sparse": {key: {"order": order, "geomean_time_vs_fastest": score, "cases": n_cases,
                                       "shapes": args.shapes, "masks": args.masks, "densities": args.densities}}},
        "note": "order = fastest first over the measured cases; portable triton stays the fallback (backends.py)",
    }


def render_compare(rows: list[dict], args: argparse.Namespace) -> str:
    names: list[str] = []
    for r in rows:
        names += [n for n in r["ms"] if n not in names]
    out = [f"{env_line()}; {args.dtype}, head dim {args.head_dim}, block {args.block_size}, batch 1; median of "
           "`triton.testing.do_bench`. TF/s = effective (4·S²·D·H·density / time). FLOP floor = FLOPs / this run's "
           f"measured bf16 matmul rate ({rows[0]['peak_tflops']:.0f} TFLOP/s); byte floor = q,k,v,o once / measured copy "
           f"bandwidth ({rows[0]['bw_gbs']:.0f} GB/s)." if rows else "no rows", ""]
    out.append("| shape | mask | density | FLOP floor ms | byte floor ms | " + " | ".join(f"{n} ms (TF/s)" for n in names)
               + " | best | ours (triton) / fa4 | fa4 / (fa4 dense × d) |")
    out.append("|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|")
    dense_fa4 = {r["shape"]: r["ms"].get("fa4") for r in rows if r["mask"] == "dense"}
    for r in rows:
        flops = 4 * r["tokens"] ** 2 * args.head_dim * r["heads"] * r["density"]
        cells = [f"{r['ms'][n]:.3f} ({flops / r['ms'][n] * 1e-9:.0f})" if n in r["ms"] else "—" for n in names]
        ours = {n: t for n, t in r["ms"].items() if n != "cudnn"}
        best = min(ours, key=ours.get) if ours else "—"
        ratio = f"{r['ms']['triton'] / r['ms']['fa4']:.2f}" if "triton" in r["ms"] and "fa4" in r["ms"] else "—"
        fd = dense_fa4.get(r["shape"])
        sc = f"{r['ms']['fa4'] / (fd * r['density']):.2f}" if fd and "fa4" in r["ms"] and r["mask"] != "dense" else "—"
        out.append(f"| {r['shape']} | {r['mask']} | {r['density']:.3f} | {r['flop_floor_ms']:.3f} | "
                   f"{r['byte_floor_ms']:.3f} | " + " | ".join(cells) + f" | {best} | {ratio} | {sc} |")
    fb = [r for r in rows if r.get("fb_ms")]
    if fb:
        out += ["", "Forward + backward (`<forward backend>_<backward mode>`: the Triton backward in that "
                "DIFFATTN_BSA_BWD mode). Target: ≤ Flex.", ""]
        fnames = list(dict.fromkeys(n for r in fb for n in r["fb_ms"]))
        out.append("| shape | mask | density | " + " | ".join(f"{n} ms" for n in fnames) + " | flex / best ours |")
        out.append("|---|---|---|" + "---|" * len(fnames) + "---|")
        for r in fb:
            f = r["fb_ms"]
            best = min((t for n, t in f.items() if n != "flex"), default=None)
            ratio = f"{f['flex'] / best:.2f}" if "flex" in f and best else "—"
            out.append(f"| {r['shape']} | {r['mask']} | {r['density']:.3f} | "
                       + " | ".join(f"{f[n]:.3f}" if n in f else "—" for n in fnames) + f" | {ratio} |")
    refused = sorted({f"{n}: {w}" for r in rows for n, w in r["refused"].items()})
    if refused:
        out += ["", "Refused or failed: " + "; ".join(refused)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark and GPU check for neighborhood attention: ours vs cuDNN SDPA (and FlexAttention) in one run.

    diffattn bench gna --cases flux-gna,hunyuan-gna --flex --check

Cases are the NATTEN Hopper profiler configurations (docs/profiler.md; fp16, batch 1, head dim 128). Prints a
Markdown table (ms median of `triton.testing.do_bench`, effective TFLOP/s = 4*N*kernel_volume*D*H / time,
speed-up over cuDNN measured in the same process) and writes every number to --out as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .harness import env_line, median_ms, write_json_lines
from .tuning import command_line, geomean_order, merge_table_row

logger = logging.getLogger("diffattn")


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    heads: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    natten_kernel_ms: float | None = None  # NATTEN hopper-fna on H100, kernel only
    natten_total_ms: float | None = None  # with token permutation
    natten_cudnn_ms: float | None = None  # their cuDNN baseline


CASES: dict[str, Case] = {
    "hunyuan-na": Case((30, 48, 80), 24, (18, 24, 24), (1, 1, 1), 79.04, 84.42, 283.33),
    "hunyuan-gna": Case((30, 48, 80), 24, (18, 24, 24), (16, 8, 8), 23.36, 29.11, 283.33),
    "flux-na": Case((256, 256), 24, (80, 80), (1, 1), 16.20, 18.60, 97.435),
    "flux-gna": Case((256, 256), 24, (80, 80), (16, 16), 7.91, 10.60, 97.435),
    "hunyuan-gna-small": Case((8, 32, 32), 8, (6, 16, 16), (4, 8, 8)),
    # FreeSwim's inward window at 1088x1920x81 on Wan2.1-1.3B (12 heads): plain NA, full along time
    "freeswim-1080p": Case((21, 68, 120), 12, (21, 31, 53), (1, 1, 1)),
}


def _bench(fn, long: bool = False) -> float:
    return median_ms(fn, warmup=100 if long else 50, rep=600 if long else 300)


def flex_neighborhood(q, k, v, case: Case, order: str, plan, grad: bool = False):
    """FlexAttention with the same neighborhood mask, tokens in row-major or in our tile order. With `grad`, the
    permuted q, k, v are leaves that need gradients and `run()` returns (out, leaves) for a backward."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from ..kernels.neighborhood.tiling import permute_tokens, unpermute_tokens

    dev = q.device
    nd = len(case.shape)
    sts, lns = [], []
    for a in plan.axes:
        assert a.dilation == 1
        sts.append(torch.tensor([r[0] for r in a.rows[0]], dtype=torch.int32, device=dev))
        lns.append(torch.tensor([r[1] for r in a.rows[0]], dtype=torch.int32, device=dev))
    shape = case.shape
    if order == "rowmajor":
        def coords(idx):
            out = []
            for i in reversed(range(nd)):
                out.append(idx % shape[i])
                idx = idx // shape[i]
            return out[::-1]
        tile_q = tile_k = None
    else:
        tile_q, tile_k = plan.q_tile, plan.kv_tile
        def make_coords(tile):
            nt = [-(-shape[i] // tile[i]) for i in range(nd)]
            per = math.prod(tile)

            def coords(idx):
                t, r = idx // per, idx % per
                tc, rc = [], []
                for i in reversed(range(nd)):
                    tc.append(t % nt[i])
                    t = t // nt[i]
                    rc.append(r % tile[i])
                    r = r // tile[i]
                tc, rc = tc[::-1], rc[::-1]
                return [tc[i] * tile[i] + rc[i] for i in range(nd)]
            return coords
        qcoords, kcoords = make_coords(tile_q), make_coords(tile_k)

    def mask_mod(b, h, q_idx, kv_idx):
        qc = coords(q_idx) if order == "rowmajor" else qcoords(q_idx)
        kc = coords(kv_idx) if order == "rowmajor" else kcoords(kv_idx)
        ok = None
        for i in range(nd):
            qi = torch.clamp(qc[i], max=shape[i] - 1)
            inside = (kc[i] >= sts[i][qi]) & (kc[i] < sts[i][qi] + lns[i][qi])
            if order != "rowmajor":
                inside = inside & (kc[i] < shape[i]) & (qc[i] < shape[i])
            ok = inside if ok is None else ok & inside
        return ok

    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    if order == "rowmajor":
        qf, kf, vf = (t.reshape(b, -1, h, d).transpose(1, 2).contiguous() for t in (q, k, v))
    else:
        qf = permute_tokens(q, tile_q, (1,) * nd)[:, 0].contiguous()
        kf = permute_tokens(k, tile_k, (1,) * nd)[:, 0].contiguous()
        vf = permute_tokens(v, tile_k, (1,) * nd)[:, 0].contiguous()
    bm = create_block_mask(mask_mod, None, None, qf.shape[2], kf.shape[2], device=dev, BLOCK_SIZE=128)
    flex = torch.compile(flex_attention, dynamic=False)
    if grad:
        qf, kf, vf = (t.detach().requires_grad_() for t in (qf, kf, vf))

    def run():
        o = flex(qf, kf, vf, block_mask=bm)
        return (o, (qf, kf, vf)) if grad else o

    def to_spatial(o):
        if order == "rowmajor":
            return o.transpose(1, 2).reshape(q.shape)
        return unpermute_tokens(o[:, None], shape, tile_q, (1,) * nd)

    return run, to_spatial


def sampled_check(q, k, v, out, case_args: dict, n_rows: int = 64, seed: int = 0) -> float:
    """Max relative error of `out` on random query rows against exact attention over each row's key set
    (key sets from the independent reference's per-axis masks; inf if any sampled output is not finite). Works at
    production sizes."""
    from ..kernels.neighborhood.checks import normalize_params
    from ..kernels.neighborhood.reference import axis_mask

    p = normalize_params(q.shape[1:-2], case_args["kernel_size"], case_args.get("stride", 1),
                         case_args.get("dilation", 1), case_args.get("is_causal", False))
    masks = [axis_mask(p.shape[i], p.kernel_size[i], p.stride[i], p.dilation[i], p.is_causal[i]) for i in range(p.ndim)]
    g = torch.Generator().manual_seed(seed)
    n = math.prod(p.shape)
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    qf, kf, vf, of = (t.reshape(b, n, h, d) for t in (q, k, v, out))
    worst = 0.0
    strides = [math.prod(p.shape[i + 1:]) for i in range(p.ndim)]
    for _ in range(n_rows):
        idx = int(torch.randint(0, n, (1,), generator=g))
        bi = int(torch.randint(0, b, (1,), generator=g))
        coords = [(idx // strides[i]) % p.shape[i] for i in range(p.ndim)]
        keys = torch.zeros(1, dtype=torch.long)
        for i in range(p.ndim):
            ax = torch.nonzero(masks[i][coords[i]]).flatten()
            keys = (keys[:, None] * p.shape[i] + ax[None, :]).flatten()
        keys = keys.to(q.device)
        qi = qf[bi, idx].float()  # [h, d]
        ki, vi = kf[bi, keys].float(), vf[bi, keys].float()  # [nk, h, d]
        s = torch.einsum("hd,nhd->hn", qi, ki) * d ** -0.5
        ref = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vi)
        err = ((of[bi, idx].float() - ref).norm() / ref.norm()).item()
        if not math.isfinite(err):  # NaN/inf outputs must not vanish in max()
            return float("inf")
        worst = max(worst, err)
    return worst


def gpu_correctness() -> list[str]:
    """Small random problems (odd sizes, every feature) against the reference, forward and backward."""
    from ..kernels.neighborhood.functional import neighborhood_attention
    from ..kernels.neighborhood.reference import neighborhood_attention_reference

    torch.manual_seed(0)
    lines = []
    configs = [
        ((37,), 7, 1, 1, False, 0),
        ((61,), 8, 3, 2, True, 5),
        ((19, 23), (6, 5), (2, 5), (2, 1), (False, True), 0),
        ((9, 12, 14), (3, 4, 5), (1, 2, 5), (1, 2, 1), (False, False, True), 7),
        ((16, 24, 32), (8, 16, 16), (4, 8, 8), 1, False, 0),
        ((32, 32), (16, 16), (8, 8), 1, False, 77),
    ]
    plan_runs = [(torch.float16, 2e-2, configs), (torch.bfloat16, 4e-2, configs[2:4]), (torch.float32, 1e-2, configs[::3])]
    for dtype, tol, cfgs in plan_runs:
        for shape, ks, st, dl, ca, T in cfgs:
            H, D = 3, 64 if dtype != torch.float32 else 32
            mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True)  # noqa: E731
            q, k, v = mk(2, *shape, H, D), mk(2, *shape, H, D), mk(2, *shape, H, D)
            ek = ev = None
            ins = [q, k, v]
            if T:
                ek, ev = mk(2, T, H, D), mk(2, T, H, D)
                ins += [ek, ev]
            go = torch.randn(2, *shape, H, D, device="cuda", dtype=dtype)
            o, lse = neighborhood_attention(q, k, v, ks, st, dl, ca, extra_k=ek, extra_v=ev, return_lse=True)
            grads = torch.autograd.grad((o.float() * go.float()).sum(), ins)
            ins64 = [t.detach().double().requires_grad_() for t in ins]
            ro, rl = neighborhood_attention_reference(
                ins64[0], ins64[1], ins64[2], ks, st, dl, ca, extra_k=ins64[3] if T else None,
                extra_v=ins64[4] if T else None, return_lse=True)
            rg = torch.autograd.grad((ro * go.double()).sum(), ins64)

            def rel(a, b):
                return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()

            errs = [rel(o, ro), rel(lse, rl)] + [rel(a, b) for a, b in zip(grads, rg)]
            ok = all(e < tol for e in errs) and all(torch.isfinite(t).all() for t in (o, *grads))
            lines.append(f"{'PASS' if ok else 'FAIL'} {str(dtype)[6:]} {shape} k{ks} s{st} d{dl} c{ca} T{T}: "
                         + " ".join(f"{e:.1e}" for e in errs))
    lines += _tma_path_checks()
    return lines


def _tma_path_checks() -> list[str]:
    """Problems through the front door, asserting its in-place TMA forward ran: perfectly block-sparse ones and ones
    with masked tile pairs, with lse, text tokens, batch > 1 (3-D folds batch into axis 0) and the backward from the
    TMA forward's lse."""
    from ..kernels.neighborhood import triton_fwd
    from ..kernels.neighborhood.functional import neighborhood_attention
    from ..kernels.neighborhood.reference import neighborhood_attention_reference

    real = triton_fwd.na_forward
    calls = [0]

    def counting(*a, **kw):
        calls[0] += bool(kw.get("tma"))
        return real(*a, **kw)

    triton_fwd.na_forward = counting
    lines = []
    try:
        for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 4e-2)):
            for shape, ks, st, qt, kt, T, B in [((8, 16, 32), (4, 8, 16), (4, 8, 16), (2, 8, 8), (2, 8, 8), 0, 2),
                                                 ((32, 48), (16, 16), (8, 8), (8, 8), (4, 4), 77, 2),
                                                 ((256,), 64, 64, (64,), (64,), 5, 3),
                                                 # masked tile pairs (plain NA, odd sizes, borders)
                                                 ((8, 19, 29), (5, 7, 9), 1, (2, 8, 8), (2, 8, 8), 11, 2),
                                                 # batch folded into axis 0 with tiles straddling batch elements
                                                 ((13, 20, 24), (5, 9, 9), (1, 2, 2), (8, 4, 4), (4, 8, 4), 7, 2),
                                                 ((37, 45), (13, 9), (1, 2), (8, 16), (8, 16), 0, 1)]:
                torch.manual_seed(1)
                mk = lambda *s_: torch.randn(*s_, device="cuda", dtype=dtype, requires_grad=True)  # noqa: E731, B023
                ins = [mk(B, *shape, 2, 64) for _ in range(3)]
                if T:
                    ins += [mk(B, T, 2, 64), mk(B, T, 2, 64)]
                before = calls[0]
                o, lse = neighborhood_attention(*ins[:3], ks, st, extra_k=ins[3] if T else None,
                                                extra_v=ins[4] if T else None, return_lse=True, q_tile=qt, kv_tile=kt)
                took_tma = calls[0] > before
                go = torch.randn_like(o)
                grads = torch.autograd.grad((o.float() * go.float()).sum(), ins)
                i64 = [t.detach().double().requires_grad_() for t in ins]
                ro, rl = neighborhood_attention_reference(*i64[:3], ks, st, extra_k=i64[3] if T else None,
                                                          extra_v=i64[4] if T else None, return_lse=True)
                rg = torch.autograd.grad((ro * go.double()).sum(), i64)
                errs = [float((a.double() - b).norm() / b.norm()) for a, b in [(o, ro), (lse, rl), *zip(grads, rg)]]
                ok = took_tma and all(e < tol for e in errs)
                lines.append(f"{'PASS' if ok else 'FAIL'} TMA path {'taken' if took_tma else 'NOT TAKEN'} "
                             f"{str(dtype)[6:]} B{B} {shape} k{ks} s{st} T{T}: " + " ".join(f"{e:.1e}" for e in errs))
    finally:
        triton_fwd.na_forward = real
    return lines


# TMA in-place launch variants: (q_tile, kv_tile) by number of spatial axes, then (warps, stages). 64-row tiles with
# 4 warps and 64-key tiles with 2-3 stages fit two programs per SM (shared memory <= 113 KB each), so one program's
# softmax can run under the other's tensor-core work. Software-pipelined scores (next tile's QK^T before this tile's
# softmax) and Triton 3.6's warp_specialize were tried at commit 091bab3 and lost (NOTES.md).
TMA_SWEEP: dict[int, list[tuple]] = {
    2: [((8, 16), (8, 16), 8, 3), ((8, 16), (8, 16), 8, 2), ((8, 16), (8, 8), 8, 2), ((8, 16), (8, 8), 8, 3),
        ((4, 16), (8, 8), 4, 2), ((4, 16), (8, 8), 4, 3), ((4, 16), (8, 16), 4, 2)],
    3: [((2, 8, 8), (2, 8, 8), 8, 3), ((2, 8, 8), (2, 8, 8), 8, 2), ((2, 8, 8), (1, 8, 8), 8, 2),
        ((2, 8, 8), (1, 8, 8), 8, 3), ((1, 8, 8), (1, 8, 8), 4, 2), ((1, 8, 8), (1, 8, 8), 4, 3),
        ((1, 8, 8), (2, 8, 8), 4, 2)],
}


def tma_sweep(name: str, case: Case, q, k, v, cudnn_ms: float, long: bool, add) -> None:
    """Time the in-place TMA forward over `TMA_SWEEP` (each variant checked on sampled rows first)."""
    from ..kernels.neighborhood.functional import get_plan
    from ..kernels.neighborhood.triton_fwd import na_forward
    from ..kernels.neighborhood.triton_fwd_tma import tma_inplace_ok

    scale = q.shape[-1] ** -0.5
    for qt, kt, w, st in TMA_SWEEP[len(case.shape)]:
        tag = f"Q{qt} KV{kt} warps={w} stages={st}"
        try:
            plan = get_plan(case.shape, case.kernel_size, case.stride, 1, False, qt, kt)
            if not tma_inplace_ok(q, plan):
                add("ours TMA sweep SKIPPED", float("nan"), f"{tag}: not perfectly block-sparse at these tiles")
                continue
            fn = lambda: na_forward(q, k, v, plan, scale, None, None, False, "spatial", w, st, tma=True)  # noqa: E731
            err = sampled_check(q, k, v, fn()[0], dict(kernel_size=case.kernel_size, stride=case.stride), 16)
            ms = _bench(fn, long)
            add("ours TMA in place, sweep", ms, tag, speedup=cudnn_ms / ms, sampled_rel_err=err)
        except Exception as e:
            add("ours TMA sweep FAILED", float("nan"), f"{tag}: {type(e).__name__}: {str(e)[:200]}")


def tile_sweep(case: Case, q, k, v, cudnn_ms: float, long: bool, add, n_best: int = 5) -> None:
    """Does the simulator's tile choice hold up? Time the front door at the `n_best` cheapest (q_tile, kv_tile)
    pairs by `tiling.tile_cost` plus NATTEN's Hopper tiles, and log the rank correlation of cost and time."""
    from ..kernels.neighborhood.checks import normalize_params
    from ..kernels.neighborhood.functional import neighborhood_attention
    from ..kernels.neighborhood.tiling import pow2_shapes, make_plan, tile_cost

    p = normalize_params(case.shape, case.kernel_size, case.stride)
    shapes = pow2_shapes(p.ndim, 7)
    costs = []
    for qt in shapes:
        for kt in shapes:
            if any(t > 2 * n and t > 1 for t, n in zip(qt + kt, p.shape + p.shape)):
                continue
            plan = make_plan(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, qt, kt)
            costs.append((tile_cost(plan), qt, kt, plan.counts()))
    costs.sort(key=lambda c: c[0])
    natten = {2: ((16, 8), (16, 8)), 3: ((2, 8, 8), (2, 8, 8))}[p.ndim]
    picks = costs[:n_best] + [c for c in costs if (c[1], c[2]) == natten and c not in costs[:n_best]]
    measured = []
    for cost, qt, kt, counts in picks:
        tag = f"Q{qt} KV{kt} sim. cost rank {costs.index((cost, qt, kt, counts)) + 1}/{len(costs)}"
        try:
            def fn(qt=qt, kt=kt):
                return neighborhood_attention(q, k, v, case.kernel_size, case.stride, q_tile=qt, kv_tile=kt)
            err = sampled_check(q, k, v, fn(), {"kernel_size": case.kernel_size, "stride": case.stride}, 8)
            ms = _bench(fn, long)
            masked = counts["masked"] / max(counts["visited"], 1)
            add("tile sweep (front door)", ms, f"{tag}, {masked:.0%} pairs masked", speedup=cudnn_ms / ms,
                sampled_rel_err=err, sim_cost=cost)
            measured.append((cost, ms))
        except Exception as e:
            add("tile sweep FAILED", float("nan"), f"{tag}: {type(e).__name__}: {str(e)[-300:]}")
    if len(measured) > 2:
        rc = [sorted(x[0] for x in measured).index(c) for c, _ in measured]
        rt = [sorted(x[1] for x in measured).index(t) for _, t in measured]
        n = len(measured)
        rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rc, rt)) / (n * (n * n - 1))
        best_ms = min(t for _, t in measured)
        add("tile sweep summary", measured[0][1], f"Spearman(sim. cost, time) = {rho:.2f} over {n}; simulator's "
            f"choice {measured[0][1]:.2f} ms vs best measured {best_ms:.2f} ms", speedup=cudnn_ms / measured[0][1])


def run_case(name: str, case: Case, args, rows: list[dict]) -> None:
    from diffattn.kernels.neighborhood.simulator import simulate

    from ..kernels.neighborhood.functional import get_plan, neighborhood_attention
    from ..kernels.neighborhood.tiling import permute_tokens, unpermute_tokens
    from ..kernels.neighborhood.triton_fwd import na_forward

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    b, h, d = 1, case.heads, args.head_dim
    n = math.prod(case.shape)
    kvol = math.prod(case.kernel_size)
    flops = 4 * n * kvol * d * h * b
    dense_flops = 4 * n * n * d * h * b
    q, k, v = (torch.randn(b, *case.shape, h, d, device="cuda", dtype=dtype) for _ in range(3))
    long = n > 100_000

    def add(impl: str, ms: float, note: str = "", eff_flops: float = flops, **kw):
        row = dict(case=name, impl=impl, ms=ms, tflops=eff_flops / ms / 1e9, note=note, **kw)
        rows.append(row)
        print(json.dumps(row), flush=True)

    qs, ks_, vs = (t.reshape(b, n, h, d).transpose(1, 2).contiguous() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn_ms = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks_, vs), long)
    add("cuDNN SDPA (dense)", cudnn_ms, eff_flops=dense_flops)

    variants = [dict()]
    if args.tile_sweep:
        tile_sweep(case, q, k, v, cudnn_ms, long, add)
        variants = []
    elif args.only_tma:
        tma_sweep(name, case, q, k, v, cudnn_ms, long, add)
        variants = []
    elif args.sweep:
        variants += [dict(num_stages=3), dict(kv64=True, num_stages=3), dict(kv64=True, num_stages=4),
                     dict(q64=True, kv64=True, num_warps=4, num_stages=3)]
    for var in variants:
        q_tile = kv_tile = None
        if var.get("kv64"):
            from ..kernels.neighborhood.checks import normalize_params
            from ..kernels.neighborhood.tiling import choose_tiles
            p = normalize_params(case.shape, case.kernel_size, case.stride)
            q_tile, kv_tile = choose_tiles(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                           64 if var.get("q64") else 128, 64)
        plan = get_plan(case.shape, case.kernel_size, case.stride, 1, False, q_tile, kv_tile)
        sim = simulate(case.shape, case.kernel_size, case.stride, q_tile=plan.q_tile, kv_tile=plan.kv_tile)
        scale = d ** -0.5
        kw = {k_: v_ for k_, v_ in var.items() if k_ in ("num_warps", "num_stages")}
        if var.get("kv64") and "num_warps" not in kw:
            kw["num_warps"] = 8
        tag = f"Q{plan.q_tile} KV{plan.kv_tile} {kw or ''}"
        try:
            fn = lambda: na_forward(q, k, v, plan, scale, None, None, False, "spatial", **kw)  # noqa: E731
            out = fn()[0]
            err = sampled_check(q, k, v, out, dict(kernel_size=case.kernel_size, stride=case.stride), 32)
            ms = _bench(fn, long)
            add("ours, in place (no permutation)", ms, tag, sim_upper=sim.upper_bound_speedup,
                sim_expected=sim.expected_speedup, perfect=sim.perfectly_block_sparse, sampled_rel_err=err,
                speedup=cudnn_ms / ms)
            if var:
                continue
            from ..kernels.neighborhood.triton_fwd_tma import tma_inplace_ok
            if tma_inplace_ok(q, plan):
                try:
                    fti = lambda: na_forward(q, k, v, plan, scale, None, None, False, "spatial", tma=True)  # noqa: E731
                    err_i = sampled_check(q, k, v, fti()[0], dict(kernel_size=case.kernel_size, stride=case.stride), 16)
                    ms_i = _bench(fti, long)
                    add("ours TMA in place (no permutation)", ms_i, tag, speedup=cudnn_ms / ms_i, sampled_rel_err=err_i)
                except Exception as e:
                    add("ours TMA in place FAILED", float("nan"), f"{type(e).__name__}: {str(e)[:300]}")
            ffd = lambda: neighborhood_attention(q, k, v, case.kernel_size, case.stride)  # noqa: E731
            err_f = sampled_check(q, k, v, ffd(), dict(kernel_size=case.kernel_size, stride=case.stride), 16)
            ms_f = _bench(ffd, long)
            add("ours, front door neighborhood_attention()", ms_f, tag, speedup=cudnn_ms / ms_f, sampled_rel_err=err_f)
            qp = permute_tokens(q, plan.q_tile, (1,) * len(case.shape)).contiguous()
            kp = permute_tokens(k, plan.kv_tile, (1,) * len(case.shape)).contiguous()
            vp = permute_tokens(v, plan.kv_tile, (1,) * len(case.shape)).contiguous()
            fnp = lambda: na_forward(qp, kp, vp, plan, scale, None, None, False, "permuted")  # noqa: E731
            ms_p = _bench(fnp, long)
            add("ours, permuted layout (kernel only)", ms_p, tag, speedup=cudnn_ms / ms_p)
            if sim.perfectly_block_sparse and args.tma:
                tma_sweep(name, case, q, k, v, cudnn_ms, long, add)

            def total():
                a = permute_tokens(q, plan.q_tile, (1,) * len(case.shape))
                bb = permute_tokens(k, plan.kv_tile, (1,) * len(case.shape))
                c = permute_tokens(v, plan.kv_tile, (1,) * len(case.shape))
                o = na_forward(a, bb, c, plan, scale, None, None, False, "permuted")[0]
                return unpermute_tokens(o, case.shape, plan.q_tile, (1,) * len(case.shape))
            ms_t = _bench(total, long)
            add("ours, permute + kernel + unpermute", ms_t, tag, speedup=cudnn_ms / ms_t)
            if args.dense_ours:
                dplan = get_plan(case.shape, case.shape, 1, 1, False, plan.q_tile, plan.kv_tile)
                ms_d = _bench(lambda: na_forward(q, k, v, dplan, scale, None, None, False, "spatial"), long)
                add("ours, dense (kernel_size = shape)", ms_d, tag, eff_flops=dense_flops, speedup=cudnn_ms / ms_d,
                    predicted_sparse_ms=ms_d / sim.expected_speedup)
            if args.backward and not long:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                go = torch.randn_like(q)

                def fb():
                    o = neighborhood_attention(qg, kg, vg, case.kernel_size, case.stride)
                    torch.autograd.grad(o, (qg, kg, vg), go)
                ms_b = _bench(fb, long)
                qsg, ksg, vsg = (t.clone().requires_grad_() for t in (qs, ks_, vs))
                gos = torch.randn_like(qs)

                def fbc():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        o = torch.nn.functional.scaled_dot_product_attention(qsg, ksg, vsg)
                    torch.autograd.grad(o, (qsg, ksg, vsg), gos)
                ms_bc = _bench(fbc, long)
                add("cuDNN SDPA fwd+bwd (dense)", ms_bc, eff_flops=dense_flops * 3.5)
                add("ours fwd+bwd", ms_b, tag, eff_flops=flops * 3.5, speedup=ms_bc / ms_b)
                from ..kernels.neighborhood.triton_bwd import na_backward
                o1, l1 = na_forward(q, k, v, plan, scale, None, None, True, "spatial")
                # warps, stages, dK/dV query-row slices (NOTES.md "Session 10": the slices and 1 stage cut spills)
                for bw, bs, qs in ((4, 2, 1), (8, 2, 1), (4, 3, 1), (8, 3, 1), (8, 1, 1), (8, 2, 4), (8, 1, 2),
                                   (8, 1, 4)):
                    label = f"warps={bw} stages={bs} q_split={qs}"
                    try:
                        fbw = lambda: na_backward(q, k, v, None, None, o1, l1, go, None, plan, scale, bw, bs,  # noqa: E731
                                                  q_split=qs)
                        ms_bw = _bench(fbw, long)
                        add("ours backward only", ms_bw, f"{tag} bwd {label}", eff_flops=flops * 2.5)
                    except Exception as e:
                        add("ours backward FAILED", float("nan"), f"{label}: {type(e).__name__}: {str(e)[:200]}")
        except Exception as e:  # keep the other variants going; report the failure in the table
            add("ours FAILED", float("nan"), f"{tag}: {type(e).__name__}: {str(e)[:300]}")
    if args.flex and (not long or args.flex_long) and not (args.only_tma or args.tile_sweep):
        plan = get_plan(case.shape, case.kernel_size, case.stride, 1, False)
        for order in ("rowmajor", "tiled"):
            try:
                t0 = time.time()
                run, to_spatial = flex_neighborhood(q, k, v, case, order, plan)
                o = to_spatial(run())
                err = sampled_check(q, k, v, o, dict(kernel_size=case.kernel_size, stride=case.stride), 16)
                ms = _bench(run, long)
                add(f"FlexAttention ({order} tokens)", ms, f"setup {time.time() - t0:.0f}s", speedup=cudnn_ms / ms,
                    sampled_rel_err=err)
            except Exception as e:
                add(f"FlexAttention ({order}) FAILED", float("nan"), f"{type(e).__name__}: {str(e)[:300]}")


def ceilings() -> tuple[float, float]:
    """This run's bf16 matmul rate (TFLOP/s, 8192^3) and device-copy bandwidth (GB/s, 1 GiB), for the floors."""
    def matmul_ms() -> float:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        return median_ms(lambda: a @ b, warmup=25, rep=100)

    def copy_ms() -> float:
        x = torch.empty(2**29, device="cuda", dtype=torch.int16)
        y = torch.empty_like(x)
        return median_ms(lambda: y.copy_(x), warmup=25, rep=100)

    mm, cp = matmul_ms(), copy_ms()
    torch.cuda.empty_cache()
    return 2 * 8192**3 / mm * 1e-9, 2 * 2**30 / cp * 1e-6


_CUDNN_MS: dict[tuple, float] = {}


def run_backends(name: str, case: Case, args, rows: list[dict], peak: float, bw: float) -> None:
    """cuDNN dense, then each named neighborhood backend on the same inputs: triton (the front door forced), and
    fa4/gluon through the block-sparse lowering, timed in total (permute + block-sparse kernel + unpermute: the
    front door) and kernel only (tokens already in tile order, as NATTEN's kernel-only figures). Floors: FLOPs / this
    run's matmul rate, q/k/v/o bytes once / this run's copy bandwidth."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..kernels.neighborhood.checks import normalize_params
    from ..kernels.neighborhood.functional import get_plan, neighborhood_attention
    from ..kernels.neighborhood.lowering import lower, lowering_reason

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    b, h, d = 1, case.heads, args.head_dim
    n = math.prod(case.shape)
    flops = 4 * n * math.prod(case.kernel_size) * d * h * b
    dense_flops = 4 * n * n * d * h * b
    floors = dict(flop_floor_ms=flops / peak * 1e-9, byte_floor_ms=4 * n * h * d * 2 / bw * 1e-6)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, *case.shape, h, d, generator=gen).to(getattr(args, "device", "cuda"), dtype)
               for _ in range(3))
    cargs = dict(kernel_size=case.kernel_size, stride=case.stride)
    warm, rep = (100, 500) if n > 100_000 else (50, 300)
    if args.quick:
        warm, rep = 25, 150

    def add(impl: str, ms: float, note: str = "", eff_flops: float = flops, **kw):
        row = dict(case=name, impl=impl, ms=ms, tflops=eff_flops / ms / 1e9 if ms == ms else float("nan"),
                   note=note, dtype=args.dtype, **floors, **kw)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    ck = (case.shape, h, d, args.dtype)
    if ck not in _CUDNN_MS:
        qs, ks_, vs = (t.reshape(b, n, h, d).transpose(1, 2).contiguous() for t in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            _CUDNN_MS[ck] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks_, vs),
                                      warmup=warm, rep=rep)
        del qs, ks_, vs
        add("cuDNN SDPA (dense)", _CUDNN_MS[ck], eff_flops=dense_flops)
    cudnn_ms = _CUDNN_MS[ck]
    p = normalize_params(case.shape, case.kernel_size, case.stride)
    plan = get_plan(case.shape, case.kernel_size, case.stride, 1, False)
    reason = lowering_reason(plan)
    tiles = f"Q{plan.q_tile} KV{plan.kv_tile}"
    for be in [x.strip() for x in args.backends.split(",") if x.strip() and x.strip() != "cudnn"]:
        try:
            t0 = time.time()
            if be in ("fa4", "gluon") and reason:
                add(f"ours {be} REFUSED", float("nan"), reason)
                continue
            fn = lambda: neighborhood_attention(q, k, v, case.kernel_size, case.stride, backend=be)  # noqa: E731,B023
            err = sampled_check(q, k, v, fn(), cargs, args.check_rows)
            setup = time.time() - t0
            ms = median_ms(fn, warmup=warm, rep=rep)
            add(f"ours {be}, front door" + (" (permute + block-sparse + unpermute)" if be in ("fa4", "gluon") else ""), ms,
                f"{tiles}; first call {setup:.1f}s", speedup=cudnn_ms / ms, sampled_rel_err=err)
            if be in ("fa4", "gluon") and not args.quick:
                for layout in args.layouts.split(","):
                    low = lower(plan, p, layout)
                    qp, kp, vp = low.permute_q(q), low.permute_kv(k), low.permute_kv(v)
                    fk = lambda: low.attend(qp, kp, vp, be, batch=b)  # noqa: E731,B023
                    err_k = sampled_check(q, k, v, low.unpermute(fk(), b), cargs, args.check_rows)
                    ms_k = median_ms(fk, warmup=warm, rep=rep)
                    add(f"ours {be}, kernel only (tokens in tile order, {layout}-major)", ms_k, f"{tiles}; block "
                        f"density {low.density():.4f}", speedup=cudnn_ms / ms_k, sampled_rel_err=err_k)
                    del qp, kp, vp
        except Exception as e:  # keep the other backends going; the failure is a row of the table
            add(f"ours {be} FAILED", float("nan"), f"{type(e).__name__}: {str(e)[:300]}")
    if args.permute_cost and reason is None:
        import os

        for layout, how in [(lay, "torch copies" if lay == "heads" else "Triton row gather") for lay in
                            args.layouts.split(",")] + ([("tokens", "torch copies")] if "tokens" in args.layouts else []):
            low = lower(plan, p, layout)
            env = os.environ.get("DIFFATTN_NA_PERMUTE")
            os.environ["DIFFATTN_NA_PERMUTE"] = "torch" if how == "torch copies" else "triton"
            try:
                o = low.permute_q(q)

                def perm():
                    low.permute_q(q), low.permute_kv(k), low.permute_kv(v)  # noqa: B023
                    return low.unpermute(o, b)  # noqa: B023
                ok = torch.equal(perm(), q)  # the round trip is exact
                add(f"permute q,k,v + unpermute out ({layout}-major, {how})", median_ms(perm, warmup=warm, rep=rep),
                    f"{tiles}; round trip exact: {ok}", eff_flops=float("nan"),
                    traffic_floor_ms=4 * 2 * n * h * d * q.element_size() / bw * 1e-6)
            finally:
                if env is None:
                    os.environ.pop("DIFFATTN_NA_PERMUTE", None)
                else:
                    os.environ["DIFFATTN_NA_PERMUTE"] = env


def neighborhood_order(rows: list[dict]) -> dict | None:
    """The neighborhood table row for exactly block-sparse plans from `--backends` rows: the front-door backends
    ordered as `bench.tuning.geomean_order` orders them, over the exact-plan cases. Plans with masked pairs need no
    row: only triton runs them on a GPU."""
    by_case: dict[str, dict[str, float]] = {}
    refused = {r["case"] for r in rows if r["impl"].endswith("REFUSED")}
    for r in rows:
        m = re.match(r"ours (\w+), front door", r["impl"])
        if m and r["case"] not in refused:
            by_case.setdefault(r["case"], {})[m.group(1)] = r["ms"]
    return geomean_order(by_case)


def write_neighborhood_rows(rows: list[dict], kind: str, dtype: str, head_dim: int, device_name: str,
                            source: str) -> Path | None:
    """Merge the exact-plan row into `diffattn/kernels/tuned/<kind>.json` (other operations and rows kept)."""
    row = neighborhood_order(rows)
    if row is None:
        return None
    row["generated_by"] = source
    return merge_table_row(kind, device_name, "neighborhood", f"{dtype}/d{head_dim}/b128", row)


def format_table(rows: list[dict]) -> str:
    out = ["| case | implementation | ms (median) | eff. TFLOP/s | speed-up vs cuDNN | NATTEN H100 | simulator | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = CASES.get(r["case"])
        nat = ""
        if c and c.natten_kernel_ms and r["impl"].startswith("ours"):
            nat = (f"{c.natten_cudnn_ms / c.natten_kernel_ms:.1f}x kernel / "
                   f"{c.natten_cudnn_ms / c.natten_total_ms:.1f}x total")
        sim = ""
        if "sim_upper" in r:
            sim = f"bound {r['sim_upper']:.1f}x, exp. {r['sim_expected']:.1f}x" + (", perfect" if r.get("perfect") else "")
        if "flop_floor_ms" in r:
            sim = f"floors {r['flop_floor_ms']:.2f} / {r['byte_floor_ms']:.2f} ms"
        if "predicted_sparse_ms" in r:
            sim = f"predicts {r['predicted_sparse_ms']:.2f} ms sparse"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        note = r.get("note", "")
        if "sampled_rel_err" in r:
            note += f" err {r['sampled_rel_err']:.1e}"
        out.append(f"| {r['case']} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | {sp} | {nat} | {sim} | {note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diffattn bench gna", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="flux-na,flux-gna,hunyuan-na,hunyuan-gna",
                    help=f"comma-separated, from {sorted(CASES)}")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention with the same mask")
    ap.add_argument("--flex-long", action="store_true", help="FlexAttention also on cases over 100k tokens")
    ap.add_argument("--sweep", action="store_true", help="also try other tile/warp/stage settings")
    ap.add_argument("--dense-ours", action="store_true", help="time our kernel on dense attention (simulator anchor)")
    ap.add_argument("--backward", action="store_true", help="time forward+backward (cases under 100k tokens)")
    ap.add_argument("--tma", action="store_true", help="also sweep the TMA path's launch variants on block-sparse cases")
    ap.add_argument("--only-tma", action="store_true", help="time cuDNN and the TMA sweep only (with --tma)")
    ap.add_argument("--tile-sweep", action="store_true",
                    help="time cuDNN and the front door at the simulator's best tile pairs (checks its choice)")
    ap.add_argument("--check", action="store_true", help="run the small-shape correctness suite first")
    ap.add_argument("--backends", default=None,
                    help="comma-separated from cudnn,triton,fa4,gluon: time the registry's neighborhood backends "
                         "(fa4/gluon through the block-sparse lowering: total and kernel only) instead of the "
                         "kernel variants")
    ap.add_argument("--check-rows", type=int, default=16, help="sampled rows checked per --backends run")
    ap.add_argument("--permute-cost", action="store_true", help="with --backends: time the permutation copies alone")
    ap.add_argument("--quick", action="store_true",
                    help="with --backends: short timing windows and no kernel-only rows (a tight device budget)")
    ap.add_argument("--layouts", default="tokens", help="with --backends: permuted layouts timed kernel-only "
                    "(tokens = token-major, the default; heads = head-major)")
    ap.add_argument("--tune", action="store_true",
                    help="with --backends: write the exact-plan neighborhood row of diffattn/kernels/tuned/<kind>.json")
    ap.add_argument("--tune-from", default=None, metavar="ROWS.jsonl",
                    help="write that row from saved --backends rows instead (no GPU needed; with --kind)")
    ap.add_argument("--kind", default=None, help="device kind of --tune-from rows, e.g. h200")
    ap.add_argument("--out", default=None, help="write JSON lines here")
    args = ap.parse_args(argv)
    if args.tune_from:
        if not args.kind:
            print("--tune-from needs --kind (e.g. h200)", file=sys.stderr)
            return 2
        saved = [json.loads(line) for line in open(args.tune_from) if line.strip()]
        saved = [r for r in saved if r.get("dtype", args.dtype) == args.dtype]
        path = write_neighborhood_rows(saved, args.kind, args.dtype, args.head_dim, args.kind, command_line())
        print(f"wrote {path}" if path else "no front-door rows of exactly block-sparse cases in that file")
        return 0 if path else 1
    if not torch.cuda.is_available():
        print("a CUDA device is needed for this benchmark", file=sys.stderr)
        return 2
    print(f"{env_line()}; {args.dtype}, head dim {args.head_dim}, batch 1", flush=True)
    if args.check:
        lines = gpu_correctness()
        print("\n".join(lines), flush=True)
    rows: list[dict] = []
    names = args.cases.split(",")
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; known: {sorted(CASES)}", file=sys.stderr)
        return 2
    if args.backends:
        peak, bw = ceilings()
        print(f"ceilings (this run): bf16 matmul {peak:.0f} TFLOP/s, device copy {bw:.0f} GB/s", flush=True)
    for name in names:
        if args.backends:
            run_backends(name, CASES[name], args, rows, peak, bw)
        else:
            run_case(name, CASES[name], args, rows)
        torch.cuda.empty_cache()  # the case's tensors are gone with its frame
    if not args.backends:  # --backends appends its rows as it goes
        write_json_lines(rows, args.out)
    elif args.tune:
        from ..kernels import backends as registry

        name = torch.cuda.get_device_name()
        path = write_neighborhood_rows(rows, registry.device_kind(name), args.dtype, args.head_dim, name, command_line())
        print(f"wrote {path}", flush=True)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

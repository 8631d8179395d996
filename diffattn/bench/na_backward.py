"""Neighborhood backward at production shapes: per-kernel times over launch settings, vs FlexAttention.

    diffattn bench na-backward --cases flux-na,flux-gna,hunyuan-na,hunyuan-gna --out rows.jsonl

Why a separate benchmark: `diffattn bench gna --backward` times one whole backward per setting and only below 100k
tokens; choosing the dQ and the dK/dV launch settings needs each kernel's own time (torch.profiler device time per
kernel name) and the HunyuanVideo shapes too. Per case it prints the floors (2.5x the forward's useful FLOPs over
this run's matmul rate; q, k, v, o, dO read and dq, dk, dv written once over its copy bandwidth), then for every
setting (warps, stages, dK/dV query-row slices, dK/dV stages) the backward's median time, its dQ / dK/dV / other
(delta, casts) split and the largest gradient difference from the first setting; then forward+backward through
the front door (each of `--backends`, with its gradient difference from the first), through the block-sparse
lowering where the plan is exactly block-sparse, and through FlexAttention on the same mask (our tile order,
BLOCK 128). Cases: `diffattn.bench.gna.CASES`.

`--tune` writes the registry's training row for exactly block-sparse plans (`<dtype>/d<head dim>/b128/grad` of
`diffattn/kernels/tuned/<device kind>.json`) from the front-door forward+backward rows, so a call that needs
gradients picks the fastest training step rather than the fastest forward (`backends.Request.table_keys`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import torch

from .gna import CASES, Case, flex_neighborhood, ceilings
from .harness import env_line, median_ms, write_json_lines
from .tuning import command_line, geomean_order, merge_table_row

# (num_warps, num_stages, q_split[, dK/dV stages]): the front door's default first (the reference for gradient
# differences; `neighborhood.functional.backward_stages`), then its neighbours (kernels/neighborhood/NOTES.md,
# "Session 12"); 4 slices only at 1 dK/dV stage (2: wrong gradients); 3 stages fit the dK/dV kernel only (dQ needs
# 256 KiB of shared memory there)
Setting = tuple[int, ...]
SETTINGS: tuple[Setting, ...] = (
    (8, 2, 2, 3), (8, 2, 2), (8, 2, 1), (8, 1, 2), (8, 1, 1), (8, 1, 4), (4, 2, 2),
)


def parse_settings(text: str | None) -> tuple[Setting, ...]:
    """`"8,2,1;8,2,2,3"` -> ((8, 2, 1), (8, 2, 2, 3)); None -> `SETTINGS`."""
    if not text:
        return SETTINGS
    out = []
    for part in text.split(";"):
        vals = tuple(int(x) for x in part.split(","))
        if len(vals) not in (3, 4):
            raise ValueError(f"a setting is warps,stages,q_split[,dkv_stages]; got {part!r}")
        out.append(vals)
    return tuple(out)


def kernel_split(fn, iters: int = 3) -> dict[str, float]:
    """Device milliseconds per call of `fn`, by kernel: dq, dkv and everything else (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    split = dict(dq=0.0, dkv=0.0, other=0.0)
    for ev in prof.key_averages():
        if getattr(ev, "device_type", DeviceType.CUDA) != DeviceType.CUDA:  # CPU ops would count their kernels twice
            continue
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        if not us or ev.key.startswith("ProfilerStep"):
            continue
        key = "dkv" if "dkv" in ev.key else "dq" if "bwd_dq" in ev.key else "other"
        split[key] += us / 1e3 / iters
    return split


def _max_rel(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
               for x, y in zip(a, b))


def fwd_bwd(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d_out: torch.Tensor, case: Case, plan):
    """A closure running forward + backward (returns dq, dk, dv) of `case` on leaf q, k, v: through the front door
    (`backend` a neighborhood backend name, "default" = the registry's choice) or, for "lowered:NAME", through the
    block-sparse lowering on block-sparse backend NAME (exactly block-sparse plans only; ValueError otherwise)."""
    from ..kernels.neighborhood.checks import normalize_params
    from ..kernels.neighborhood.functional import neighborhood_attention
    from ..kernels.neighborhood.lowering import lowering_reason, neighborhood_attention_block_sparse

    if backend.startswith("lowered:"):
        reason = lowering_reason(plan)
        if reason:
            raise ValueError(f"the plan is not exactly block-sparse: {reason}")
        params = normalize_params(case.shape, case.kernel_size, case.stride)
        bs_backend = backend.split(":", 1)[1]

        def run():
            return neighborhood_attention_block_sparse(q, k, v, plan, params, bs_backend)
    else:
        name = None if backend == "default" else backend

        def run():
            return neighborhood_attention(q, k, v, case.kernel_size, case.stride, backend=name)

    def fn():
        return torch.autograd.grad(run(), (q, k, v), d_out)
    return fn


def run_case(name: str, case: Case, args, rows: list[dict], peak: float, bw: float) -> None:
    from ..kernels.neighborhood.functional import get_plan
    from ..kernels.neighborhood.lowering import lowering_reason
    from ..kernels.neighborhood.triton_bwd import na_backward
    from ..kernels.neighborhood.triton_fwd import na_forward

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    b, h, d = 1, case.heads, args.head_dim
    n = math.prod(case.shape)
    fwd_flops = 4 * n * math.prod(case.kernel_size) * d * h * b
    bwd_flops = 2.5 * fwd_flops
    elem = torch.finfo(dtype).bits // 8
    floors = dict(flop_floor_ms=bwd_flops / peak * 1e-9, byte_floor_ms=8 * n * h * d * elem / bw * 1e-6)
    gen = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(b, *case.shape, h, d, generator=gen).to("cuda", dtype) for _ in range(4))
    plan = get_plan(case.shape, case.kernel_size, case.stride, 1, False)
    scale = d ** -0.5
    out, lse = na_forward(q, k, v, plan, scale, None, None, True, "spatial")
    tiles = f"Q{plan.q_tile} KV{plan.kv_tile}"

    exact = lowering_reason(plan) is None

    def add(impl: str, ms: float, flops: float, note: str = "", **kw):
        row = dict(case=name, impl=impl, ms=ms, tflops=flops / ms / 1e9 if ms == ms else float("nan"),
                   note=note, dtype=args.dtype, exact_plan=exact, **floors, **kw)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json_lines(rows, args.out)

    ref = None
    for warps, stages, q_split, *rest in args.settings:
        dkv_stages = rest[0] if rest else stages
        label = f"warps={warps} stages={stages} q_split={q_split}" + (f" dkv_stages={dkv_stages}" if rest else "")
        try:
            def fb():
                return na_backward(q, k, v, None, None, out, lse, go, None, plan, scale, warps, stages,  # noqa: B023
                                   q_split=q_split, dkv_stages=dkv_stages)  # noqa: B023
            grads = fb()[:3]
            diff = 0.0 if ref is None else _max_rel(grads, ref)
            if ref is None:
                ref = tuple(g.clone() for g in grads)
            ms = median_ms(fb, warmup=args.warmup, rep=args.rep)
            split = kernel_split(fb)
            add("ours backward only", ms, bwd_flops, f"{tiles} {label}", warps=warps, stages=stages,
                dkv_stages=dkv_stages, q_split=q_split, max_rel_diff_vs_first=diff,
                **{f"{k_}_ms": v_ for k_, v_ in split.items()})
        except Exception as e:  # noqa: BLE001 - a setting that does not compile is a row, not the end of the run
            add("ours backward FAILED", float("nan"), bwd_flops, f"{label}: {type(e).__name__}: {str(e)[:200]}")
    del ref

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    first = None
    for name_ in args.backends:
        impl = "ours fwd+bwd, block-sparse lowering" if name_.startswith("lowered:") else "ours fwd+bwd, front door"
        try:
            fn = fwd_bwd(name_, qg, kg, vg, go, case, plan)
            grads = fn()
            diff = 0.0 if first is None else _max_rel(grads, first)  # the result, not just the speed
            if first is None:
                first = tuple(g.clone() for g in grads)
            del grads
            add(impl, median_ms(fn, warmup=args.warmup, rep=args.rep), 3.5 * fwd_flops, f"backend={name_}",
                max_rel_diff_vs_first=diff)
        except Exception as e:  # noqa: BLE001 - a backend that cannot run this case is a row, not the end of the run
            add(impl.replace("fwd+bwd", "fwd+bwd FAILED"), float("nan"), 3.5 * fwd_flops,
                f"backend={name_}: {type(e).__name__}: {str(e)[:200]}")
    if args.no_flex or n > args.flex_max_tokens:
        add("FlexAttention fwd+bwd SKIPPED", float("nan"), 3.5 * fwd_flops,
            "--no-flex" if args.no_flex else f"{n} tokens > --flex-max-tokens {args.flex_max_tokens}")
    else:
        try:
            run, _ = flex_neighborhood(q, k, v, case, "tiled", plan, grad=True)
            gof = torch.randn_like(run()[0])

            def flex_fb():
                o, leaves = run()
                return torch.autograd.grad(o, leaves, gof)
            flex_fb()
            add("FlexAttention fwd+bwd (our tile order)", median_ms(flex_fb, warmup=args.warmup, rep=args.rep),
                3.5 * fwd_flops)
        except Exception as e:  # noqa: BLE001
            add("FlexAttention fwd+bwd FAILED", float("nan"), 3.5 * fwd_flops, f"{type(e).__name__}: {str(e)[:300]}")


def grad_order(rows: list[dict]) -> dict | None:
    """The training row for exactly block-sparse plans: the front-door backends named in `--backends` (not
    'default', the registry's own choice) ordered by forward+backward time (`tuning.geomean_order`)."""
    by_case: dict[str, dict[str, float]] = {}
    for r in rows:
        m = re.fullmatch(r"backend=(\w+)(:.*)?", r["note"], re.DOTALL)
        if r.get("exact_plan") and r["impl"].startswith("ours fwd+bwd") and r["impl"].endswith("front door") \
                and m and m.group(1) != "default":
            by_case.setdefault(r["case"], {})[m.group(1)] = r["ms"]
    return geomean_order(by_case)


def write_grad_row(rows: list[dict], kind: str, dtype: str, head_dim: int, device_name: str,
                   source: str):
    """Merge `grad_order(rows)` into the device kind's table as `<dtype>/d<head_dim>/b128/grad` (None: no rows)."""
    row = grad_order(rows)
    if row is None:
        return None
    row["generated_by"] = source
    return merge_table_row(kind, device_name, "neighborhood", f"{dtype}/d{head_dim}/b128/grad", row)


def format_table(rows: list[dict]) -> str:
    out = ["| case | impl | setting | ms | TFLOP/s | dQ ms | dK/dV ms | other ms | max rel diff | floors (FLOP / bytes) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt=".2f"):
            return format(r[key], fmt) if key in r else ""
        out.append(f"| {r['case']} | {r['impl']} | {r['note']} | {r['ms']:.2f} | {r['tflops']:.0f} | {f('dq_ms')} | "
                   f"{f('dkv_ms')} | {f('other_ms')} | {f('max_rel_diff_vs_first', '.1e')} | "
                   f"{r['flop_floor_ms']:.1f} / {r['byte_floor_ms']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diffattn bench na-backward", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="flux-na,flux-gna,hunyuan-na,hunyuan-gna",
                    help=f"comma-separated, from {sorted(CASES)}")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--settings", type=parse_settings, default=SETTINGS,
                    help="warps,stages,q_split[,dkv_stages];... (the first is the reference for gradient differences)")
    ap.add_argument("--backends", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                    default=["default", "triton", "gluon", "lowered:triton"],
                    help="fwd+bwd rows: neighborhood backends through the front door ('default' = the registry's "
                         "choice), or 'lowered:NAME' = the block-sparse lowering on block-sparse backend NAME")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~a minute a case)")
    ap.add_argument("--flex-max-tokens", type=int, default=100_000,
                    help="skip FlexAttention above this many tokens (its block mask is built densely)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=400, help="do_bench window, ms")
    ap.add_argument("--out", default=None, help="write JSON lines here (rewritten after every row)")
    ap.add_argument("--table", default=None, metavar="ROWS.jsonl", help="print the table of saved rows and exit")
    ap.add_argument("--tune", action="store_true", help="write the training (/grad) neighborhood row of "
                    "diffattn/kernels/tuned/<device kind>.json from the front-door fwd+bwd rows")
    ap.add_argument("--tune-from", default=None, metavar="ROWS.jsonl",
                    help="write that row from saved rows instead (no GPU needed; with --kind)")
    ap.add_argument("--kind", default=None, help="device kind of --tune-from rows, e.g. h100")
    args = ap.parse_args(argv)
    if args.table:
        print(format_table([json.loads(line) for line in open(args.table) if line.strip()]))
        return 0
    if args.tune_from:
        if not args.kind:
            print("--tune-from needs --kind (e.g. h100)", file=sys.stderr)
            return 2
        saved = [json.loads(line) for line in open(args.tune_from) if line.strip()]
        saved = [r for r in saved if r.get("dtype", args.dtype) == args.dtype]
        path = write_grad_row(saved, args.kind, args.dtype, args.head_dim, args.kind, command_line())
        print(f"wrote {path}" if path else "no front-door fwd+bwd rows of exactly block-sparse cases in that file")
        return 0 if path else 1
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; known: {sorted(CASES)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("a CUDA device is needed for this benchmark", file=sys.stderr)
        return 2
    print(f"{env_line()}; {args.dtype}, head dim {args.head_dim}, batch 1", flush=True)
    peak, bw = ceilings()
    print(f"ceilings (this run): bf16 matmul {peak:.0f} TFLOP/s, device copy {bw:.0f} GB/s", flush=True)
    rows: list[dict] = []
    for name in args.cases.split(","):
        run_case(name, CASES[name], args, rows, peak, bw)
        torch.cuda.empty_cache()
    if args.tune:
        from ..kernels import backends as registry

        dev = torch.cuda.get_device_name()
        path = write_grad_row(rows, registry.device_kind(dev), args.dtype, args.head_dim, dev, command_line())
        print(f"wrote {path}" if path else "--tune: no front-door fwd+bwd rows of exactly block-sparse cases",
              flush=True)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

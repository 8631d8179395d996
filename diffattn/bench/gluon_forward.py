"""Time the Gluon forward against cuDNN SDPA and our Triton kernel at one shape, in one process (GPU job script).

    diffattn bench gluon-forward --out bench.json [--variants 2:1,3:1,3:0]

Masks are the bench's (`diffattn bench kernels`): dense, radial-like at the asked densities, random. Prints one
line per case; effective TFLOP/s = 4*S^2*D*H*density / time. A correctness line compares the Gluon output with
the Triton kernel's (and cuDNN's when dense) on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch
    import triton
    from triton.testing import do_bench

    from diffattn.bench.kernels import SHAPES, make_mask
    from diffattn.kernels import block_sparse_attention
    from diffattn.kernels.block_sparse import get_block_index, gluon_fwd

    p = argparse.ArgumentParser(prog="diffattn bench gluon-forward", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="wan14b")
    p.add_argument("--cases", default="dense,radial:0.25,radial:0.11,random:0.10")
    p.add_argument("--variants", default="3:1:0,3:1:1,3:0:1", help="stages:pingpong:persistent, all timed dense")
    p.add_argument("--sparse-variants", default="0,1", help="indices into --variants timed on the sparse cases")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this many seconds")
    a = p.parse_args(argv)
    t0 = time.time()
    H, S, tpf = SHAPES[a.shape]
    D, bs = 128, 128
    dt = getattr(torch, a.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=dt, generator=g) for _ in range(3))
    scale = 1 / math.sqrt(D)
    nb = math.ceil(S / bs)
    variants = [tuple(int(x) for x in s.split(":")) for s in a.variants.split(",")]
    sparse_variants = [variants[int(i)] for i in a.sparse_variants.split(",")]
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d"), shape=a.shape, heads=H, tokens=S, head_dim=D, dtype=a.dtype)
    print(json.dumps(env), flush=True)
    rows = []

    def bench(fn, est_ms):
        return do_bench(fn, warmup=max(2 * est_ms, 25), rep=max(4 * est_ms, 100), return_mode="median")

    for case in a.cases.split(","):
        if time.time() - t0 > a.budget_s:
            print(f"budget: skipping {case}", flush=True)
            continue
        kind, dens = (case, 1.0) if case == "dense" else (case.split(":")[0], float(case.split(":")[1]))
        mask = make_mask("random" if kind == "dense" else kind, H, nb, bs, tpf, dens,
                         torch.Generator().manual_seed(1)).cuda()
        real = mask.float().mean().item()
        idx = get_block_index(mask)
        flops = 4 * S * S * D * H * real
        est = 180.0 * real
        row = dict(case=case, density=real)
        tri = lambda: block_sparse_attention(q, k, v, mask, block_size=bs, backend="triton")  # noqa: E731
        if kind == "dense":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def cud():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            row["cudnn_ms"] = bench(cud, est)
        row["triton_ms"] = bench(tri, est)
        ref = tri()
        for st, pp, pe in variants if kind == "dense" else sparse_variants:
            cfg = dict(gluon_fwd.config(D, stages=st, pingpong=bool(pp), persistent=bool(pe)))
            tag = f"gluon_s{st}_pp{pp}_pe{pe}"
            fn = lambda: gluon_fwd.forward(q, k, v, idx.kv_idx, idx.kv_cnt, bs, scale, None, None, cfg=cfg)  # noqa: E731
            try:
                o, _ = fn()
                torch.cuda.synchronize()
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                row[f"{tag}_ms"] = bench(fn, est)
                row[f"{tag}_relerr_vs_triton"] = err
                if kind == "dense":
                    c = cud()
                    row[f"{tag}_relerr_vs_cudnn"] = ((o.float() - c.float()).norm() / c.float().norm()).item()
            except Exception as e:  # report and go on to the next variant
                row[f"{tag}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for key in list(row):
            if key.endswith("_ms"):
                row[key.replace("_ms", "_tflops")] = flops / row[key] * 1e-9
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    print("\n| case | density | " + " | ".join(k for k in rows[0] if k.endswith("_ms")) + " |" if rows else "")
    for r in rows:
        print(f"| {r['case']} | {r['density']:.3f} | " + " | ".join(
            f"{r[k]:.2f} ({r[k.replace('_ms', '_tflops')]:.0f})" for k in r if k.endswith("_ms")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

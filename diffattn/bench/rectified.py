"""`diffattn bench rectified`: Rectified SpaAttn at production shapes, against dense cuDNN and Radial.

1. One denoising step of a full-size model (real config, random weights, bf16; `diffattn.bench.step` builds and
   times it): dense cuDNN, rectified with the model's upstream defaults, radial at the density rectified reached;
   step time, self-attention time, 50-step projection with each method's warm-up.
2. On the q/k/v of one self-attention layer captured from that forward (and, with `--activations FILE`, from any
   saved `{q, k, v}`, e.g. the demo video model's): the selection's cost (pooled map + threshold search + GAPR +
   R/C) against the sparse kernel's time, the token permutation's cost, and the attention-output relative error
   against dense of rectified, plain top-p on the same selection (rectification off) and radial at the same density.
3. `--attn-model`: the same kernel-level numbers on random q/k/v of another model's attention shape (no step).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("diffattn")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def radial_matching(frames: int, tokens_per_frame: int, density: float, block_size: int = 128) -> tuple[float, torch.Tensor]:
    """Radial's decay factor whose mask density is closest to `density` (bisection; density grows with it)."""
    from ..masks.radial import radial_mask

    lo, hi = 1e-3, 16.0
    best = (1.0, radial_mask(frames, tokens_per_frame, block_size=block_size, decay_factor=1.0))
    for _ in range(18):
        mid = math.sqrt(lo * hi)
        m = radial_mask(frames, tokens_per_frame, block_size=block_size, decay_factor=mid)
        d = m.float().mean().item()
        if abs(d - density) < abs(best[1].float().mean().item() - density):
            best = (mid, m)
        if d < density:
            lo = mid
        else:
            hi = mid
    return best


def layer_analysis(q, k, v, grid: tuple[int, int, int], settings: dict[str, Any], *, timing: bool,
                   ek=None, ev=None, scale=None, oracle_heads: int | None = 0) -> dict[str, Any]:
    """Errors vs dense (and, on CUDA, times) of rectified, plain top-p and radial at matched density for one
    layer's raster-order q/k/v `[B, H, S, D]` (video tokens) plus optional text keys."""
    from ..kernels import block_sparse_attention
    from ..kernels.block_sparse import build_block_index
    from ..masks import reorder
    from ..kernels.rectified_select import block_pool, block_pool_torch
    from ..methods.rectified import rectified_attention, rectified_plan, threshold_select
    from .harness import median_ms

    bs = settings["block_size"]
    perm = reorder.token_order(grid, settings["reorder"], bs).to(q.device)
    inv = reorder.inverse((grid, settings["reorder"], bs)).to(q.device)
    forced = reorder.neighbor_blocks(grid, settings["reorder"], bs)
    if settings["first_frame"] and grid[0] > 1:
        forced = forced | reorder.first_frame_blocks(grid, settings["reorder"], bs)
    forced = forced.to(q.device)[None, None]
    qp, kp, vp = (x.index_select(2, perm) for x in (q, k, v))
    kw = dict(block_size=bs, tau=settings["tau"], k_min=1.0 - settings["sa_drop_rate"], gapr=settings["gapr"],
              extra_k=ek, forced_blocks=forced, scale=scale)
    with torch.no_grad():
        kk = torch.cat([k, ek], 2) if ek is not None else k
        vv = torch.cat([v, ev], 2) if ev is not None else v
        dense = F.scaled_dot_product_attention(q, kk, vv, scale=scale)
        plan = rectified_plan(qp, kp, vp, **kw)
        rect = rectified_attention(qp, kp, vp, extra_v=ev, **kw).index_select(2, inv)
        plain = rectified_attention(qp, kp, vp, extra_v=ev, rectify=False, **kw).index_select(2, inv)
        nogapr = rectified_attention(qp, kp, vp, extra_v=ev, **{**kw, "gapr": False}).index_select(2, inv)
        density = plan.density
        decay, rmask = radial_matching(grid[0], grid[1] * grid[2], density, bs)
        rmask = rmask.to(q.device)
        radial = block_sparse_attention(q, k, v, rmask[None, None], block_size=bs, scale=scale, extra_k=ek,
                                        extra_v=ev)
    with torch.no_grad():  # block coherence: |block mean| / mean |token| (1: identical tokens; iid: 1/sqrt(bs))
        coh = {}
        for name, x in (("q", qp), ("k", kp)):
            xm, _ = block_pool_torch(x[:, :, : x.shape[2] // bs * bs], bs)
            coh[name] = (xm.norm(dim=-1).mean() / x.float().norm(dim=-1).mean()).item()
    out: dict[str, Any] = {
        "grid": list(grid), "heads": q.shape[1], "tokens": q.shape[2], "density": density,
        "coherence_q": coh["q"], "coherence_k": coh["k"], "coherence_iid": 1.0 / math.sqrt(bs),
        "radial_decay": decay, "radial_density": rmask.float().mean().item(),
        "mean_r": plan.out_scale.mean().item(),
        "unsafe_share_of_dropped": (plan.unsafe.sum() / (~plan.block_mask).sum().clamp_min(1)).item(),
        "err_rectified": rel_err(rect, dense), "err_rectified_no_gapr": rel_err(nogapr, dense),
        "err_topp_plain": rel_err(plain, dense), "err_radial": rel_err(radial, dense),
    }
    rd = out["radial_density"]
    if abs(rd - density) > 0.05:  # radial cannot reach rectified's density here: compare at radial's instead
        with torch.no_grad():
            lo, hi, best = 0.0, 1.0, None
            for _ in range(14):  # density grows with tau
                mid = (lo + hi) / 2
                d = rectified_plan(qp, kp, vp, **{**kw, "tau": mid}).density
                if best is None or abs(d - rd) < abs(best[1] - rd):
                    best = (mid, d)
                lo, hi = (mid, hi) if d < rd else (lo, mid)
            kw2 = {**kw, "tau": best[0]}
            out["at_radial_density"] = {
                "tau": best[0], "density": best[1],
                "err_rectified": rel_err(rectified_attention(qp, kp, vp, extra_v=ev, **kw2).index_select(2, inv), dense),
                "err_topp_plain": rel_err(rectified_attention(qp, kp, vp, extra_v=ev, rectify=False, **kw2)
                                          .index_select(2, inv), dense),
                "err_radial": out["err_radial"],
            }
    if oracle_heads != 0:
        with torch.no_grad():
            plain_plan = rectified_plan(qp, kp, vp, **{**kw, "gapr": False})
        out["oracle"] = oracle_analysis(qp, kp, vp, plain_plan, bs, scale, ek, ev, heads=oracle_heads)
    if timing and q.is_cuda:
        def sort_select():
            p = plan.probs
            srt, order = p.sort(-1, descending=True)
            n = ((srt.cumsum(-1) - srt) <= settings["tau"]).sum(-1)
            return order, n

        t = {
            "dense_ms": median_ms(lambda: F.scaled_dot_product_attention(q, kk, vv, scale=scale), warmup=25, rep=100),
            "kernel_ms": median_ms(lambda: block_sparse_attention(
                qp, kp, vp, plan.block_mask, block_size=bs, scale=scale, extra_k=ek, extra_v=ev,
                out_scale=plan.out_scale, out_bias=plan.out_bias), warmup=25, rep=100),
            "kernel_plain_ms": median_ms(lambda: block_sparse_attention(
                qp, kp, vp, plan.block_mask, block_size=bs, scale=scale, extra_k=ek, extra_v=ev), warmup=25, rep=100),
            "plan_ms": median_ms(lambda: rectified_plan(qp, kp, vp, **kw), warmup=25, rep=100),
            "plan_no_gapr_ms": median_ms(lambda: rectified_plan(qp, kp, vp, **{**kw, "gapr": False}), warmup=25, rep=100),
            "plan_torch_threshold_ms": median_ms(lambda: rectified_plan(qp, kp, vp, selection="threshold", **kw),
                                                 warmup=10, rep=50),
            "plan_torch_sort_ms": median_ms(lambda: rectified_plan(qp, kp, vp, selection="sort", **kw),
                                            warmup=10, rep=50),
            "pool_ms": median_ms(lambda: [block_pool(x, bs, with_mad=m) for x, m in ((qp, True), (kp, True), (vp, False))],
                                 warmup=10, rep=50),
            "threshold_ms": median_ms(lambda: threshold_select(plan.probs, settings["tau"] - plan.text_mass, 1),
                                      warmup=25, rep=100),
            "sort_select_ms": median_ms(sort_select, warmup=25, rep=100),
            "index_ms": median_ms(lambda: build_block_index(plan.block_mask), warmup=25, rep=100),
            "permute_ms": median_ms(lambda: [x.index_select(2, perm) for x in (q, k, v, q)], warmup=25, rep=100),
            "radial_kernel_ms": median_ms(lambda: block_sparse_attention(
                q, k, v, rmask[None, None], block_size=bs, scale=scale, extra_k=ek, extra_v=ev), warmup=25, rep=100),
        }
        # the selection without its index-list output, and the kernel fed the selection's own lists directly (what
        # a front-door entry taking ready lists would run; checked against the front door's output)
        from ..kernels.block_sparse import triton_fwd
        from ..kernels.rectified_select import rectified_select
        from ..methods.rectified import to_order
        from ..methods.rectified_core import resolve_k_min

        nk = plan.block_mask.shape[-1]
        sel_kw = dict(block_size=bs, tau=settings["tau"], k_min=resolve_k_min(kw["k_min"], nk), gapr=settings["gapr"],
                      extra_k=ek, forced_blocks=forced, scale=scale)
        t["plan_no_index_ms"] = median_ms(lambda: rectified_select(qp, kp, vp, emit_index=False, **sel_kw),
                                          warmup=25, rep=100)
        scale_f = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        ready = lambda: triton_fwd.forward(qp, kp, vp, plan.kv_idx, plan.kv_cnt, bs, scale_f, ek, ev,
                                           out_scale=plan.out_scale, out_bias=plan.out_bias)[0]
        t["kernel_triton_ready_lists_ms"] = median_ms(ready, warmup=10, rep=50)
        front = block_sparse_attention(qp, kp, vp, plan.block_mask, block_size=bs, scale=scale, extra_k=ek,
                                       extra_v=ev, out_scale=plan.out_scale, out_bias=plan.out_bias)
        ref_index = build_block_index(plan.block_mask)
        out["emitted_lists_equal_front_door_lists"] = bool(torch.equal(plan.kv_idx, ref_index.kv_idx)
                                                           and torch.equal(plan.kv_cnt, ref_index.kv_cnt))
        del ref_index
        out["ready_lists_vs_front_door_max_abs"] = (ready().float() - front.float()).abs().max().item()
        from ..kernels import backends as _reg
        out["front_door_backend"] = _reg.choose(_reg.make_request(
            "block_sparse", qp, head_dim=qp.shape[-1], block_size=bs, has_extra=ek is not None, has_epilogue=True))
        # token order: per layer, q, k, v are gathered into the compact order and the output back. Before: four
        # index_select(2) (contiguous [B, H, S, D] results) and then the adapter's copy to [B, S, H * D]; now
        # (`to_order`): whole-token-row gathers, the output's landing in [B, S, H, D] memory (the adapter's flatten
        # is then a view). q, k as the fused prologue writes them ([B, H, S, D]), v as the adapters pass it.
        v_view = v.transpose(1, 2).contiguous().transpose(1, 2)
        out_c = torch.empty_like(q)
        t["adapter_copy_ms"] = median_ms(lambda: out_c.transpose(1, 2).flatten(2, 3), warmup=25, rep=100)
        t["permute_old_ms"] = median_ms(lambda: (
            q.index_select(2, perm), k.index_select(2, perm), v_view.index_select(2, perm),
            out_c.index_select(2, inv).transpose(1, 2).flatten(2, 3)), warmup=25, rep=100)
        t["permute_rows_ms"] = median_ms(lambda: (
            to_order(q, perm), to_order(k, perm), to_order(v_view, perm),
            to_order(out_c, inv).transpose(1, 2).flatten(2, 3)), warmup=25, rep=100)
        # the alternative: permuting the hidden states once at the transformer's entry (and back at its exit):
        # one gather of [B, S, H * D] each way per forward, instead of the per-layer gathers above
        hid = v_view.transpose(1, 2).flatten(2, 3)
        t["permute_hidden_once_ms"] = median_ms(lambda: hid.index_select(1, perm), warmup=25, rep=100)
        del hid
        # what the method does since: inputs gathered into contiguous [B, H, S, D] (the kernels' faster layout),
        # the output into [B, S, H, D] memory (the adapter's flatten is then a view)
        t["permute_mixed_ms"] = median_ms(lambda: (
            q.index_select(2, perm), k.index_select(2, perm), v_view.index_select(2, perm),
            to_order(out_c, inv).transpose(1, 2).flatten(2, 3)), warmup=25, rep=100)
        t["permute_extra_mixed_ms"] = t["permute_mixed_ms"] - t["adapter_copy_ms"]
        qr, kr, vr = to_order(q, perm), to_order(k, perm), to_order(v_view, perm)
        t["kernel_rows_layout_ms"] = median_ms(lambda: block_sparse_attention(
            qr, kr, vr, plan.block_mask, block_size=bs, scale=scale, extra_k=ek, extra_v=ev,
            out_scale=plan.out_scale, out_bias=plan.out_bias), warmup=25, rep=100)
        del qr, kr, vr, out_c, v_view
        # the permutation's own cost per layer: what the method pays over raster order (whose output the adapter
        # copies anyway)
        t["permute_extra_old_ms"] = t["permute_old_ms"] - t["adapter_copy_ms"]
        t["permute_extra_rows_ms"] = t["permute_rows_ms"] - t["adapter_copy_ms"]
        t["selection_share"] = (t["plan_ms"] + t["index_ms"]) / t["kernel_ms"]  # lists rebuilt from the mask (round 1)
        t["selection_share_ready_lists"] = t["plan_ms"] / t["kernel_ms"]  # the method path (seed_block_index)
        with torch.no_grad():  # plans agree: Triton vs the PyTorch path on these activations
            other = rectified_plan(qp, kp, vp, selection="threshold", **kw)
        out["plans_equal"] = bool(torch.equal(other.block_mask, plan.block_mask))
        out["plans_mask_diff_share"] = (other.block_mask != plan.block_mask).float().mean().item()
        out["plans_r_maxdiff"] = (other.out_scale - plan.out_scale).abs().max().item()
        out["times"] = t
    return out


def oracle_analysis(qp, kp, vp, plan, bs: int, scale: float | None, ek=None, ev=None, heads: int | None = None,
                    chunk_blocks: int = 16) -> dict[str, float]:
    """What per-query-block rectification could reach with exact numbers, and how close the pooled estimate is.

    In the selection's token order, on the kept set of `plan` (a plan with GAPR off, so R and C are the pure pooled
    estimates): the exact token-level attention p gives, per query token, the kept mass rho and the dropped term
    n = sum_dropped p v; dense = rho * o_topp + n exactly. The method applies one R and one C per query *block*, so
    its best case is the block oracle `mean_block(rho) * o_topp + mean_block(n)`. Returns errors vs dense (Frobenius,
    over the heads used) of top-p, the block oracle and the pooled rectification, and the estimates' errors:
    dropped mass (1 - R) pooled vs exact (block means), and C pooled vs exact."""
    B, H, S, D = qp.shape
    heads = H if heads is None else min(H, heads)
    sc = (1.0 / math.sqrt(D)) if scale is None else scale
    nb = plan.block_mask.shape[2]
    sq = {"dense": 0.0, "topp": 0.0, "oracle": 0.0, "pooled": 0.0}
    drop_true, drop_pooled, c_err, c_norm = [], [], 0.0, 0.0
    with torch.no_grad():
        for b in range(B):
            for h in range(heads):
                kk = kp[b, h].float()
                vv = vp[b, h].float()
                if ek is not None:
                    kk, vv = torch.cat([kk, ek[b, h].float()]), torch.cat([vv, ev[b, h].float()])
                T = kk.shape[0] - S
                for i0 in range(0, nb, chunk_blocks):
                    i1 = min(nb, i0 + chunk_blocks)
                    q = qp[b, h, i0 * bs:min(S, i1 * bs)].float()
                    p = torch.softmax(q @ kk.T * sc, -1)
                    blk = torch.arange(q.shape[0], device=q.device) // bs + i0
                    keep = plan.block_mask[b, h, blk].repeat_interleave(bs, -1)[:, :S]
                    if T:
                        keep = torch.cat([keep, keep.new_ones(q.shape[0], T)], -1)
                    pk = p * keep
                    rho = pk.sum(-1, keepdim=True)
                    o_topp = (pk @ vv) / rho.clamp_min(1e-30)
                    n_drop = (p * ~keep) @ vv
                    dense = p @ vv
                    loc = blk - i0
                    cnt = torch.bincount(loc, minlength=i1 - i0).clamp_min(1).float()[:, None]
                    r_blk = torch.zeros(i1 - i0, 1, device=q.device).index_add_(0, loc, rho) / cnt
                    c_blk = torch.zeros(i1 - i0, D, device=q.device).index_add_(0, loc, n_drop) / cnt
                    oracle = r_blk[loc] * o_topp + c_blk[loc]
                    r_pool = plan.out_scale[b, h, i0:i1].float()[:, None]
                    c_pool = plan.out_bias[b, h, i0:i1].float()
                    pooled = r_pool[loc] * o_topp + c_pool[loc]
                    sq["dense"] += dense.pow(2).sum().item()
                    sq["topp"] += (o_topp - dense).pow(2).sum().item()
                    sq["oracle"] += (oracle - dense).pow(2).sum().item()
                    sq["pooled"] += (pooled - dense).pow(2).sum().item()
                    drop_true.append(1 - r_blk.flatten())
                    drop_pooled.append(1 - r_pool.flatten())
                    c_err += (c_pool - c_blk).pow(2).sum().item()
                    c_norm += c_blk.pow(2).sum().item()
    dt, dp = torch.cat(drop_true), torch.cat(drop_pooled)
    base = math.sqrt(sq["dense"])
    return {
        "heads_used": heads,
        "err_topp": math.sqrt(sq["topp"]) / base,
        "err_block_oracle": math.sqrt(sq["oracle"]) / base,
        "err_pooled_rectified_no_gapr": math.sqrt(sq["pooled"]) / base,
        "dropped_mass_true_mean": dt.mean().item(),
        "dropped_mass_pooled_mean": dp.mean().item(),
        "dropped_mass_abs_err_mean": (dt - dp).abs().mean().item(),
        "dropped_mass_corr": torch.corrcoef(torch.stack([dt, dp]))[0, 1].item() if dt.numel() > 1 else float("nan"),
        "c_rel_err": math.sqrt(c_err / max(c_norm, 1e-30)),
    }


class _Capture:
    """A runtime wrapper that keeps the q/k/v of one self/joint call of one layer (first forward only)."""

    def __init__(self, method, layer: int) -> None:
        self.method, self.layer, self.call = method, layer, None
        self.name = getattr(method, "name", "?")

    def attend(self, call):
        if self.call is None and call.layer.index == self.layer and call.role in ("self", "joint"):
            self.call = call
        return self.method.attend(call)


BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks")


_LAYER_KEYS = {"blocks": "num_layers", "transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}


def build_reduced(name: str, device: str, layers: tuple[int, ...] | None):
    """`step.build_model`, or with `layers` = blocks per block list (Wan: (n,), HunyuanVideo: (dual, single)) the same
    config with fewer blocks (random weights: every block costs the same). Returns (model, full block counts)."""
    from . import step as step_bench
    from .models import MODELS

    spec = MODELS[name]
    lists = ["blocks"] if spec["class"] == "WanTransformer3DModel" else ["transformer_blocks", "single_transformer_blocks"]
    full = {n: int(spec["config"][_LAYER_KEYS[n]]) for n in lists}
    if layers is None:
        return step_bench.build_model(name, device), full
    if len(layers) != len(lists):
        raise ValueError(f"--layers needs {len(lists)} counts for {name} ({', '.join(lists)}), got {layers}")
    cfg = dict(spec["config"])
    for n, keep in zip(lists, layers):
        if not 1 <= keep <= full[n]:
            raise ValueError(f"--layers: {n} has {full[n]} blocks, cannot keep {keep}")
        cfg[_LAYER_KEYS[n]] = keep
    tmp = f"{name}@{','.join(map(str, layers))}"
    MODELS[tmp] = {**spec, "config": cfg}
    try:
        return step_bench.build_model(tmp, device), full
    finally:
        del MODELS[tmp]


class _BlockTimer:
    """CUDA events around every transformer block (forward hooks), grouped by block list."""

    def __init__(self, model) -> None:
        self.events: list[tuple[str, Any, Any]] = []
        self.handles = []
        for n in BLOCK_LISTS:
            for blk in getattr(model, n, []):
                self.handles.append(blk.register_forward_pre_hook(self._pre(n)))
                self.handles.append(blk.register_forward_hook(self._post()))
        self._open: list = []

    def _pre(self, n):
        def hook(mod, args):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._open.append((n, e))
        return hook

    def _post(self):
        def hook(mod, args, out):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            n, s = self._open.pop()
            self.events.append((n, s, e))
        return hook

    def collect(self) -> dict[str, list[float]]:
        torch.cuda.synchronize()
        per: dict[str, list[float]] = {}
        for n, s, e in self.events:
            per.setdefault(n, []).append(s.elapsed_time(e) / 1e3)
        self.events.clear()
        return per

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _TypedAttentionTimer:
    """CUDA events around every self/joint attention call, keyed by the block list of the calling layer."""

    def __init__(self, method, kinds: list[tuple[str, int]]) -> None:
        self.method, self.kinds, self.name = method, kinds, getattr(method, "name", "?")
        self.events: list[tuple[str, Any, Any]] = []

    def kind(self, index: int) -> str:
        for n, count in self.kinds:
            if index < count:
                return n
            index -= count
        return self.kinds[-1][0]

    def attend(self, call):
        if call.role not in ("self", "joint"):
            return self.method.attend(call)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = self.method.attend(call)
        e.record()
        self.events.append((self.kind(call.layer.index), s, e))
        return out

    def collect(self) -> dict[str, float]:
        torch.cuda.synchronize()
        per: dict[str, float] = {}
        for n, s, e in self.events:
            per[n] = per.get(n, 0.0) + s.elapsed_time(e) / 1e3
        self.events.clear()
        return per


def scaled_step(model, inputs, variant: str, method: str, options: dict, full: dict[str, int],
                repeats: int = 1, keep_model_order: bool = False) -> dict[str, Any]:
    """One forward (after one warm-up) of a possibly reduced model, and the full model's step derived from it:
    step_full = step - sum(block times) + sum over block lists of (mean block time x full count); self-attention
    likewise (mean per block of each list x full count). Exact when the model is not reduced. `keep_model_order`
    takes the token-stream hooks off, so a reordering method gathers per layer (the comparison for the per-forward
    order; its permutation then counts inside the attention calls, not outside the blocks)."""
    import diffattn
    from diffattn.token_order import remove_token_stream

    from . import step as step_bench

    diffattn.apply(model, "dense" if variant.startswith("dense") else method, **({} if variant.startswith("dense") else options))
    if keep_model_order:
        remove_token_stream(model)
    kinds = [(n, len(getattr(model, n))) for n in BLOCK_LISTS if hasattr(model, n)]
    timer = _TypedAttentionTimer(diffattn.api.installed(model).runtime, kinds)
    diffattn.api.replace_runtime(model, timer)
    blocks = _BlockTimer(model)
    runs = []
    try:
        with torch.no_grad(), step_bench.sdpa_backend("cudnn"):
            for i in range(repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(**inputs, return_dict=False)
                torch.cuda.synchronize()
                el = time.perf_counter() - t0
                per_block, attn = blocks.collect(), timer.collect()
                if i:
                    runs.append((el, per_block, attn))
    finally:
        blocks.remove()
        diffattn.remove(model)
    el, per_block, attn = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    outside = el - sum(sum(v) for v in per_block.values())
    step_full = outside + sum(sum(v) / len(v) * full[n] for n, v in per_block.items())
    attn_full = sum(attn.get(n, 0.0) / len(per_block[n]) * full[n] for n in per_block)
    return {
        "variant": variant, "measured_step_s": el, "measured_attention_s": sum(attn.values()),
        "blocks_timed": {n: len(v) for n, v in per_block.items()}, "blocks_full": full,
        "mean_block_s": {n: sum(v) / len(v) for n, v in per_block.items()},
        "block_s": per_block,
        "attention_per_block_s": {n: attn.get(n, 0.0) / len(per_block[n]) for n in per_block},
        "outside_blocks_s": outside, "step_s": step_full, "attention_s": attn_full,
    }


def step_section(args, report: dict[str, Any], device: str) -> None:
    import diffattn
    from diffattn.adapters import family_of

    from . import step as step_bench
    from .harness import write_json

    model, full = build_reduced(args.model, device, args.layers)
    family = family_of(model).name
    inputs = step_bench.make_inputs(args.model, args.shape, device)
    runtime = diffattn.registry.build_method("rectified")
    s = runtime.settings(family, model)
    entry: dict[str, Any] = {"model": args.model, "shape": "x".join(map(str, args.shape)), "settings": s,
                             "layers_timed": list(args.layers) if args.layers else None}
    report.setdefault("steps", {})[args.model] = entry
    # one forward with dense attention, capturing a layer's q/k/v for the kernel-level analysis
    diffattn.apply(model, "dense")
    cap = _Capture(diffattn.api.installed(model).runtime, args.layer)
    diffattn.api.replace_runtime(model, cap)
    with torch.no_grad(), step_bench.sdpa_backend("cudnn"):
        model(**inputs, return_dict=False)
    diffattn.remove(model)
    call = cap.call
    grid = tuple(int(x) for x in call.grid)
    vis, txt = call.visual_slice(), call.text_slice()
    ek = call.k[:, :, txt] if txt.stop > txt.start else None
    ev = call.v[:, :, txt] if txt.stop > txt.start else None
    if call.key_padding is not None and ek is not None:
        valid = call.key_padding[0, txt]
        ek, ev = ek[:, :, valid], ev[:, :, valid]
    q, k, v = call.q[:, :, vis].contiguous(), call.k[:, :, vis].contiguous(), call.v[:, :, vis].contiguous()
    del cap, call
    entry["layer"] = {"index": args.layer, **layer_analysis(q, k, v, grid, s, timing=True, ek=ek, ev=ev,
                                                            oracle_heads=args.oracle_heads)}
    print(json.dumps(entry["layer"]), flush=True)
    write_json(report, args.json)
    density = entry["layer"]["density"]
    del q, k, v
    torch.cuda.empty_cache()
    results = {}
    results["dense-cudnn"] = scaled_step(model, inputs, "dense-cudnn", "rectified", {}, full, args.repeats)
    write_json(report, args.json)
    decay = entry["layer"]["radial_decay"]
    radial_s = diffattn.registry.build_method("radial", decay_factor=decay).settings(family)
    # sparse variants are timed with every block sparse; their dense warm-up layers are added back from the dense
    # run's per-block time (exact for a full model too, and right for a reduced one, whose blocks are all sparse)
    warm_layers = {"rectified": s["dense_layers"], "radial": radial_s["dense_layers"]}
    warm_steps = {"rectified": s["dense_timesteps"], "radial": radial_s["dense_timesteps"]}
    variants = (("rectified", "rectified", {}, False), ("rectified-per-layer-gathers", "rectified", {}, True),
                ("radial", "radial", {"decay_factor": decay}, False))
    for name, method, opts, keep_order in variants:
        r = scaled_step(model, inputs, name, method, {**opts, "dense_timesteps": 0, "dense_layers": 0}, full,
                        args.repeats, keep_model_order=keep_order)
        first = next(iter(r["mean_block_s"]))  # Wan: blocks; HunyuanVideo: dual-stream blocks come first
        d_blk = results["dense-cudnn"]["mean_block_s"][first] - r["mean_block_s"][first]
        d_att = results["dense-cudnn"]["attention_per_block_s"][first] - r["attention_per_block_s"][first]
        r["dense_layers"] = warm_layers[method]
        r["step_all_sparse_s"], r["attention_all_sparse_s"] = r["step_s"], r["attention_s"]
        r["step_s"] += warm_layers[method] * d_blk
        r["attention_s"] += warm_layers[method] * d_att
        results[name] = r
        write_json(report, args.json)
    entry["results"] = results
    warm = {"dense-cudnn": 0, **{name: warm_steps[method] for name, method, _, _ in variants}}
    d = results["dense-cudnn"]["step_s"]
    entry["projected_s"] = {k: warm[k] * d + (args.steps - warm[k]) * r["step_s"] for k, r in results.items()}
    entry["matched_density"] = density
    print(json.dumps({k: (r["step_s"], r["attention_s"]) for k, r in results.items()}), flush=True)
    del model
    torch.cuda.empty_cache()


def attn_section(args, report: dict[str, Any], device: str) -> None:
    """Kernel-level numbers on random q/k/v at another model's attention shape (text keys with padding)."""
    import diffattn

    from .models import MODELS

    spec = MODELS[args.attn_model]
    cfg = spec["config"]
    h, w, f = args.attn_shape
    t_c, s_c = spec["vae"]
    patch = cfg.get("patch_size", 2)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    grid = ((f - 1) // t_c + 1, h // s_c // patch, w // s_c // patch)
    H, D = cfg["num_attention_heads"], cfg["attention_head_dim"]
    S = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    ek = ev = None
    if args.attn_text:
        ek, ev = (torch.randn(1, H, args.attn_text, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    family = {"HunyuanVideoTransformer3DModel": "hunyuan_video"}.get(spec["class"], "wan")
    s = diffattn.registry.build_method("rectified").settings(family)
    report["attention"] = {"model": args.attn_model, "shape": "x".join(map(str, args.attn_shape)),
                           **layer_analysis(q, k, v, grid, s, timing=True, ek=ek, ev=ev,
                                            oracle_heads=args.oracle_heads)}
    print(json.dumps(report["attention"]), flush=True)


class _StepCapture:
    """Keeps the q/k/v (after RoPE, raster order) of the self-attention calls of chosen layers at chosen denoising
    steps (first CFG pass), delegating every call to the wrapped runtime."""

    def __init__(self, method, steps: set[int], layers: set[int]) -> None:
        self.method, self.steps, self.layers = method, steps, layers
        self.name = getattr(method, "name", "?")
        self.calls: dict[tuple[int, int], Any] = {}

    def attend(self, call):
        ctx = call.context
        step = ctx.step_index if ctx is not None else 0
        if (call.role == "self" and call.layer.index in self.layers and step in self.steps
                and (ctx is None or ctx.pass_index == 0) and (step, call.layer.index) not in self.calls):
            vis = call.visual_slice()
            self.calls[(step, call.layer.index)] = (
                call.q[:, :, vis].detach().clone(), call.k[:, :, vis].detach().clone(),
                call.v[:, :, vis].detach().clone(), tuple(int(x) for x in call.grid), call.scale)
        return self.method.attend(call)


def demo_section(args, report: dict[str, Any], device: str) -> None:
    """Errors vs dense on q/k/v captured from the bundled demo video model (a trained Wan, 5x32x32 tokens) during a
    real generation: several layers and steps, each block size asked, with the block-oracle diagnosis."""
    import diffattn

    from ..demo import DEMO_PROMPTS, demo_model_path
    from ..generate import load_pipeline
    from .harness import write_json

    pipe = load_pipeline(args.demo_model or demo_model_path("video"), dtype="fp32", device=device)
    pipe.set_progress_bar_config(disable=True)
    steps, layers = set(args.demo_capture_steps), set(args.demo_layers)
    diffattn.apply(pipe, "dense")
    cap = _StepCapture(diffattn.api.installed(pipe.transformer).runtime, steps, layers)
    diffattn.api.replace_runtime(pipe, cap)
    gen = torch.Generator(device="cpu").manual_seed(0)
    try:
        with torch.no_grad():
            pipe(DEMO_PROMPTS["video"], num_inference_steps=args.demo_steps, generator=gen, output_type="np")
    finally:
        diffattn.remove(pipe)
    rows = []
    for bs in args.demo_block_sizes:
        s = diffattn.registry.build_method("rectified", block_size=bs).settings("wan", pipe.transformer)
        for (step, layer), (q, k, v, grid, scale) in sorted(cap.calls.items()):
            r = layer_analysis(q, k, v, grid, s, timing=False, scale=scale, oracle_heads=None)
            row = {"block_size": bs, "step": step, "steps": args.demo_steps, "layer": layer, **r}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("block_size", "step", "layer", "density", "err_rectified",
                                                    "err_rectified_no_gapr", "err_topp_plain", "err_radial",
                                                    "radial_density", "unsafe_share_of_dropped")}
                             | {"oracle": row["oracle"]}), flush=True)
    report["demo"] = {"prompt": DEMO_PROMPTS["video"], "steps": args.demo_steps, "rows": rows}
    write_json(report, args.json)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated block counts, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .step import parse_shape

    p = argparse.ArgumentParser(prog="diffattn bench rectified", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan2.1-14b", help="full-step model(s) (diffattn.bench.models), comma-separated, "
                   "or 'none'")
    p.add_argument("--layers", type=_parse_layers, default=None,
                   help="time only the first N blocks of each block list (Wan: N; HunyuanVideo: DUAL,SINGLE) and "
                   "derive the full step from per-block times (see scaled_step)")
    p.add_argument("--shape", type=parse_shape, default=(720, 1280, 81))
    p.add_argument("--layer", type=int, default=10, help="layer whose q/k/v the kernel-level analysis uses")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--attn-model", default=None, help="also: kernel-level numbers at this model's attention shape")
    p.add_argument("--attn-shape", type=parse_shape, default=(720, 1280, 129))
    p.add_argument("--attn-text", type=int, default=100, help="text keys (valid ones) for --attn-model")
    p.add_argument("--demo", action="store_true",
                   help="errors vs dense on q/k/v captured from the demo video model's generation (CPU is fine)")
    p.add_argument("--demo-model", default=None, help="Wan pipeline folder for --demo (default: the bundled one)")
    p.add_argument("--demo-steps", type=int, default=16, help="denoising steps of the --demo generation")
    p.add_argument("--demo-capture-steps", type=_int_list, default=[2, 8, 14])
    p.add_argument("--demo-layers", type=_int_list, default=[1, 3, 5])
    p.add_argument("--demo-block-sizes", type=_int_list, default=[64, 128])
    p.add_argument("--oracle-heads", type=int, default=4,
                   help="heads used for the block-oracle diagnosis at production shapes (0: skip)")
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    from .harness import env_line, write_json

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d")}
    if args.demo:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        report["env"] = env_line() if device == "cuda" else f"cpu, torch {torch.__version__}"
        demo_section(args, report, device)
        if not torch.cuda.is_available() or (args.model == "none" and not args.attn_model):
            return 0
    if not torch.cuda.is_available():
        print("diffattn bench rectified needs a CUDA GPU (except --demo)", file=sys.stderr)
        return 2
    print(env_line(), flush=True)
    report["env"] = env_line()
    try:
        if args.attn_model:
            attn_section(args, report, "cuda")
            write_json(report, args.json)
            torch.cuda.empty_cache()
        if args.model != "none":
            for name in args.model.split(","):
                step_section(argparse.Namespace(**{**vars(args), "model": name}), report, "cuda")
                write_json(report, args.json)
    finally:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`diffattn bench agent`: one UNet step of SD1.5 / SDXL (real configs, random weights, fp16, batch 2 = CFG), dense
vs AgentSD (each schedule stage) vs plain ToMe at the same ratio, and the 50-step projection of the schedule; peak
memory per variant."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from ..kernels.bipartite import ENV_VAR
from .harness import env_line, median_ms, write_json


def unet_config(name: str) -> dict[str, Any]:
    """The real UNet configs (diffusers' SD1.5 / SDXL-base `unet/config.json` fields that shape the model)."""
    if name == "sd15":
        return {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
                "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2}
    if name == "sdxl":
        return {"sample_size": 128, "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
                "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816}
    raise ValueError(f"model must be sd15 or sdxl, got {name!r}")


def _inputs(name: str, size: int, batch: int, device: str) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)
    lat = size // 8
    text = 768 if name == "sd15" else 2048
    out = {"sample": torch.randn(batch, 4, lat, lat, device=device, dtype=torch.float16, generator=g),
           "timestep": torch.full((batch,), 500.0, device=device),
           "encoder_hidden_states": torch.randn(batch, 77, text, device=device, dtype=torch.float16, generator=g)}
    if name == "sdxl":
        out["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, device=device, dtype=torch.float16, generator=g),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=torch.float16)}
    return out


# Kernel name -> what it does, first match wins (cuDNN/cuBLAS/flash/Triton names as the H200 profiler reports them).
_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "mha")),
    ("convolution", ("conv", "winograd", "implicit", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "xmma")),
    ("merge/similarity", ("_best_match", "_assign_slots", "sort", "radix", "scatter", "gather", "index", "argmax",
                          "topk", "cumsum")),
    ("normalization", ("norm", "moments", "fusedparams")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "fill", "reduce", "softmax", "cat")),
)


def kernel_category(name: str) -> str:
    """The bench's bucket for a CUDA kernel name (where the step's device time goes); "other" when none matches."""
    low = name.lower()
    for label, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "other"


# Profiler ranges: the method's phases (`diffattn.methods.agent`) and, set by the bench, every gated `attn1` whole.
RANGES = ("bench::gated attn1", "agent::similarity", "agent::merge", "agent::attention", "agent::unmerge")


def _gated_attn1_ranges(unet, latent_tokens: int, max_downsample: int) -> list[Any]:
    """Hooks that open a profiler range around each `attn1` call at the levels the method patches (the same gate),
    so the profile shows what those layers cost in dense and in agent steps."""
    from torch.profiler import record_function

    from ..kernels.agent import downsample_of

    handles, live = [], {}
    for name, module in unet.named_modules():
        if not name.endswith("attn1"):
            continue

        def enter(mod, args, kwargs, name=name):
            x = args[0] if args else kwargs.get("hidden_states")
            if x is not None and x.dim() == 3 and downsample_of(latent_tokens, x.shape[1]) <= max_downsample:
                live[name] = record_function(RANGES[0])
                live[name].__enter__()

        def leave(mod, args, kwargs, out, name=name):
            rf = live.pop(name, None)
            if rf is not None:
                rf.__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(leave, with_kwargs=True))
    return handles


def _device_us(event) -> float:
    return float(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0) or 0.0)


def _profile(step, unet=None, latent_tokens: int = 0, max_downsample: int = 1) -> dict[str, Any]:
    """Kernels launched by one step, the sum of their device times (ms), that sum by `kernel_category`, and the
    device time under each of `RANGES` (the gated `attn1` layers whole; the agent path's phases). Kernel ms far
    below the step's wall time means the GPU waits for the host (launch-bound)."""
    from torch.profiler import ProfilerActivity, profile

    handles = _gated_attn1_ranges(unet, latent_tokens, max_downsample) if unet is not None else []
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in RANGES]
        by_cat: dict[str, float] = {}
        busy = 0.0
        for e in kernels:
            us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
            busy += us
            cat = kernel_category(e.name)
            by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e3
        ranges: dict[str, float] = {}
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU and e.name in RANGES:
                ranges[e.name] = ranges.get(e.name, 0.0) + _device_us(e) / 1e3
        return {"kernels": len(kernels), "kernel_ms": round(busy / 1e3, 2),
                "kernel_ms_by": {k: round(v, 2) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
                "range_ms": {k: round(ranges[k], 2) for k in RANGES if k in ranges}}
    except Exception as exc:  # the profiler is evidence, not the measurement
        return {"profile_error": repr(exc)[:200]}
    finally:
        for h in handles:
            h.remove()


def _graph_ms(unet, inputs: dict[str, Any], warmup: int, rep: int) -> float | None:
    """The UNet step captured once as a CUDA graph and replayed. The context hook's one host read per forward (the
    timestep value, for the step index) cannot be captured; the bench passes the value it knows instead. The agent
    method runs with `seed=0`, whose partitions are cached on the device after the warm-up forwards."""
    import diffattn.adapters.base as adapter_base

    known = float(inputs["timestep"].flatten()[0])
    real = adapter_base.timestep_value
    adapter_base.timestep_value = lambda t: known if isinstance(t, torch.Tensor) else real(t)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                unet(**inputs, return_dict=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            unet(**inputs, return_dict=False)
        ms = median_ms(graph.replay, warmup=warmup, rep=rep)
        del graph
        return ms
    except Exception as exc:
        print(f"CUDA graph failed: {exc!r}"[:300], flush=True)
        return None
    finally:
        adapter_base.timestep_value = real


EARLY, LATE, TOME = "agent 4x4/0.95 (steps <40%)", "agent 2x2/0.5 (steps >=40%)", "tome 2x2 (agent_ratio 0)"


def project(times: dict[str, float], steps: int, suffix: str = "") -> dict[str, float]:
    """The `steps`-step totals (ms) from one-step times: dense and ToMe every step, the agent schedule upstream's
    (the first stage for the first 40% of the steps, round(0.4 * steps), the second after). `suffix` picks the
    CUDA-graph rows (", CUDA graph"); a total is left out when a step it needs was not measured."""
    switch = round(0.4 * steps)
    out = {}
    if "dense" + suffix in times:
        out["dense"] = steps * times["dense" + suffix]
    if EARLY + suffix in times and LATE + suffix in times:
        out["agent (schedule)"] = switch * times[EARLY + suffix] + (steps - switch) * times[LATE + suffix]
    if TOME + suffix in times:
        out["tome"] = steps * times[TOME + suffix]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffattn bench agent", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="sd15:512,sd15:1024,sdxl:1024",
                        help="model:size[:max_downsample] list (sdxl has no top-level attention: default 2)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=25, help="ms")
    parser.add_argument("--rep", type=int, default=100, help="ms")
    parser.add_argument("--json", default=None, help="written after every row (a killed run keeps what it measured)")
    parser.add_argument("--similarity", default="",
                        help="also time the agent stages with these similarity backends (comma list of triton = the "
                             "fused kernel, blocked = matmuls in fp16 (the default), reference = float32)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step: kernel count, summed device time, by kernel kind, and the device "
                             "time of the gated attn1 layers and of the agent path's phases (where the time goes)")
    parser.add_argument("--graphs", action="store_true",
                        help="also time each variant's step replayed as a CUDA graph (the launch floor removed)")
    parser.add_argument("--graph-max-size", type=int, default=1024, help="CUDA graphs only up to this size")
    parser.add_argument("--sdpa", choices=sorted(SDPA_BACKENDS), default="default",
                        help="pin every SDPA call (stock and agent) to one backend; math = the materialised softmax of "
                             "upstream's CompVis code without xformers (default: PyTorch's choice, flash here)")
    parser.add_argument("--quality", default=None, metavar="MODELS",
                        help="instead of timing: PSNR/SSIM against dense on the demo models (comma list of unet, "
                             "image), one row per (prompt, seed) as it is made; see quality()")
    parser.add_argument("--seeds", default="0,1,2,3", help="--quality: comma-separated seeds")
    parser.add_argument("--prompts", nargs="+", default=None, help="--quality: prompts (default: QUALITY_PROMPTS, 3 per model)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="--quality: pipeline dtype")
    parser.add_argument("--device", default=None, help="--quality: default cuda when available, else cpu")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="--quality: seconds per model; pairs not started by then are skipped (and reported)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.quality is not None:
        kinds = [k.strip() for k in args.quality.split(",") if k.strip()]
        if not kinds or any(k not in QUALITY_VARIANTS for k in kinds):
            parser.error(f"--quality takes a comma list among {', '.join(QUALITY_VARIANTS)}, got {args.quality!r}")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--seeds must be comma-separated ints, got {args.seeds!r}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        report = quality(kinds, seeds, args.prompts, args.dtype, device, args.time_limit, args.json)
        return 0 if all(r.get("pairs") for r in report["models"].values()) else 1
    with _sdpa_backend(args.sdpa):
        return _run(args)


# The variants the quality mode compares with dense, per demo model (`seed=0`: the same destinations every run).
QUALITY_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {"agent (upstream schedule)": {"seed": 0},
             "tome 2x2 (agent_ratio 0, no schedule)": {"seed": 0, "agent_ratio": 0.0, "sx": 2, "sy": 2,
                                                        "schedule": "none"}},
    "image": {"agent (64 pooled agents)": {}, "agent (256 pooled agents)": {"agent_num": 256},
              "agent (64, paper scale d^-0.5, no V shortcut)": {"k_scale2": 1.0, "k_shortcut": 0.0}},
}
# Default prompts: what each model was trained on (the UNet model: 1-3 shapes per image; the image model: one).
QUALITY_PROMPTS = {
    "unet": ["a red circle on the left and a yellow square at the top right on a blue background",
             "a green circle at the top and a red square at the bottom left and a yellow triangle on the right on a "
             "gray background",
             "a white triangle in the center and an orange square on the left on a purple background"],
    "image": ["a yellow square on the left on a green background", "a red circle on the right on a blue background",
              "a white triangle at the top on a purple background"],
}


def quality(kinds: list[str], seeds: list[int], prompts: list[str] | None, dtype: str, device: str,
            time_limit: float | None = None, json_path: str | None = None) -> dict[str, Any]:
    """PSNR/SSIM of each `QUALITY_VARIANTS` entry against dense on the demo models, at each pipeline's own defaults
    (steps, size, guidance). What `diffattn bench quality --methods agent` computes, without its energy probe and
    warm-ups, and streamed: each (prompt, seed) prints its row when made and the JSON is rewritten, so a run stopped
    by a time limit keeps every finished pair; `time_limit` (seconds per model) skips the pairs not started in time."""
    import statistics
    import time

    import numpy as np

    from ..demo import demo_model_path
    from ..generate import load_pipeline, run_generation
    from .metrics import psnr, ssim

    report: dict[str, Any] = {"env": env_line(device) if device.startswith("cuda") else f"device: {device}",
                              "dtype": dtype, "seeds": seeds, "models": {}}
    for kind in kinds:
        start = time.perf_counter()
        pipe = load_pipeline(demo_model_path(kind), dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        entry: dict[str, Any] = {"prompts": prompts or QUALITY_PROMPTS[kind], "pairs": [], "skipped": 0}
        report["models"][kind] = entry

        def image(method, options, prompt, seed, pipe=pipe):
            result, seconds = run_generation(pipe, prompt, method=method, options=options, seed=seed, output_type="np")
            return np.clip(np.asarray(result.images[0], dtype=np.float32), 0.0, 1.0), seconds

        for prompt in entry["prompts"]:
            for seed in seeds:
                if time_limit is not None and time.perf_counter() - start > time_limit:
                    entry["skipped"] += 1
                    continue
                ref, ref_s = image(None, {}, prompt, seed)
                pair = {"prompt": prompt, "seed": seed, "dense_s": round(ref_s, 3)}
                for label, options in QUALITY_VARIANTS[kind].items():
                    out, sec = image("agent", options, prompt, seed)
                    pair[label] = {"psnr": float(psnr(out, ref)), "ssim": float(ssim(out, ref)), "s": round(sec, 3)}
                pair["elapsed_s"] = round(time.perf_counter() - start, 1)
                entry["pairs"].append(pair)
                print(json.dumps({"model": kind, **pair}), flush=True)
                write_json(report, json_path)
        entry["steps"] = getattr(pipe, "_num_timesteps", None)
        entry["summary"] = {}
        for label in QUALITY_VARIANTS[kind]:
            vals = [p[label] for p in entry["pairs"]]
            if vals:
                entry["summary"][label] = {
                    "psnr_mean": statistics.fmean(v["psnr"] for v in vals), "psnr_min": min(v["psnr"] for v in vals),
                    "ssim_mean": statistics.fmean(v["ssim"] for v in vals), "ssim_min": min(v["ssim"] for v in vals),
                    "n": len(vals)}
        print(f"{kind}: {len(entry['pairs'])} pairs ({entry['skipped']} skipped), {entry['steps']} steps, {dtype}")
        for label, m in entry["summary"].items():
            print(f"  {label:40} PSNR {m['psnr_mean']:.2f} / {m['psnr_min']:.2f} dB  SSIM {m['ssim_mean']:.4f} / "
                  f"{m['ssim_min']:.4f}  (mean / min, n={m['n']})", flush=True)
        write_json(report, json_path)
    return report


SDPA_BACKENDS = {"default": None, "math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}


def _sdpa_backend(name: str):
    """`torch.nn.attention.sdpa_kernel` pinned to `name` (a key of `SDPA_BACKENDS`); a no-op context for "default"."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = SDPA_BACKENDS[name]
    return nullcontext() if member is None else sdpa_kernel(getattr(SDPBackend, member))


def _run(args: argparse.Namespace) -> int:
    import diffattn
    from diffusers import UNet2DConditionModel

    print(env_line(), flush=True)
    dev = "cuda"
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    report = {"env": env_line(), "args": vars(args), "rows": rows}
    for case in args.cases.split(","):
        parts = case.split(":")
        name, size = parts[0], int(parts[1])
        max_ds = int(parts[2]) if len(parts) > 2 else (1 if name == "sd15" else 2)
        if name not in models:
            models.clear()
            torch.cuda.empty_cache()
            with torch.device(dev):
                models[name] = UNet2DConditionModel(**unet_config(name)).to(torch.float16).eval()
        unet = models[name]
        inputs = _inputs(name, size, 2, dev)
        latent_tokens = (size // 8) ** 2
        early = {"ratio": args.ratio, "agent_ratio": 0.95, "sx": 4, "sy": 4, "schedule": "none", "max_downsample": max_ds,
                 "seed": 0}
        late = dict(early, sx=2, sy=2, agent_ratio=0.5)
        variants = {"dense": None, EARLY: early, LATE: late, TOME: dict(late, agent_ratio=0.0)}
        if args.similarity:
            for backend in args.similarity.split(","):
                variants.update({f"{k}, similarity={backend}": v for k, v in list(variants.items())[1:3]})
        times: dict[str, float] = {}
        base = {"model": name, "size": size, "max_downsample": max_ds, "sdpa": args.sdpa}
        for label, opts in variants.items():
            if ", similarity=" in label:
                os.environ[ENV_VAR] = label.rsplit("=", 1)[1]
            else:
                os.environ.pop(ENV_VAR, None)
            diffattn.remove(unet)
            if opts is not None:
                diffattn.apply(unet, "agent", **opts)

            def step():
                with torch.no_grad():
                    unet(**inputs, return_dict=False)

            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = median_ms(step, warmup=args.warmup, rep=args.rep)
            peak = torch.cuda.max_memory_allocated()
            times[label] = ms
            row = {**base, "variant": label, "ms": round(ms, 2), "peak_gib": round(peak / 2**30, 2),
                   "activation_gib": round((peak - resident) / 2**30, 2)}
            if args.profile:
                row.update(_profile(step, unet, latent_tokens, max_ds))
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(report, args.json)
            if args.graphs and size <= args.graph_max_size and ", similarity=" not in label:
                torch.cuda.reset_peak_memory_stats()
                graphed = _graph_ms(unet, inputs, args.warmup, args.rep)
                if graphed is not None:
                    peak = torch.cuda.max_memory_allocated()
                    times[f"{label}, CUDA graph"] = graphed
                    rows.append({**base, "variant": f"{label}, CUDA graph", "ms": round(graphed, 2),
                                 "peak_gib": round(peak / 2**30, 2),
                                 "activation_gib": round((peak - resident) / 2**30, 2)})
                    print(json.dumps(rows[-1]), flush=True)
                    write_json(report, args.json)
        os.environ.pop(ENV_VAR, None)
        diffattn.remove(unet)
        for suffix in ("", ", CUDA graph"):
            proj = project(times, args.steps, suffix)
            for label, total in proj.items():
                rows.append({**base, "variant": f"{args.steps}-step {label}{suffix}", "ms": round(total, 1),
                             "speedup": round(proj["dense"] / total, 3) if "dense" in proj else None})
        write_json(report, args.json)
    print(f"{'model':6} {'size':>5} {'ds':>2}  {'variant':44} {'ms':>9} {'GiB / x':>8} {'act GiB':>7} {'kernels':>7} "
          f"{'kern ms':>8}  {'gated attn1 ms':>14}")
    for r in rows:
        extra = f"{r['peak_gib']:.2f}" if "peak_gib" in r else (f"{r['speedup']:.2f}x" if r.get("speedup") else "")
        act = f"{r['activation_gib']:.2f}" if "activation_gib" in r else ""
        prof = f"{r['kernels']:>7} {r['kernel_ms']:>8.2f}" if "kernels" in r else ""
        gated = r.get("range_ms", {}).get(RANGES[0])
        gated = f"{gated:>14.2f}" if gated is not None else ""
        print(f"{r['model']:6} {r['size']:>5} {r['max_downsample']:>2}  {r['variant']:44} {r['ms']:>9.2f} {extra:>8} "
              f"{act:>7} {prof:>16}  {gated}")
    write_json(report, args.json)
    if args.json is None:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

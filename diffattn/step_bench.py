"""`diffattn bench step`: one denoising step of a full-size video transformer (real config, random weights, bf16)
with dense attention (cuDNN SDPA and SDPA's flash backend, FA2-class) and with a sparse method, on a GPU.

Reports step time, the attention share of it (CUDA events around every self/joint attention call), the 50-step
projection with the method's dense warm-up, and the attention-output error of the method against dense on the same
inputs, per layer type. Random weights give near-uniform attention maps, so the errors are an upper-bound style
sanity check, not a quality claim (quality is measured on trained models by `diffattn bench quality`).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("diffattn")

# Real configurations (Diffusers' config.json of the released checkpoints).
MODELS: dict[str, dict[str, Any]] = {
    "wan2.1-14b": {
        "class": "WanTransformer3DModel",
        "config": dict(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
        ),
        "vae": (4, 8),  # temporal, spatial compression
        "text_len": 512,
        "text_dim": 4096,
    },
    "hunyuan-video": {
        "class": "HunyuanVideoTransformer3DModel",
        "config": dict(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
            num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
            rope_theta=256.0, rope_axes_dim=(16, 56, 56),
        ),
        "vae": (4, 8),
        "text_len": 256,
        "text_dim": 4096,
    },
}


# Wan2.1-T2V-1.3B differs from 14B only in width, depth and FFN size.
MODELS["wan2.1-1.3b"] = {
    **MODELS["wan2.1-14b"],
    "config": {**MODELS["wan2.1-14b"]["config"], "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
}


def parse_shape(text: str) -> tuple[int, int, int]:
    """`HxWxF` in pixels and frames, e.g. 768x1280x69."""
    try:
        h, w, f = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be HEIGHTxWIDTHxFRAMES, got {text!r}") from None
    return h, w, f


def build_model(name: str, device: str) -> torch.nn.Module:
    """The model with random weights, built directly on `device` in bf16 (no fp32 copy)."""
    import diffusers

    spec = MODELS[name]
    cls = getattr(diffusers, spec["class"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(**spec["config"])
    finally:
        torch.set_default_dtype(previous)
    if hasattr(model, "rope") and spec["class"] == "WanTransformer3DModel":
        cfg = spec["config"]  # rebuild the RoPE tables in float32, as a normally loaded model has them
        with torch.device(device):
            model.rope = type(model.rope)(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"])
    return model.eval().requires_grad_(False)


def make_inputs(name: str, shape: tuple[int, int, int], device: str, seed: int = 0) -> dict[str, Any]:
    spec = MODELS[name]
    h, w, f = shape
    t_c, s_c = spec["vae"]
    gen = torch.Generator(device=device).manual_seed(seed)
    frames = (f - 1) // t_c + 1
    latent = torch.randn(1, 16, frames, h // s_c, w // s_c, generator=gen, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, spec["text_len"], spec["text_dim"], generator=gen, device=device, dtype=torch.bfloat16)
    inputs: dict[str, Any] = {"hidden_states": latent, "encoder_hidden_states": text}
    if spec["class"] == "WanTransformer3DModel":
        inputs["timestep"] = torch.tensor([700.0], device=device)
    else:
        mask = torch.zeros(1, spec["text_len"], dtype=torch.long, device=device)
        mask[:, :100] = 1  # a typical prompt: ~100 real tokens, the rest padding
        inputs.update(
            timestep=torch.tensor([700.0], device=device),
            encoder_attention_mask=mask,
            pooled_projections=torch.randn(1, 768, generator=gen, device=device, dtype=torch.bfloat16),
            guidance=torch.tensor([6000.0], device=device, dtype=torch.bfloat16),
        )
    return inputs


class AttentionTimer:
    """Wraps a method's `attend` with CUDA events (no synchronisation inside the step)."""

    def __init__(self, method) -> None:
        self.method = method
        self.events: list[tuple[str, Any, Any]] = []
        self.name = getattr(method, "name", "?")

    def attend(self, call):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.method.attend(call)
        end.record()
        self.events.append((call.role, start, end))
        return out

    def collect(self) -> dict[str, float]:
        torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for role, start, end in self.events:
            totals[role] = totals.get(role, 0.0) + start.elapsed_time(end) / 1e3
        self.events.clear()
        return totals


class ErrorProbe:
    """Runs the method and dense on every self/joint call; records relative errors per layer type."""

    def __init__(self, method, layer_type) -> None:
        self.method = method
        self.layer_type = layer_type
        self.errors: dict[str, list[float]] = {}
        self.name = getattr(method, "name", "?")

    def attend(self, call):
        from .methods.joint import dense_attention

        out = self.method.attend(call)
        if call.role in ("self", "joint"):
            ref = dense_attention(call).float()
            parts = {"video": call.visual_slice()}
            if call.role == "joint" and call.text_len:
                parts["text"] = call.text_slice()
            for part, sl in parts.items():
                o, r = out[:, :, sl].float(), ref[:, :, sl]
                err = ((o - r).norm() / r.norm().clamp_min(1e-12)).item()
                self.errors.setdefault(f"{self.layer_type(call)} {part} queries", []).append(err)
        return out


def _layer_type(family: str, num_dual: int):
    def classify(call) -> str:
        if family == "hunyuan_video":
            return "dual-stream" if call.layer.index < num_dual else "single-stream"
        return "self-attention"

    return classify


@contextmanager
def sdpa_backend(name: str):
    """Prefer cuDNN (or flash) for every SDPA call, falling back where a call's mask rules it out (HunyuanVideo's
    token refiner and padded joint attention: flash takes no mask, so mem-efficient runs there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    }[name]
    with sdpa_kernel(order + [SDPBackend.MATH], set_priority=True):
        yield


@dataclass
class StepResult:
    variant: str
    step_s: float
    attention_s: float
    cross_s: float


def time_step(model, inputs, variant: str, repeats: int, method: str, options: dict) -> StepResult:
    import diffattn

    backend = "flash" if variant == "dense-flash" else "cudnn"
    if variant.startswith("dense"):
        diffattn.apply(model, "dense")
    else:
        diffattn.apply(model, method, **options)
    state = diffattn.api.installed(model)
    timer = AttentionTimer(state.runtime)
    for proc in model.attn_processors.values():
        if hasattr(proc, "method"):
            proc.method = timer
    steps, attn, cross = [], [], []
    try:
        with torch.no_grad(), sdpa_backend(backend):
            for i in range(repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(**inputs, return_dict=False)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                totals = timer.collect()
                if i == 0:
                    continue  # warm-up: compilation, mask and index building
                steps.append(elapsed)
                attn.append(totals.get("self", 0.0) + totals.get("joint", 0.0))
                cross.append(totals.get("cross", 0.0) + totals.get("cross_image", 0.0))
    finally:
        diffattn.remove(model)
    return StepResult(variant, statistics.median(steps), statistics.median(attn), statistics.median(cross))


def measure_errors(model, inputs, family: str, method: str, options: dict) -> dict[str, float]:
    import diffattn

    diffattn.apply(model, method, **options)
    state = diffattn.api.installed(model)
    num_dual = len(getattr(model, "transformer_blocks", []) or [])
    probe = ErrorProbe(state.runtime, _layer_type(family, num_dual))
    for proc in model.attn_processors.values():
        if hasattr(proc, "method"):
            proc.method = probe
    try:
        with torch.no_grad(), sdpa_backend("cudnn"):
            model(**inputs, return_dict=False)
    finally:
        diffattn.remove(model)
    return {k: statistics.mean(v) for k, v in probe.errors.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffattn
    from diffattn.adapters import family_of

    model = build_model(args.model, "cuda")
    family = family_of(model).name
    spec = diffattn.registry.get_method(args.method)
    options = dict(args.opt)
    full = spec.config_cls.from_options(**options)
    runtime = spec.build(full)
    settings = runtime.settings(family) if hasattr(runtime, "settings") else {}
    dense_steps = settings.get("dense_timesteps", 0)
    sparse_options = {**options, "dense_timesteps": 0}  # a bare forward is step 0: measure a sparse step
    report: dict[str, Any] = {
        "model": args.model, "method": args.method, "options": options, "settings": settings,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "shapes": [],
        "steps": args.steps,
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    for shape in args.shape:
        inputs = make_inputs(args.model, shape, "cuda")
        grid = diffattn.adapters.FAMILIES[family].read_inputs(model, inputs).grid
        entry: dict[str, Any] = {"shape": "x".join(map(str, shape)), "grid": list(grid), "tokens": grid.num_tokens}
        results = {}
        for variant in ("dense-cudnn", "dense-flash", args.method):
            results[variant] = time_step(model, inputs, variant, args.repeats, args.method, sparse_options)
            logger.info("%s %s: %.3f s", entry["shape"], variant, results[variant].step_s)
        entry["results"] = {k: vars(v) for k, v in results.items()}
        if hasattr(runtime, "mask_for"):
            mask = runtime.mask_for(grid.frames, grid.tokens_per_frame, settings, torch.device("cpu"))
            entry["mask_density"] = mask.float().mean().item()
        d, fa, sp = results["dense-cudnn"], results["dense-flash"], results[args.method]
        n = args.steps
        entry["projected"] = {
            "dense-cudnn": n * d.step_s,
            "dense-flash": n * fa.step_s,
            args.method: dense_steps * d.step_s + (n - dense_steps) * sp.step_s,
        }
        entry["errors"] = measure_errors(model, inputs, family, args.method, sparse_options)
        report["shapes"].append(entry)
        del inputs
        torch.cuda.empty_cache()
    return report


def render(report: dict[str, Any]) -> str:
    m = report["method"]
    lines = [
        f"{report['model']}, {m} {report['settings']}; {report['device']}, torch {report['torch']}, "
        f"triton {report.get('triton', '?')}, {report['date']}",
        "",
        f"| shape (tokens) | mask density | variant | step s | self-attn s | cross-attn s | projected "
        f"{report['steps']}-step s | speed-up vs cuDNN | vs flash |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["shapes"]:
        p = e["projected"]
        for variant, r in e["results"].items():
            proj = p[variant]
            lines.append(
                f"| {e['shape']} ({e['tokens']:,}) | {e.get('mask_density', 1.0):.3f} | {variant} | {r['step_s']:.2f} | "
                f"{r['attention_s']:.2f} | {r['cross_s']:.3f} | {proj:.0f} | {p['dense-cudnn'] / proj:.2f}x | "
                f"{p['dense-flash'] / proj:.2f}x |"
            )
    lines.append("")
    lines.append("| shape | layer type | relative error of attention output vs dense |")
    lines.append("|---|---|---|")
    for e in report["shapes"]:
        for k, v in e["errors"].items():
            lines.append(f"| {e['shape']} | {k} | {v:.3e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffattn bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="wan2.1-14b")
    parser.add_argument("--shape", type=parse_shape, action="append", required=True, help="HxWxF, repeatable")
    parser.add_argument("--method", default="radial")
    parser.add_argument(
        "--opt", type=lambda s: tuple(s.split("=", 1)), action="append", default=[],
        help="method option key=value (parsed by the method's config)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per variant (after one warm-up)")
    parser.add_argument("--steps", type=int, default=50, help="steps of the projected generation")
    parser.add_argument("--json", help="write the full report here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("diffattn bench step needs a CUDA GPU", file=sys.stderr)
        return 2
    import diffattn

    cfg_cls = diffattn.registry.get_method(args.method).config_cls
    args.opt = [(k, cfg_cls.parse_option(k, v)) for k, v in args.opt]
    logging.basicConfig(level=logging.INFO)
    report = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

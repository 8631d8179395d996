"""`diffattn bench dispatch`: one denoising step of a full-size video transformer with a method installed through
diffattn's adapter processors and through the Diffusers dispatcher (the stock processors calling the
`diffattn_<method>` backend): step time of both routes, and how far their outputs differ (they run the same kernels
on the same q, k, v, so they should be equal). Reuses `diffattn.bench.step`'s model builder, inputs and SDPA settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from . import step as step_bench
from .harness import sync


def time_route(model, inputs, route: str, method: str, options: dict, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Step times (after one warm-up forward) and the last output of `method` installed `via=route`."""
    import diffattn

    diffattn.apply(model, method, via=route, **options)
    device = inputs["hidden_states"].device
    times, out = [], None
    try:
        with torch.no_grad(), step_bench.sdpa_backend("cudnn"):
            for i in range(repeats + 1):
                sync(device)
                t0 = time.perf_counter()
                out = model(**inputs, return_dict=False)[0]
                sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
    finally:
        diffattn.remove(model)
    return times, out


def run(args: argparse.Namespace, device: str = "cuda") -> dict[str, Any]:
    options = step_bench.method_options(args.method, step_bench.parse_variant(args.method, args.options or ""))
    model = step_bench.build_model(args.model, device)
    inputs = step_bench.make_inputs(args.model, args.shape, device)
    report: dict[str, Any] = {
        "model": args.model, "shape": list(args.shape), "method": args.method, "options": options,
        "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "routes": {},
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    outputs = {}
    for route in args.routes.split(","):
        times, out = time_route(model, inputs, route, args.method, options, args.repeats)
        outputs[route] = out.float()
        report["routes"][route] = {"step_s": statistics.median(times), "times_s": times}
    if len(outputs) == 2:
        a, b = outputs.values()
        report["max_abs_diff"] = float((a - b).abs().max())
        report["rel_l2_diff"] = float((a - b).norm() / a.norm().clamp_min(1e-12))
        report["identical"] = bool(torch.equal(a, b))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']} {'x'.join(map(str, report['shape']))}, {report['method']} {report['options']}, "
        f"{report['device']}, torch {report['torch']}, triton {report.get('triton', '-')}, {report['date']}",
        "| route | step (s, median) |",
        "|---|---|",
    ]
    for route, r in report["routes"].items():
        lines.append(f"| {route} | {r['step_s']:.3f} |")
    if "max_abs_diff" in report:
        lines.append(
            f"outputs: identical={report['identical']}, max |diff| {report['max_abs_diff']:.3g}, "
            f"relative L2 {report['rel_l2_diff']:.3g}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn bench dispatch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(step_bench.MODELS), default="wan2.1-14b")
    parser.add_argument("--shape", type=step_bench.parse_shape, default=(720, 1280, 81), help="HxWxF")
    parser.add_argument("--method", default="radial")
    parser.add_argument(
        "--options", default="", help="method options, space-separated key=value (as bench step --variant)"
    )
    parser.add_argument("--routes", default="adapter,dispatcher", help="comma-separated: adapter, dispatcher")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per route after one warm-up")
    parser.add_argument("--json", help="write the report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("diffattn bench dispatch needs a CUDA GPU")
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one harness every benchmark uses: GPU timing, the device/version header, and the JSON writers.

Timing is the median of `triton.testing.do_bench` after a warm-up call (what BENCHMARKS.md reports); the header
names the device, the library versions and the date, so every table says where it was measured.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["device_name", "env_line", "installed", "median_ms", "versions", "write_json", "write_json_lines"]


GIB = 2**30


def gib(n: float | None) -> str:
    """Bytes as GiB for report tables ('—' when not measured)."""
    return "—" if n is None else f"{n / GIB:.2f}"


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall-clock timings cover it."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], *, warmup: int, rep: int, grad_to_none: list[torch.Tensor] | None = None,
              warm_call: bool = True) -> float:
    """Median milliseconds of `fn` (`triton.testing.do_bench`, `warmup` and `rep` in ms), after one synchronised
    warm-up call (compilation, autotuning) unless `warm_call` is False."""
    import triton

    if warm_call:
        fn()
        torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def installed(module: str) -> bool:
    """Whether `module` can be imported (checked without importing it): for preflight checks before long builds."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def device_name(device: str | torch.device = "cuda") -> str:
    """The GPU's name, or the CPU's description."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def versions(device: str | torch.device | None = None) -> dict[str, str]:
    """diffattn, torch, CUDA and the optional libraries' versions (those installed), and the device when given."""
    from .. import __version__

    out = {"diffattn": __version__, "torch": torch.__version__}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    for name in ("triton", "diffusers", "transformers", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    if device is not None:
        out["device"] = device_name(device)
    return out


def env_line(device: str | torch.device = "cuda") -> str:
    """One header line: device; torch; triton; CUDA; python; date."""
    v = versions()
    return (f"device: {device_name(device)}; torch {v['torch']}; triton {v.get('triton', 'n/a')}; "
            f"CUDA {v.get('cuda')}; python {platform.python_version()}; date {datetime.date.today().isoformat()}")


def write_json(report: Any, path: str | Path | None, *, indent: int = 2) -> None:
    """Write `report` as JSON (parent folders created); a no-op without a path. Benchmarks call it as the report
    grows, so a crash or a kill still leaves what was measured."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=indent))


def write_json_lines(rows: Iterable[dict[str, Any]], path: str | Path | None) -> None:
    """One JSON object per line (the kernel benchmarks' row files); a no-op without a path."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))

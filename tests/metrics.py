"""Error metrics and result records shared by the kernel tests (one definition, so every test measures alike)."""

from __future__ import annotations

import json
import os

import torch


def rel_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative Frobenius error of `result` against `reference`, in float64; a non-finite result fails outright."""
    a, b = result.detach().double().cpu(), reference.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def record(**row) -> None:
    """Print a measured row (GPU test logs are read for BENCHMARKS) and append it to $DIFFATTN_TEST_OUT if set."""
    print("RESULT", json.dumps(row), flush=True)
    path = os.environ.get("DIFFATTN_TEST_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

"""Running a Triton test file on the CPU: a fresh process with TRITON_INTERPRET=1 (the interpreter must be chosen
before triton is imported, so it cannot be switched on inside this pytest process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_under_interpreter(test_file: str, *, timeout: int = 900, allow_skips: bool = False) -> str:
    """Run `tests/<test_file>` under the Triton interpreter and assert it passed (and, unless `allow_skips`, that
    nothing was skipped); returns its output."""
    path = Path(__file__).with_name(test_file)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(path)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout, r.stdout[-2000:]
    if not allow_skips:
        assert "skipped" not in r.stdout.strip().split("\n")[-1], r.stdout[-2000:]
    return r.stdout


# ---- the header every Triton test file shares -------------------------------------------------------------------
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device_and_mark(runner: str):
    """(device, pytest mark) for a Triton test file: CUDA when there is a GPU, else CPU under TRITON_INTERPRET=1
    (`runner` names the test file that re-runs this one in a subprocess); skipped otherwise."""
    import pytest
    import torch

    cuda = torch.cuda.is_available()
    mark = pytest.mark.skipif(not (cuda or INTERP), reason=f"needs CUDA, or TRITON_INTERPRET=1 ({runner} runs this file so)")
    return ("cuda" if cuda and not INTERP else "cpu"), mark


def worker_device_and_env(interp_env: dict | None = None) -> tuple[str, dict]:
    """(device, environment) for a subprocess worker that runs Triton kernels: compiled on CUDA where there is a
    GPU (the interpreter would test nothing the GPU run does not, and Triton 3.6's interpreter failed on the GPU
    machine with a numpy TypeError, see tests/test_neighborhood_triton.py), else the CPU interpreter.

    On CUDA `TRITON_F32_DEFAULT=ieee` makes float32 `tl.dot` exact fp32 (not TF32), so the fp32 tolerances of
    interpreter tests hold unchanged; `DIFFATTN_TEST_INTERPRET=1` forces the interpreter even with a GPU."""
    import torch

    env = dict(os.environ, **(interp_env or {}))
    if torch.cuda.is_available() and os.environ.get("DIFFATTN_TEST_INTERPRET", "0") in ("", "0"):
        env.pop("TRITON_INTERPRET", None)
        env["TRITON_F32_DEFAULT"] = "ieee"
        return "cuda", env
    env["TRITON_INTERPRET"] = "1"
    return "cpu", env

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

"""The `diffattn` console script, run as a user would (a subprocess of the installed entry point)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from diffattn.cli import NOT_YET, main


def _run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("diffattn")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "diffattn.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_methods_lists_dense_with_families():
    res = _run("methods")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("dense:")
    assert "families: wan, hunyuan_video, cogvideox, flux, sd3, unet" in res.stdout


def test_methods_all_marks_unavailable_ones(capsys):
    assert main(["methods", "--all"]) == 0
    out = capsys.readouterr().out
    for name in ("radial", "gna", "softpag"):
        assert f"\n{name}:" in out


@pytest.mark.parametrize("command", sorted(NOT_YET))
def test_unavailable_commands_say_so(command, capsys):
    assert main([command]) == 2
    assert "not available yet" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage():
    res = _run("methods", "--bogus")
    assert res.returncode == 2
    assert "unrecognized arguments: --bogus" in res.stderr


def test_mask_radial_writes_png_and_density(tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["mask", "radial", "--frames", "6", "--tokens-per-frame", "300", "--block-size", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "density: " in text and "speedup_upper_bound" in text
    from PIL import Image

    with Image.open(out) as img:
        assert img.size[0] > 64 and img.size[1] > 64


def test_mask_bad_geometry_is_one_line_error(tmp_path, capsys):
    assert main(["mask", "radial", "--frames", "0", "--tokens-per-frame", "300", "--out", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "num_frames" in err and err.count("\n") == 1

"""The `diffattn` console script, run as a user would (a subprocess of the installed entry point)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from diffattn.cli import main


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


def test_render_highres_on_a_tiny_wan_folder(tmp_path, capsys):
    import json

    import imageio.v3 as iio

    import tiny_pipelines as tp

    model = tmp_path / "wan"
    tp.build_tiny_wan_pipeline(str(model))
    out = tmp_path / "clip.mp4"
    args = ["render", "--highres", "--model", str(model), "--prompt", "a red circle moving left", "--height", "64",
            "--width", "96", "--frames", "5", "--base-height", "32", "--base-width", "48", "--steps", "4",
            "--max-sequence-length", "16", "--dtype", "fp32", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    frames = iio.imread(out)
    assert frames.shape[0] == 5 and frames.shape[1:3] == (64, 96)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["height"] == 64 and meta["cache_steps"] == 2 and meta["seconds"] > 0


def test_render_errors_are_one_line(tmp_path, capsys):
    assert main(["render", "--highres", "--model", str(tmp_path / "missing" / "x"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["render", "--long", "--model", "x", "--prompt", "a"]) == 2
    assert "not available yet" in capsys.readouterr().err


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    import tiny_pipelines as tp

    path = tmp_path_factory.mktemp("wan")
    tp.build_tiny_wan_pipeline(str(path))
    return str(path)


def _gen(folder, out, *extra):
    return ["generate", "--model", folder, "--prompt", "a red circle moving left", "--negative-prompt", "blue",
            "--steps", "3", "--height", "64", "--width", "64", "--frames", "9", "--max-sequence-length", "16",
            "--device", "cpu", "--out", str(out), *extra]


def test_generate_video_with_a_method_and_sidecar(wan_folder, tmp_path, capsys):
    import json

    import imageio.v3 as iio

    out = tmp_path / "clip.mp4"
    code = main(_gen(wan_folder, out, "--attn", "radial", "--attn-opt", "block_size=16", "--attn-opt", "dense_timesteps=1",
                     "--attn-opt", "dense_layers=0"))
    assert code == 0, capsys.readouterr().err
    assert iio.imread(out).shape == (9, 64, 64, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["attn"] == "radial" and meta["attn_options"] == {"block_size": 16, "dense_timesteps": 1, "dense_layers": 0}
    assert meta["output"] == {"kind": "video", "frames": 9, "size": [64, 64]} and meta["seconds"] > 0
    assert meta["diffusers"] and meta["dtype"] == "fp32"
    gif = tmp_path / "clip.gif"
    assert main(_gen(wan_folder, gif)) == 0
    assert iio.imread(gif).shape[0] == 9


def test_generate_image_pipeline_writes_png(tmp_path, capsys):
    import tiny_image_pipelines as tip
    from PIL import Image

    folder = tmp_path / "sd3"
    tip.build_tiny_sd3_pipeline(str(folder))
    out = tmp_path / "img.png"
    args = ["generate", "--model", str(folder), "--prompt", "a red circle", "--steps", "2", "--height", "32",
            "--width", "32", "--attn", "softpag", "--attn-opt", "heads=L1H2,L0H1", "--attn-opt", "u=0.5",
            "--device", "cpu", "--out", str(out), "--frames", "5"]
    assert main(args) == 0, capsys.readouterr().err
    with Image.open(out) as img:
        assert img.size == (32, 32)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--attn", "radial", "--attn-opt", "decay_factor=-1"], "'decay_factor'"),
        (["--attn", "radial", "--attn-opt", "nope=1"], "unknown option 'nope'"),
        (["--attn", "nope"], "unknown method 'nope'"),
        (["--attn-opt", "u=1"], "--attn-opt needs --attn"),
    ],
)
def test_generate_bad_options_are_one_line(wan_folder, tmp_path, capsys, extra, message):
    assert main(_gen(wan_folder, tmp_path / "x.mp4", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_generate_model_errors(wan_folder, tmp_path, capsys):
    assert main(["generate", "--prompt", "a"]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing" / "m"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_gen(wan_folder, tmp_path / "x.png")) == 2
    assert "this pipeline makes video" in capsys.readouterr().err
    import tiny_image_pipelines as tip

    folder = tmp_path / "sd3"
    tip.build_tiny_sd3_pipeline(str(folder))
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--attn", "radial", "--device", "cpu"]) == 2
    assert "does not support SD3Transformer2DModel" in capsys.readouterr().err

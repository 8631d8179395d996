"""The `diffattn` console script: every subcommand on tiny local models, checking what it writes and prints, and
every user error as one line on stderr with exit status 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from diffattn.cli import main

PROMPT = "a red circle moving left"


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("diffattn")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "diffattn.cli", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def _one_line_error(capsys, *words: str) -> str:
    """The error is one `diffattn ...: message` line, the last on stderr (model-loading bars may come before it)."""
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("diffattn")]
    assert len(ours) == 1 and err.rstrip("\n").endswith(ours[0]) and "Traceback" not in err, err
    for word in words:
        assert word in ours[0], err
    return ours[0]


def _printed(text: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}: (.*)$", text, re.MULTILINE)
    assert match, f"{key} not printed in:\n{text}"
    return match.group(1)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    import tiny_pipelines as tp

    path = tmp_path_factory.mktemp("wan")
    tp.build_tiny_wan_pipeline(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    import tiny_image_pipelines as tip

    path = tmp_path_factory.mktemp("sd3")
    tip.build_tiny_sd3_pipeline(str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------------------------
# methods, bench, app
# ------------------------------------------------------------------------------------------------------------------
def test_methods_lists_dense_with_families():
    res = _run("methods")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("dense:")
    assert "families: wan, hunyuan_video, cogvideox, flux, sd3, unet" in res.stdout


def test_methods_lists_every_registered_method_and_its_options(capsys):
    from diffattn.registry import available_methods

    assert main(["methods", "--all"]) == 0
    out = capsys.readouterr().out
    for name in available_methods():
        assert f"\n{name}:" in out or out.startswith(f"{name}:")
    from diffattn.registry import PLANNED

    assert "  decay_factor: default None;" in out and ("[not available yet]" in out) == bool(PLANNED)


def test_bad_arguments_exit_with_usage():
    res = _run("methods", "--bogus")
    assert res.returncode == 2
    assert "unrecognized arguments: --bogus" in res.stderr


def test_bench_bad_target_and_no_gpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("the no-GPU path is for CPU machines")
    assert main(["bench", "step", "--shape", "480x832x81"]) == 2
    _one_line_error(capsys, "needs a CUDA GPU")


@pytest.mark.parametrize("name,option", [("gna", "--cases"), ("step", "--shape"), ("highres", "--cap-gib"),
                                         ("kernels", "--densities"), ("quality", "--methods")])
def test_bench_help_reaches_the_benchmark(capsys, name, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: diffattn bench {name}" in out and option in out


def test_bench_lists_benchmarks(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("gna", "highres", "kernels", "quality", "step"))
    assert main(["bench"]) == 2  # no benchmark named: the list, and a failing status


def test_app_help():
    res = _run("app", "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: diffattn app")


# ------------------------------------------------------------------------------------------------------------------
# mask
# ------------------------------------------------------------------------------------------------------------------
def test_mask_radial_first_version_flags(tmp_path, capsys):
    from PIL import Image

    from diffattn.masks import radial_mask

    out = tmp_path / "mask.png"
    assert main(["mask", "radial", "--frames", "6", "--tokens-per-frame", "300", "--block-size", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # an explicit grid uses Wan's defaults: decay 0.2, sink
    ref = radial_mask(6, 300, block_size=64, decay_factor=0.2).float().mean().item()
    assert float(_printed(text, "density")) == pytest.approx(ref, abs=1e-4)
    assert float(_printed(text, "speedup_upper_bound")) == pytest.approx(1 / ref, abs=1e-3)
    assert f"wrote {out}" in text
    with Image.open(out) as img:
        assert img.size[0] > 64 and img.size[1] > 64


def test_mask_radial_at_a_named_geometry(tmp_path, capsys):
    from diffattn.masks import radial_mask

    out = tmp_path / "wan.png"
    assert main(["mask", "radial", "--geometry", "wan-14b-720p", "--decay-factor", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    ref = radial_mask(21, 3600, decay_factor=0.5).float().mean().item()
    assert float(_printed(text, "density")) == pytest.approx(ref, abs=1e-4)
    assert _printed(text, "grid") == "21x45x80" and _printed(text, "sink") == "True"
    assert _printed(text, "predicted attention speed-up").startswith(f"{1 / ref:.2f}x")
    assert out.is_file()
    assert main(["mask", "radial", "--geometry", "hunyuan-720p", "--no-sink", "--out", str(out)]) == 0
    assert _printed(capsys.readouterr().out, "decay_factor") == "0.9500"  # HunyuanVideo's default


def test_mask_gna_preset_and_opt_form(tmp_path, capsys):
    out = tmp_path / "gna.png"
    assert main(["mask", "gna", "--geometry", "hunyuan-768p", "--preset", "hunyuan-720p", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert _printed(text, "kernel_size") == "18x24x24" and _printed(text, "perfectly_block_sparse") == "True"
    assert float(_printed(text, "density")) == pytest.approx(18 * 24 * 24 / (30 * 48 * 80), abs=1e-4)
    assert out.is_file()
    assert main(["mask", "gna", "--grid", "4,8,8", "--opt", "kernel_size=3,5,5", "--opt", "q_tile=1,4,4",
                 "--opt", "kv_tile=1,4,4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert _printed(text, "q_tile") == "1x4x4" and float(_printed(text, "flop_density")) == pytest.approx(75 / 256, abs=1e-4)


def test_mask_freeswim_window_from_base_size(tmp_path, capsys):
    out = tmp_path / "fs.png"
    assert main(["mask", "freeswim", "--grid", "21,45,80", "--out", str(out)]) == 0
    assert _printed(capsys.readouterr().out, "kernel_size") == "21x31x53"  # base 480x832
    assert main(["mask", "freeswim", "--grid", "21,45,80", "--base-height", "240", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert _printed(text, "kernel_size") == "21x15x53"
    assert float(_printed(text, "flop_density")) == pytest.approx(15 * 53 / (45 * 80), abs=1e-4)


@pytest.mark.parametrize(
    "args,words",
    [
        (["softpag", "--geometry", "demo-video"], ["no mask picture for method 'softpag'", "radial, rectified, freeswim, gna"]),
        (["radial", "--geometry", "wan-9000"], ["unknown geometry 'wan-9000'", "wan-14b-720p"]),
        (["radial", "--grid", "2,x,3"], ["--grid must be comma-separated ints"]),
        (["radial"], ["give --geometry NAME or --grid"]),
        (["radial", "--geometry", "demo-video", "--opt", "nope=1"], ["unknown mask option 'nope'", "decay_factor"]),
        (["radial", "--geometry", "demo-video", "--decay-factor", "-1"], ["'decay_factor'"]),
        (["radial", "--geometry", "flux-1024"], ["radial needs a video geometry"]),
        (["gna", "--geometry", "demo-video"], ["needs kernel_size=... or preset="]),
        (["radial", "--geometry", "demo-video", "--out", "m.jpg"], ["--out must end in .png"]),
        (["radial", "--frames", "0", "--tokens-per-frame", "300"], ["num_frames"]),
        (["radial", "--grid", "150,150,150"], ["26,368 x 26,368 blocks", "more than the Mask explorer builds"]),
    ],
)
def test_mask_errors_are_one_line(tmp_path, capsys, args, words):
    out = [] if "--out" in args else ["--out", str(tmp_path / "m.png")]
    assert main(["mask", *args, *out]) == 2
    _one_line_error(capsys, *words)
    assert not (tmp_path / "m.png").exists()


def test_mask_help_without_a_method_lists_the_methods():
    res = _run("mask", "--help")
    assert res.returncode == 0, res.stderr
    assert "methods: radial, rectified, freeswim, gna" in res.stdout
    assert re.search(r"^  demo-video +5x32x32 ", res.stdout, re.MULTILINE)
    res = _run("mask")
    assert res.returncode == 2 and "usage: diffattn mask METHOD" in res.stdout


def test_mask_help_lists_options_and_geometries():
    res = _run("mask", "gna", "--help")
    assert res.returncode == 0
    assert "--kernel-size KERNEL_SIZE" in res.stdout and "--q-tile Q_TILE" in res.stdout
    assert re.search(r"^  hunyuan-720p +33x45x80 +HunyuanVideo, 720x1280", res.stdout, re.MULTILINE)


# ------------------------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------------------------
def _gen(folder, out, *extra):
    return ["generate", "--model", folder, "--prompt", PROMPT, "--negative-prompt", "blue",
            "--steps", "3", "--height", "64", "--width", "64", "--frames", "9", "--max-sequence-length", "16",
            "--device", "cpu", "--out", str(out), *extra]


def test_generate_video_with_a_method_and_sidecar(wan_folder, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = main(_gen(wan_folder, out, "--attn", "radial", "--attn-opt", "block_size=16", "--attn-opt", "dense_timesteps=1",
                     "--attn-opt", "dense_layers=0"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert iio.imread(out).shape == (9, 64, 64, 3)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["attn"] == "radial" and meta["attn_options"] == {"block_size": 16, "dense_timesteps": 1, "dense_layers": 0}
    assert meta["output"] == {"kind": "video", "frames": 9, "size": [64, 64]} and meta["seconds"] > 0
    assert meta["diffusers"] and meta["dtype"] == "fp32" and meta["model"] == wan_folder and meta["prompt"] == PROMPT
    # settings left unset are recorded with the value the pipeline's signature gave them (stock Wan: guidance 5.0)
    assert meta["pipeline"] == "WanPipeline" and meta["defaults_used"]["guidance"] == 5.0
    assert "steps" not in meta["defaults_used"]  # set on the command line
    # what the user sees: the pipeline's denoising bar, then a line for decoding and one for writing
    assert "decoding with the VAE" in captured.err and f"writing 9 frames to {out}" in captured.err
    assert captured.err.rindex("3/3") < captured.err.index("decoding") < captured.err.index("writing")
    assert f"wrote {out} (video" in captured.out
    gif = tmp_path / "clip.gif"
    assert main(_gen(wan_folder, gif)) == 0
    assert iio.imread(gif).shape[0] == 9


def test_generate_image_pipeline_writes_png(sd3_folder, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "img.png"
    args = ["generate", "--model", sd3_folder, "--prompt", "a red circle", "--steps", "2", "--height", "32",
            "--width", "32", "--attn", "softpag", "--attn-opt", "heads=L1H2,L0H1", "--attn-opt", "u=0.5",
            "--device", "cpu", "--out", str(out), "--frames", "5"]
    assert main(args) == 0, capsys.readouterr().err
    with Image.open(out) as img:
        assert img.size == (32, 32)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["output"] == {"kind": "image", "size": [32, 32]} and meta["attn_options"] == {"heads": "L1H2,L0H1", "u": 0.5}


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
    _one_line_error(capsys, message)


def test_generate_model_and_output_errors(wan_folder, sd3_folder, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing" / "m"), "--prompt", "a"]) == 2
    _one_line_error(capsys, "does not exist")
    assert main(["generate", "--model", wan_folder]) == 2
    _one_line_error(capsys, "--prompt is required with --model")
    assert main(_gen(wan_folder, tmp_path / "x.png")) == 2
    _one_line_error(capsys, "this pipeline makes video", ".mp4")
    assert main(_gen(wan_folder, tmp_path / "x.txt")) == 2
    _one_line_error(capsys, "unknown output suffix", ".png")
    assert main(["generate", "--model", sd3_folder, "--prompt", "a", "--attn", "radial", "--device", "cpu"]) == 2
    _one_line_error(capsys, "does not support SD3Transformer2DModel")


def test_generate_out_of_memory_advises_offload(wan_folder, tmp_path, capsys, monkeypatch):
    import diffattn.generate

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(diffattn.generate, "run_generation", oom)
    assert main(_gen(wan_folder, tmp_path / "x.mp4")) == 2
    _one_line_error(capsys, "CUDA out of memory", "--offload")


def test_generate_without_model_uses_the_demo_model(wan_folder, tmp_path, capsys, monkeypatch):
    import diffattn.demo

    # no weights: the demo module's own message, one line, exit 2
    monkeypatch.setattr(diffattn.demo, "assets_dir", lambda: tmp_path / "no-assets")
    assert main(["generate", "--device", "cpu"]) == 2
    _one_line_error(capsys, "the bundled video demo model is missing", "--model")
    # with weights: that folder, the demo prompt, the pipeline's defaults for whatever is not given
    monkeypatch.setattr(diffattn.demo, "demo_model_path", lambda kind="video": wan_folder)
    out = tmp_path / "demo.gif"
    assert main(["generate", "--device", "cpu", "--steps", "2", "--height", "32", "--width", "32", "--frames", "5",
                 "--max-sequence-length", "16", "--out", str(out)]) == 0, capsys.readouterr().err
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["model"] == wan_folder and meta["prompt"] == diffattn.demo.DEMO_PROMPTS["video"]
    assert meta["guidance"] is None and meta["output"]["frames"] == 5


# ------------------------------------------------------------------------------------------------------------------
# render
# ------------------------------------------------------------------------------------------------------------------
def test_render_highres(wan_folder, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    args = ["render", "--highres", "--model", wan_folder, "--prompt", PROMPT, "--height", "64",
            "--width", "96", "--frames", "5", "--base-height", "32", "--base-width", "48", "--steps", "4",
            "--max-sequence-length", "16", "--dtype", "fp32", "--device", "cpu", "--out", str(out)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    # two decodes: the native-size pass is decoded, upscaled and re-encoded before the refinement pass
    assert err.count("decoding with the VAE") == 2 and f"writing 5 frames to {out}" in err
    frames = iio.imread(out)
    assert frames.shape[0] == 5 and frames.shape[1:3] == (64, 96)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["height"] == 64 and meta["cache_steps"] == 2 and meta["seconds"] > 0 and meta["vae_tiling"] is False
    # --vae-tiling is wired through (these tiny frames are smaller than one VAE tile, so nothing is actually tiled)
    tiled = tmp_path / "tiled.mp4"
    assert main(args[:-1] + [str(tiled), "--vae-tiling"]) == 0
    assert json.loads(Path(f"{tiled}.json").read_text())["vae_tiling"] is True
    assert iio.imread(tiled).shape == frames.shape
    capsys.readouterr()
    assert main(["render", "--highres", "--model", str(tmp_path / "missing" / "x"), "--prompt", "a"]) == 2
    _one_line_error(capsys, "does not exist")
    assert main(["render", "--highres", "--model", wan_folder, "--prompt", "a", "--out", "x.png"]) == 2
    _one_line_error(capsys, "this pipeline makes video")


def _long(folder, out, *extra):
    return ["render", "--long", "--model", folder, "--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32",
            "--max-sequence-length", "16", "--block-size", "16", "--dense-timesteps", "1", "--dense-layers", "0",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture
def applied(monkeypatch):
    """Records every `diffattn.apply` call (method name and options) made while the test runs."""
    import diffattn.api

    calls = []
    real = diffattn.api.apply

    def spy(target, method, **options):
        calls.append((method, options))
        return real(target, method, **options)

    monkeypatch.setattr(diffattn.api, "apply", spy)
    return calls


def test_render_long_extends_the_pipeline_length_with_radial(wan_folder, tmp_path, capsys, applied):
    import inspect

    from diffusers import WanPipeline

    out = tmp_path / "long.mp4"
    assert main(_long(wan_folder, out, "--frames", "17", "--decay-factor", "0.5")) == 0, capsys.readouterr().err
    assert iio.imread(out).shape == (17, 32, 32, 3)
    meta = json.loads(Path(f"{out}.json").read_text())
    expected = {"block_size": 16, "dense_timesteps": 1, "dense_layers": 0, "decay_factor": 0.5}
    assert meta["attn"] == "radial" and meta["attn_options"] == expected and meta["frames"] == 17
    assert applied == [("radial", expected)]
    # without --frames: --extend times the pipeline's default length
    trained = inspect.signature(WanPipeline.__call__).parameters["num_frames"].default
    assert main(_long(wan_folder, out, "--height", "16", "--width", "16", "--extend", "2", "--overwrite")) == 0, capsys.readouterr().err
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["default_frames"] == trained and meta["frames"] == 2 * (trained - 1) + 1
    assert iio.imread(out).shape[0] == 2 * (trained - 1) + 1


def test_render_long_reads_call_defaults_and_refuses_without_a_length(wan_folder, tmp_path, capsys, monkeypatch):
    from diffusers import WanPipeline

    out = tmp_path / "long.gif"
    # a pipeline that fills its defaults inside __call__ (signature None) says them in `call_defaults`
    monkeypatch.setattr(WanPipeline, "call_defaults", {"num_frames": 5}, raising=False)
    code = main(_long(wan_folder, out, "--extend", "3"))
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert iio.imread(out).shape[0] == 13 and json.loads(Path(f"{out}.json").read_text())["default_frames"] == 5
    monkeypatch.setattr(WanPipeline, "call_defaults", {"num_frames": None}, raising=False)
    monkeypatch.setattr(WanPipeline, "__call__", lambda self, prompt=None, num_frames=None, **kw: None)
    assert main(_long(wan_folder, out, "--overwrite")) == 2
    _one_line_error(capsys, "WanPipeline has no default frame count; pass --frames")


@pytest.fixture(scope="module")
def radial_lora_folder(wan_folder, tmp_path_factory):
    """A LoRA in the radial trainer's layout (weights + lora_config.json), with non-zero random weights."""
    from diffattn.pipelines.radial_lora import LORA_CONFIG_NAME, LORA_WEIGHT_NAME
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = tmp_path_factory.mktemp("lora")
    pipe = WanPipeline.from_pretrained(wan_folder)
    torch.manual_seed(1)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False))
    WanPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                  weight_name=LORA_WEIGHT_NAME)
    info = {"radial": {"block_size": 16, "decay_factor": 0.4, "dense_layers": 1, "dense_timesteps": 0, "sink": None},
            "num_frames": 13, "height": 32, "width": 48}
    (path / LORA_CONFIG_NAME).write_text(json.dumps(info))
    return path


def test_render_long_with_a_radial_lora(wan_folder, radial_lora_folder, tmp_path, capsys, applied):
    base = ["render", "--long", "--model", wan_folder, "--prompt", PROMPT, "--steps", "2", "--max-sequence-length", "16",
            "--dense-timesteps", "1", "--device", "cpu"]
    with_lora = tmp_path / "lora.mp4"
    assert main([*base, "--lora", str(radial_lora_folder), "--out", str(with_lora)]) == 0, capsys.readouterr().err
    video = iio.imread(with_lora)
    assert video.shape == (13, 32, 48, 3)  # the LoRA's training length and size
    meta = json.loads(Path(f"{with_lora}.json").read_text())
    # the LoRA's radial options (its dense_timesteps dropped, None values left to the defaults), then the flags
    assert meta["attn_options"] == {"block_size": 16, "decay_factor": 0.4, "dense_layers": 1, "dense_timesteps": 1}
    assert meta["lora_kind"] == "radial" and applied[-1][1] == meta["attn_options"]
    without = tmp_path / "plain.mp4"
    assert main([*base, "--frames", "13", "--height", "32", "--width", "48", "--block-size", "16", "--decay-factor",
                 "0.4", "--dense-layers", "1", "--out", str(without)]) == 0
    assert np.abs(iio.imread(without).astype(float) - video.astype(float)).mean() > 0.5, "the LoRA changed nothing"
    # a plain Diffusers LoRA (no lora_config.json) loads too
    plain = tmp_path / "plain-lora"
    plain.mkdir()
    shutil.copy(radial_lora_folder / "pytorch_lora_weights.safetensors", plain)
    assert main([*base, "--lora", str(plain), "--frames", "5", "--height", "32", "--width", "32", "--block-size", "16",
                 "--out", str(tmp_path / "p.gif")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "p.gif.json").read_text())["lora_kind"] == "diffusers"


def test_render_long_errors_are_one_line(wan_folder, sd3_folder, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert main(_long(wan_folder, out, "--lora", str(tmp_path / "nope"))) == 2
    _one_line_error(capsys, "--lora", "does not exist")
    assert main(_long(wan_folder, out, "--decay-factor", "-2")) == 2
    _one_line_error(capsys, "'decay_factor'")
    assert main(_long(wan_folder, out, "--extend", "0")) == 2
    _one_line_error(capsys, "--extend must be an int >= 1")
    assert main(_long(wan_folder, tmp_path / "x.png")) == 2
    _one_line_error(capsys, "this pipeline makes video")
    assert main(["render", "--long", "--model", sd3_folder, "--prompt", "a", "--device", "cpu"]) == 2
    _one_line_error(capsys, "needs a video pipeline", "StableDiffusion3Pipeline makes images")
    bad = tmp_path / "bad-lora"
    bad.mkdir()
    (bad / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    assert main(_long(wan_folder, out, "--lora", str(bad), "--frames", "5")) == 2
    _one_line_error(capsys, "--lora", "could not be loaded")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------------
# headhunt
# ------------------------------------------------------------------------------------------------------------------
def test_headhunt_on_a_tiny_sd3(sd3_folder, tmp_path, capsys):
    out = tmp_path / "heads.json"
    args = ["headhunt", "--model", sd3_folder, "--prompt", "a red circle", "--rounds", "1", "--top-k", "1", "--steps",
            "2", "--height", "32", "--width", "32", "--guidance", "1.0", "--device", "cpu", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert len(result["selected"]) == 1 and re.fullmatch(r"L\d+H\d+", result["heads"])
    assert main(["headhunt", "--model", sd3_folder]) == 2
    _one_line_error(capsys, "give --prompt or --prompts")

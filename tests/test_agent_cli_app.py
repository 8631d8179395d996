"""AgentSD through the user-facing doors on the shipped UNet demo model: `diffattn generate --attn agent` and the
app's runner (what its Image and Compare tabs call), at a tiny size so that it stays fast on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffattn.cli import main
from diffattn.demo import demo_model_path

UNET = demo_model_path("unet")
pytestmark = pytest.mark.skipif(not Path(UNET).is_dir(), reason="the UNet demo model is not in assets/")
PROMPT = "a red circle on the left on a blue background"


def test_cli_generate_with_agent_on_the_unet_demo_model_is_reproducible(tmp_path, capsys):
    from PIL import Image

    outs = []
    for name in ("a.png", "b.png"):
        out = tmp_path / name
        args = ["generate", "--model", UNET, "--prompt", PROMPT, "--steps", "3", "--height", "64", "--width", "64",
                "--attn", "agent", "--attn-opt", "seed=0", "--attn-opt", "sx=2", "--attn-opt", "sy=2",
                "--device", "cpu", "--seed", "1", "--out", str(out)]
        assert main(args) == 0, capsys.readouterr().err
        with Image.open(out) as img:
            assert img.size == (64, 64)
            outs.append(np.asarray(img))
        meta = json.loads(Path(f"{out}.json").read_text())
        assert meta["attn"] == "agent" and meta["attn_options"] == {"seed": 0, "sx": 2, "sy": 2}
    assert np.array_equal(outs[0], outs[1])  # same seeds, same picture


def test_app_runner_compare_with_agent_on_the_unet_demo_model(tmp_path):
    from diffattn.app.runner import Runner, Settings, difference, methods_for_family, model_family

    family, _ = model_family(UNET)
    assert family == "unet" and "agent" in methods_for_family(family)
    runner = Runner(tmp_path, device="cpu", dtype="fp32")
    common = {"model": UNET, "prompt": PROMPT, "seed": 0, "steps": 3, "height": 64, "width": 64}
    dense = runner.generate(Settings(method=None, **common))
    agent = runner.generate(Settings(method="agent", options={"seed": 0, "sx": 2, "sy": 2}, **common))
    assert dense.kind == agent.kind == "image" and dense.pixels.shape == agent.pixels.shape == (64, 64, 3)
    assert np.isfinite(agent.pixels).all() and 0 < np.abs(agent.pixels - dense.pixels).mean() < 0.2
    diff = difference(dense.pixels, agent.pixels)
    assert diff.image.ndim == 3
    sidecar = json.loads(Path(agent.sidecar).read_text())
    assert sidecar["attn"] == "agent" and sidecar["attn_effective_options"]["seed"] == 0


def test_quality_bench_runs_agent_on_the_unet_demo_model(tmp_path, capsys):
    from diffattn.bench.quality import main as quality

    out = tmp_path / "q.json"
    args = ["--models", "unet", "--methods", "agent", "--method-opt", "agent:seed=0", "--method-opt", "agent:sx=2",
            "--method-opt", "agent:sy=2", "--seeds", "0", "--steps", "2", "--unet-size", "64x64", "--warmup", "0",
            "--device", "cpu", "--plot", "none", "--no-progress", "--prompts", PROMPT, "--json", str(out)]
    assert quality(args) == 0, capsys.readouterr().err
    unet = json.loads(out.read_text())["models"]["unet"]
    assert unet["family"] == "unet" and unet["size"] == [64, 64] and unet["grid"] == [1, 32, 32]
    row = unet["methods"]["agent"]
    assert row["options"] == {"seed": 0, "sx": 2, "sy": 2} and len(row["psnr"]) == 1
    assert 0 < row["ssim"][0] < 1  # the merge changes the picture, and only a little: not a copy, not noise
    assert unet["methods"]["dense (rerun)"]["psnr"] == ["inf"]  # the JSON spells inf as a string


def test_quality_bench_rejects_an_unknown_model_kind(capsys):
    from diffattn.bench.quality import main as quality

    assert quality(["--models", "unet,dit", "--device", "cpu"]) == 2
    assert "video, image, unet" in capsys.readouterr().err

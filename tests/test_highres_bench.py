"""`diffattn bench highres` (diffattn.bench.highres): FreeSwim end to end with per-stage time and memory.

On CPU the tiny pipeline runs the whole job (model CPU offload hooks included, execution device cpu); the GPU memory
cap is ignored there and the report says so. The real-size UMT5-XXL config is only counted on the meta device.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from diffattn.bench import highres as hb
from diffattn.bench import models
from diffattn.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("highres")
    logger = logging.getLogger("diffattn")
    level = logger.level
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        try:
            rc = cli_main(["bench", "highres", "--model", "tiny", "--device", "cpu", "--out", str(out / "r.json"),
                           "--video", str(out / "v.mp4")])
        finally:
            logger.setLevel(level)
    return rc, json.loads((out / "r.json").read_text()), out / "v.mp4"


def test_tiny_end_to_end_report(tiny_run, capsys):
    rc, report, _ = tiny_run
    assert rc == 0 and report["oom"] is None and "error" not in report
    assert [s["name"] for s in report["stages"]] == list(hb.STAGES)
    for stage in report["stages"]:
        assert stage["seconds"] >= 0 and stage["host_peak_rss_bytes"] > 0
        assert stage["peak_allocated_bytes"] is None, "no CUDA here: no allocator figures"
    assert any("ignored: no CUDA device" in note for note in report["notes"])
    assert report["cap"] is None and report["alloc_conf"] == "expandable_segments:True"
    assert math.isclose(sum(s["seconds"] for s in report["stages"]), report["generation_s"], rel_tol=0.05)
    calls = {s["name"]: s["calls"] for s in report["stages"]}
    # prompt + negative prompt encoded once, for both passes; one VAE call where each stage says
    assert len(calls["text encoding"]["text_encoder"]) == 2
    assert "text_encoder" not in calls["refine setup"]
    assert list(calls["base decode"]) == ["vae.decode"] and list(calls["final decode"]) == ["vae.decode"]
    assert list(calls["upscale + VAE encode"]) == ["vae.encode"]
    assert len(calls["base denoising"]["transformer"]) == 2 * 2, "2 base steps, cond + uncond"


def test_tiny_steps_follow_the_freeswim_schedule(tiny_run):
    _, report, _ = tiny_run
    assert report["refine_steps"] == 2  # int(4 x 0.5)
    base = report["base_steps"]
    assert [s["modes"] for s in base] == [["dense", "dense"]] * 2
    refine = report["refine_steps_detail"]
    # cache_steps=2: step 0's conditional pass runs the full branch and fills the cache, step 1's reads it back
    assert [s["modes"] for s in refine] == [["dual", "window"], ["cached", "window"]]
    assert all(s["seconds"] >= sum(s["forward_s"]) * 0.99 for s in base + refine)
    assert all(s["wall_s"] >= s["seconds"] * 0.99 for s in refine) and all("wall_s" not in s for s in base)


def test_tiny_video_file(tiny_run):
    import imageio.v3 as iio

    _, report, video = tiny_run
    frames = iio.imread(video)
    assert frames.shape == (5, 64, 96, 3)
    assert report["video"]["frames"] == 5 and report["video"]["size"] == [64, 96]
    assert report["video"]["read_back"] == {"frames": 5, "size": [64, 96]} and report["video"]["writer"] == "imageio"
    assert report["video"]["bytes"] == video.stat().st_size
    assert report["output"] == {"shape": [5, 64, 96, 3], "finite": True}


def test_printed_table(tiny_run, capsys):
    # the module fixture ran first; run the renderer on its report directly
    text = hb.render(tiny_run[1])
    assert "| final decode |" in text and "| refine | 1 |" in text and "cap 24" not in text
    assert "no cap" in text


def test_umt5_xxl_parameter_count():
    c = models.UMT5_XXL
    d, layers = c["d_model"], c["num_layers"]
    per_layer = (
        4 * d * c["num_heads"] * c["d_kv"]  # q, k, v, o
        + c["relative_attention_num_buckets"] * c["num_heads"]  # umT5: a relative bias in every layer
        + 2 * d * c["d_ff"] + c["d_ff"] * d  # gated-GELU: wi_0, wi_1, wo
        + 2 * d  # two RMS norms
    )
    expected = c["vocab_size"] * d + layers * per_layer + d  # shared embedding, layers, final norm
    assert models.umt5_xxl_parameters() == expected
    assert 5.67e9 < expected < 5.69e9


def test_random_filler_keeps_ties_and_fills_by_rule():
    from transformers import UMT5EncoderModel

    fields = {**models.UMT5_XXL, "vocab_size": 300, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
              "num_heads": 4}
    with torch.device("meta"):
        model = UMT5EncoderModel(models.umt5_config(fields))
    hb.RandomFiller(seed=1).materialize(model)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 and p.isfinite().all() for p in params.values())
    assert model.shared.weight is model.encoder.embed_tokens.weight, "the shared embedding must stay tied"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in params.values())
    norm = model.encoder.final_layer_norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    wi = model.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.float()
    assert wi.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.1) and abs(wi.mean().item()) < 0.01
    assert model.shared.weight.float().std().item() == pytest.approx(1.0, rel=0.1)
    q0 = model.encoder.block[0].layer[0].SelfAttention.q.weight
    q1 = model.encoder.block[1].layer[0].SelfAttention.q.weight
    assert not torch.equal(q0, q1), "layers read the pool from different offsets"
    with pytest.raises(ValueError, match="not on the meta device"):
        hb.RandomFiller().materialize(torch.nn.Linear(2, 2))


def test_bad_arguments(capsys, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert hb.main(["--model", "tiny", "--frames", "6"]) == 2
    assert "--frames must be 4k+1" in capsys.readouterr().err
    assert hb.main(["--model", "tiny", "--steps", "2", "--strength", "0.4"]) == 2
    assert "refine step" in capsys.readouterr().err
    assert hb.main(["--model", "tiny", "--video", "x.png"]) == 2
    assert "--video must end in" in capsys.readouterr().err


def test_preflight_fails_before_building(capsys, monkeypatch):
    import diffattn.generate as gen

    real = gen._has_module
    real_installed = hb.installed
    monkeypatch.setattr(hb, "installed", lambda m: False if m == "ftfy" else real_installed(m))
    assert hb.main(["--model", "tiny"]) == 2
    assert "ftfy is not installed" in capsys.readouterr().err
    monkeypatch.setattr(hb, "installed", real_installed)
    monkeypatch.setattr(gen, "_has_module", lambda m: False if m in ("imageio_ffmpeg", "cv2") else real(m))
    assert hb.main(["--model", "tiny", "--video", "x.mp4"]) == 2
    assert "no writer here" in capsys.readouterr().err


def test_opencv_writer_when_imageio_has_no_ffmpeg(tmp_path, monkeypatch):
    import types

    import numpy as np

    pytest.importorskip("cv2")
    import diffattn.generate as gen

    real = gen._has_module
    monkeypatch.setattr(gen, "_has_module", lambda m: False if m == "imageio_ffmpeg" else real(m))
    frames = np.random.default_rng(0).random((5, 64, 96, 3), dtype=np.float32)
    written = hb.write_video(types.SimpleNamespace(frames=[frames]), str(tmp_path / "v.mp4"))
    assert written["writer"] == "opencv" and written["frames"] == 5
    assert hb.read_back(str(tmp_path / "v.mp4"), "opencv") == {"frames": 5, "size": [64, 96]}

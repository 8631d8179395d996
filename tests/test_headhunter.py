"""HeadHunter: objectives, candidate heads, the greedy search on a tiny SD3 pipeline, checkpoint/resume, the JSON
head set that `heads=` accepts, and the `diffattn headhunt` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffattn
from diffattn.pipelines.headhunter import (
    ClipObjective,
    HeadHunter,
    HeadHunterResult,
    ImageStatistic,
    candidate_heads,
    format_heads,
    main,
    objective_from_name,
)

import tiny
import tiny_pipelines as tp


def test_image_statistics():
    white, black = np.ones((8, 8, 3)), np.zeros((8, 8, 3))
    red, blue = np.zeros((8, 8, 3)), np.zeros((8, 8, 3))
    red[..., 0], blue[..., 2] = 1.0, 1.0
    assert ImageStatistic("brightness")([white, black], ["a", "b"]) == [1.0, 0.0]
    assert ImageStatistic("warmth")([red, blue], ["a", "b"]) == [1.0, -1.0]
    assert objective_from_name("-brightness")([white], ["a"]) == [-1.0]
    noisy = np.random.default_rng(0).random((16, 16, 3))
    sharp, flat = ImageStatistic("sharpness")([noisy, np.full((16, 16, 3), 0.5)], ["a", "b"])
    assert sharp > flat == 0.0
    assert ImageStatistic("brightness")([torch.ones(3, 8, 8)], ["a"]) == [1.0]  # CHW tensors too
    with pytest.raises(ValueError, match="unknown image statistic 'loud'"):
        ImageStatistic("loud")


def test_clip_objective_from_a_local_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(tmp_path)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tp.tiny_tokenizer()).save_pretrained(tmp_path)
    obj = objective_from_name(f"clip:{tmp_path}")
    assert isinstance(obj, ClipObjective)
    images = [np.random.default_rng(i).random((40, 48, 3)) for i in range(2)]
    a = obj(images, ["a red circle", "a blue square"])
    assert len(a) == 2 and a == obj(images, ["a red circle", "a blue square"])
    assert a != obj(images[::-1], ["a red circle", "a blue square"]), "scores must depend on the images"
    with pytest.raises(ValueError, match="does not exist"):
        ClipObjective(str(tmp_path / "missing"))


def test_candidate_heads_cover_every_layer_and_head():
    sd3, _ = tiny.BUILDERS["sd3"]()
    assert candidate_heads(sd3) == [(layer, h) for layer in range(3) for h in range(2)]
    flux, _ = tiny.BUILDERS["flux"]()
    assert [layer for layer, _ in candidate_heads(flux)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert format_heads([(11, 15), (1, 10)]) == "L11H15,L1H10"


@pytest.fixture(scope="module")
def sd3_pipe():
    import tiny_image_pipelines as tip

    pipe = tip.build_tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


GEN = dict(num_inference_steps=2, height=32, width=32, guidance_scale=1.0, output_type="np")


def _hunter(pipe, **kw):
    # four candidates (two layers x two heads) keep the searches short
    candidates = [(0, 0), (0, 1), (1, 0), (1, 1)]
    return HeadHunter(
        pipe, ImageStatistic("brightness"), [("a red circle", 0), ("a blue square", 1)], rounds=2, top_k=1,
        candidates=candidates, softpag={"u": 1.0, "scale": 3.0}, generation=GEN, progress=False, **kw,
    )


def test_search_writes_a_head_set_that_heads_accepts(sd3_pipe, tmp_path):
    result = _hunter(sd3_pipe).run()
    assert len(result.selected) == 2 and len(set(result.selected)) == 2
    assert [h["round"] for h in result.history] == [0, 1]
    first_round = result.history[0]["scores"]
    assert len(first_round) == 4 and result.history[0]["added"] == max(first_round, key=first_round.get)
    path = tmp_path / "heads.json"
    result.save(path)
    loaded = HeadHunterResult.load(path)
    assert loaded.heads == result.heads and loaded.selected == result.selected
    diffattn.apply(sd3_pipe, "softpag", heads=loaded.heads, u=1.0)
    diffattn.remove(sd3_pipe)


def test_checkpoint_resume_gives_the_same_result(sd3_pipe, tmp_path, monkeypatch):
    reference = _hunter(sd3_pipe).run()
    ckpt = tmp_path / "ckpt.json"
    calls = {"n": 0}
    original = HeadHunter.score

    def crashing(self, heads):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash")
        return original(self, heads)

    monkeypatch.setattr(HeadHunter, "score", crashing)
    with pytest.raises(KeyboardInterrupt):
        _hunter(sd3_pipe, checkpoint=ckpt).run()
    saved = json.loads(ckpt.read_text())["state"]
    assert len(saved["round_scores"]) == 3 and saved["baseline"] is not None
    monkeypatch.setattr(HeadHunter, "score", original)
    counted = {"n": 0}

    def counting(self, heads):
        counted["n"] += 1
        return original(self, heads)

    monkeypatch.setattr(HeadHunter, "score", counting)
    resumed = _hunter(sd3_pipe, checkpoint=ckpt).run()
    assert resumed.heads == reference.heads and resumed.history == reference.history
    assert counted["n"] == (4 - 3) + (4 - 1), "resume re-evaluates nothing already scored"
    with pytest.raises(ValueError, match="other settings"):
        HeadHunter(sd3_pipe, ImageStatistic("contrast"), [("a", 0)], rounds=2, top_k=1, generation=GEN,
                   checkpoint=ckpt, progress=False).run()


def test_cli_headhunt(tmp_path, capsys):
    import tiny_image_pipelines as tip

    model = tmp_path / "sd3"
    tip.build_tiny_sd3_pipeline(str(model))
    out = tmp_path / "heads.json"
    args = ["--model", str(model), "--prompt", "a red circle", "--seeds", "0", "--rounds", "1", "--top-k", "2",
            "--steps", "2", "--height", "32", "--width", "32", "--guidance", "1.0", "--device", "cpu", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert len(result["selected"]) == 2 and result["heads"].count("L") == 2
    assert main(["--model", str(tmp_path / "nope" / "x"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err

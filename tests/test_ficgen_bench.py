"""The layout-accuracy metric: ground-truth scenes score as hits, wrong places and shapes do not."""

from __future__ import annotations

import torch

from diffattn.pipelines.demo_data import sample_scenes
from diffattn.pipelines.ficgen_bench import random_layouts, score, shape_of, summarise


def _items(boxes, prompts):
    return [{"prompt": p, "targets": [(sb.color, sb.shape, sb.box) for sb in scene]} for p, scene in zip(prompts, boxes)]


def test_ground_truth_scenes_are_hits():
    pixels, prompts, boxes = sample_scenes(24, size=128, seed=3)
    items = _items(boxes, prompts)
    result = summarise(score((pixels + 1) / 2, items))
    assert result["mass_in_box"] > 0.97 and result["colour_hit"] == 1.0
    assert result["shape_hit"] > 0.9
    # the same images scored against boxes moved to the mirrored place miss
    mirrored = [{"targets": [(c, s, (1 - b[2], 1 - b[3], 1 - b[0], 1 - b[1])) for c, s, b in it["targets"]]}
                for it in items]
    moved = summarise(score((pixels + 1) / 2, mirrored))
    assert moved["colour_hit"] < 0.3 and moved["mass_in_box"] < 0.3
    # a blank image has no colour mass anywhere
    assert summarise(score(torch.zeros_like(pixels), items))["colour_hit"] == 0.0


def test_shape_of_and_random_layouts():
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    assert shape_of((yy - 20) ** 2 + (xx - 20) ** 2 < 15**2) == "circle"
    assert shape_of((yy > 5) & (yy < 35) & (xx > 5) & (xx < 35)) == "square"
    assert shape_of((yy > 5) & (yy < 35) & ((xx - 20).abs() < (yy - 5) / 2)) == "triangle"
    for mode in ("grid", "free"):
        items = random_layouts(20, seed=1, mode=mode)
        assert len(items) == 20
        for it in items:
            boxes = [b for _, _, b in it["targets"]]
            assert 1 <= len(boxes) <= 3 and len(set(c for c, _, _ in it["targets"])) == len(boxes)
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
            assert ("at the" in it["prompt"] or "on the" in it["prompt"] or "in the" in it["prompt"]) == (mode == "grid")

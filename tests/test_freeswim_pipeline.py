"""`diffattn.pipelines.FreeSwimPipeline` on a tiny Wan folder: base pass, upscale + re-noise, FreeSwim refine."""

from __future__ import annotations

import pytest
import torch

from diffattn.pipelines import FreeSwimPipeline

import tiny_pipelines as tp

KW = dict(
    negative_prompt="blue square", height=64, width=96, num_frames=5, base_height=32, base_width=48,
    num_inference_steps=4, strength=0.75, max_sequence_length=16, output_type="pt",
)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    tp.build_tiny_wan_pipeline(str(path))
    return FreeSwimPipeline.from_pretrained(str(path))


def _count_forwards(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape), with_kwargs=True)
    return calls, handle


def test_base_then_refine_at_the_target_size(pipe):
    stock = type(pipe.transformer.attn_processors["blocks.0.attn1.processor"])
    steps = []
    calls, handle = _count_forwards(pipe)
    try:
        out = pipe(
            "a red circle moving left", generator=torch.Generator().manual_seed(0),
            callback_on_step_end=lambda p, i, t, kw: (steps.append(i), kw)[1], **KW,
        ).frames
    finally:
        handle.remove()
    assert out.shape == (1, 5, 3, 64, 96) and out.isfinite().all()
    assert steps == [0, 1, 2], "callbacks run on the refine pass: 4 steps x strength 0.75"
    base = [c for c in calls if c[-2:] == (4, 6)]
    refine = [c for c in calls if c[-2:] == (8, 12)]
    assert len(base) == 4 * 2, "base pass: 4 steps, cond + uncond"
    # refine with cache_steps=2: cond passes at steps 0 and 2 run [window; full] (batch 2), step 1 batch 1 (cached)
    assert [c[0] for c in refine] == [1, 1, 1, 1, 1, 1], "the hook sees the pipeline's batch; duplication is inside"
    assert type(pipe.transformer.attn_processors["blocks.0.attn1.processor"]) is stock, "FreeSwim must be removed"


def test_base_video_skips_the_base_pass(pipe):
    base = torch.rand(5, 3, 32, 48)
    calls, handle = _count_forwards(pipe)
    try:
        out = pipe("a red circle", base_video=base, generator=torch.Generator().manual_seed(0), **KW).frames
    finally:
        handle.remove()
    assert out.shape == (1, 5, 3, 64, 96)
    assert all(c[-2:] == (8, 12) for c in calls) and len(calls) == 3 * 2


def test_prompts_encoded_once_with_the_stock_encoding(pipe, monkeypatch):
    """One text-encoder run (cond + uncond) for both passes, and the same video as when each pass encodes the prompts
    itself (the stock pipelines' own path: same tokens, lengths and dtype)."""
    runs = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda m, a: runs.append(1))
    try:
        out = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **KW).frames
        assert len(runs) == 2, "cond + uncond, once for both passes"
        runs.clear()
        # the previous behaviour: hand the prompts to each stage, which encodes them itself
        monkeypatch.setattr(type(pipe), "_encode_prompts",
                            lambda self, p, prompt, negative, g, n: {"prompt": prompt, "negative_prompt": negative})
        per_pass = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **KW).frames
        assert len(runs) == 4
    finally:
        handle.remove()
    assert torch.equal(out, per_pass)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="strength must be in"):
        pipe("a", **{**KW, "strength": 0.0})
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        pipe("a", **{**KW, "height": 70})

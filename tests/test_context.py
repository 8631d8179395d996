"""The per-forward context: token grid, text span and padding, layer indices, step index and CFG passes."""

from __future__ import annotations

import pytest
import torch

import diffattn

import tiny
import tiny_pipelines as tp

EXPECTED = {
    # family: (make_inputs kwargs, expected grid of the video/image tokens, text_len, text_first per role)
    "wan": ({}, (3, 5, 7), 7),
    "hunyuan_video": ({}, (3, 5, 7), 9),
    "cogvideox": ({}, (3, 5, 7), 7),
    "flux": ({}, (1, 5, 7), 6),
    "sd3": ({}, (1, 5, 7), 7),
    "unet": ({}, (1, 12, 20), 7),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_grid_text_span_and_layers(family, spy):
    kwargs, grid, text_len = EXPECTED[family]
    model, make_inputs = tiny.BUILDERS[family]()
    diffattn.apply(model, "spy")
    try:
        tiny.output_of(model, make_inputs(batch=2, **kwargs))
    finally:
        diffattn.remove(model)
    assert spy, "no attention call went through diffattn"
    for r in spy:
        assert r["grid"] is not None, r
        t, h, w = r["grid"]
        assert t * h * w == r["sq"] - (r["text_len"] if r["role"] == "joint" else 0)
        if r["role"] == "joint":
            start, stop = r["visual"]
            assert stop - start == t * h * w
            assert r["text_first"] == (family in ("flux", "cogvideox"))
            assert r["text_len"] == text_len
        if r["role"] == "cross":
            assert r["text_len"] == text_len == r["sk"]
    top = [r["grid"] for r in spy if r["sq"] - (r["text_len"] if r["role"] == "joint" else 0) == grid[0] * grid[1] * grid[2]]
    assert top and all(g == grid for g in top)
    layers = sorted({r["layer"] for r in spy})
    num_layers = {"wan": 2, "hunyuan_video": 4, "cogvideox": 2, "flux": 4, "sd3": 3, "unet": 4}[family]
    assert layers == list(range(num_layers)), layers
    if family == "unet":  # the down-sampled level sees the halved grid (12x20 -> 6x10)
        assert {r["grid"] for r in spy} == {(1, 12, 20), (1, 6, 10)}


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox", "sd3"])
def test_patch_size_reaches_methods(family, spy):
    """The model's own patch (frames, height, width) is in the context (FreeSwim's window reads it)."""
    model, make_inputs = tiny.BUILDERS[family]()
    diffattn.apply(model, "spy")
    try:
        tiny.output_of(model, make_inputs(batch=1))
    finally:
        diffattn.remove(model)
    cfg = model.config
    p = cfg.patch_size
    expected = tuple(p) if isinstance(p, (list, tuple)) else (getattr(cfg, "patch_size_t", None) or 1, p, p)
    assert spy and {r["patch_size"] for r in spy} == {expected}


def test_hunyuan_padding_mask_reaches_methods(spy):
    model, make_inputs = tiny.BUILDERS["hunyuan_video"]()
    inputs = make_inputs(batch=2)
    diffattn.apply(model, "spy")
    try:
        tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    r = spy[0]
    assert torch.equal(r["text_mask"], inputs["encoder_attention_mask"].bool())
    # key padding over the joint [video; text] keys: video all valid, text as the mask
    kp = r["key_padding"]
    assert kp.shape == (2, r["sk"])
    assert kp[:, : r["sk"] - 9].all()
    assert torch.equal(kp[:, r["sk"] - 9 :], inputs["encoder_attention_mask"].bool())


def _steps_by_forward(records, num_modules):
    """(step, pass_name, pass_index) of each forward, from the records of its first attention call."""
    return [(r["step"], r["pass_name"], r["pass_index"]) for r in records[::num_modules]]


@pytest.fixture(scope="module")
def wan_pipe():
    return tp.build_tiny_wan_pipeline()


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_wan_pipeline_steps_with_and_without_cfg(wan_pipe, spy, guidance):
    ref = tp.run_tiny_wan(wan_pipe, guidance=guidance)
    diffattn.apply(wan_pipe, "spy")
    try:
        out = tp.run_tiny_wan(wan_pipe, guidance=guidance)
        tp.run_tiny_wan(wan_pipe, guidance=guidance, steps=2)  # a second call restarts at step 0
    finally:
        diffattn.remove(wan_pipe)
    assert (out - ref).abs().max().item() <= 1e-5
    per_forward = _steps_by_forward(spy, num_modules=4)
    if guidance > 1:
        expected = [(s, name, i) for s in range(3) for i, name in enumerate(("cond", "uncond"))]
        expected += [(s, name, i) for s in range(2) for i, name in enumerate(("cond", "uncond"))]
    else:
        expected = [(s, "cond", 0) for s in range(3)] + [(s, "cond", 0) for s in range(2)]
    assert per_forward == expected
    assert {r["grid"] for r in spy} == {(2, 2, 3)}
    assert [r["num_steps"] for r in spy[::4]] == [3] * (len(spy[::4]) - len(expected[-4 if guidance > 1 else -2:])) + [2] * (4 if guidance > 1 else 2)


@pytest.mark.parametrize("cache", ["fastercache", "pab"])
def test_wan_pipeline_steps_with_attention_caches(wan_pipe, spy, cache):
    """FasterCache and PyramidAttentionBroadcast skip attention calls; the step index still follows the step."""
    from diffusers import FasterCacheConfig, PyramidAttentionBroadcastConfig

    if cache == "fastercache":
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 901),
            current_timestep_callback=lambda: wan_pipe.current_timestep,
            attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True,  # Wan runs CFG as separate calls: no batch-level CFG skipping
        )
    else:
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 901),
            current_timestep_callback=lambda: wan_pipe.current_timestep,
        )
    diffattn.apply(wan_pipe, "spy")
    wan_pipe.transformer.enable_cache(config)
    try:
        tp.run_tiny_wan(wan_pipe, steps=4)
    finally:
        wan_pipe.transformer.disable_cache()
        diffattn.remove(wan_pipe)
    self_calls = [(r["step"], r["pass_name"]) for r in spy if r["slot"] == "attn1"]
    steps_seen = sorted({s for s, _ in self_calls})
    # Some self-attention calls were skipped by the cache, yet those that ran carry their true step.
    assert len(self_calls) < 4 * 2 * 2, "the cache skipped nothing: the test does not test skipping"
    assert steps_seen[0] == 0 and steps_seen[-1] == 3
    cross_steps = [r["step"] for r in spy if r["slot"] == "attn2"]
    assert sorted(set(cross_steps)) == [0, 1, 2, 3]


def test_bare_model_steps_from_timesteps_batched_and_separate_cfg(spy):
    """Without a pipeline's cache context, the step follows the timestep: batch-2 CFG, separate passes, and a
    second generation (timestep jumps up) restarting at 0."""
    model, make_inputs = tiny.BUILDERS["sd3"]()
    diffattn.apply(model, "spy")
    try:
        for t in (900.0, 600.0, 300.0):  # batched CFG: one forward per step
            inputs = make_inputs(batch=2)
            inputs["timestep"] = torch.full((2,), t)
            tiny.output_of(model, inputs)
        n_batched = len(spy)
        for t in (800.0, 400.0):  # separate passes: two forwards per step
            for _ in range(2):
                inputs = make_inputs(batch=1)
                inputs["timestep"] = torch.full((1,), t)
                tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    per_call = len(spy[n_batched:]) // 4
    batched = [(r["step"], r["pass_index"]) for r in spy[:n_batched:per_call]]
    separate = [(r["step"], r["pass_index"]) for r in spy[n_batched::per_call]]
    assert batched == [(0, 0), (1, 0), (2, 0)]
    assert separate == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_wan22_two_experts_share_one_step_counter(spy):
    """Wan 2.2 switches from `transformer` to `transformer_2` mid-generation: both get processors and the step
    index runs on across the switch."""
    from diffusers import WanPipeline

    base = tp.build_tiny_wan_pipeline()
    torch.manual_seed(1)
    expert2 = type(base.transformer)(**base.transformer.config)
    pipe = WanPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, transformer=base.transformer, vae=base.vae,
        scheduler=base.scheduler, transformer_2=expert2, boundary_ratio=0.5,
    )
    diffattn.apply(pipe, "spy")
    try:
        tp.run_tiny_wan(pipe, steps=4, guidance=1.0, guidance_scale_2=1.0)
    finally:
        diffattn.remove(pipe)
    assert [r["step"] for r in spy[::4]] == [0, 1, 2, 3]
    from diffattn.api import installed

    assert installed(pipe.transformer) is None and installed(pipe.transformer_2) is None


@pytest.mark.parametrize("method,options", [("radial", {}), ("softpag", {"heads": "L0"})])
def test_remove_frees_the_method_without_the_garbage_collector(method, options):
    """After `remove`, nothing of the installed method may stay alive in a reference cycle (a per-call hook class did:
    it kept FreeSwim's GPU cache allocated until the garbage collector ran)."""
    import gc
    import weakref

    model, make_inputs = tiny.tiny_wan()
    inputs = make_inputs()
    diffattn.apply(model, method, **options)  # softpag has prepare/finish_forward hooks into the model's forward
    tiny.output_of(model, inputs)
    method_ref = weakref.ref(diffattn.api.installed(model).runtime)
    assert method_ref() is not None
    gc.collect()
    gc.disable()
    try:
        diffattn.remove(model)
        tiny.output_of(model, inputs)  # stock again
        assert method_ref() is None
    finally:
        gc.enable()

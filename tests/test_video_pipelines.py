"""diffattn end to end in whole tiny CogVideoX and HunyuanVideo pipelines (built offline, saved and reloaded).

- "dense" equals the stock pipeline (CFG on: CogVideoX as one batch-2 forward, HunyuanVideo's embedded guidance and
  its true-CFG path with a negative prompt as a second forward), and `remove` restores the stock output.
- The per-forward context the methods see matches what the pipeline did: the token grid from the latents' shape
  and the patch sizes, the text length, HunyuanVideo's padding mask (the pipeline's own prompt mask), the step
  index of every forward, the pass names and indices.
- "radial" runs end to end, differs from dense, equals dense when every step is a warm-up step, and equals an
  independent reference: masked SDPA with the model's own mask AND the radial block mask on the video x video part,
  its warm-up (and `dense_last_steps`) steps counted by the pipeline's step callback, not by diffattn's context.
- With Diffusers' caching hooks (FasterCache, PAB, FirstBlockCache) skipping attention calls, the calls that run
  still carry the pipeline's step, and the context's batch is the batch the attention runs on when FasterCache
  cuts the unconditional half, whichever of `enable_cache` and `diffattn.apply` came first.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn import registry
from diffattn.config import MethodConfig
from diffattn.masks import radial_mask
from diffattn.methods.base import AttentionMethod
from diffattn.methods.radial import FAMILY_DEFAULTS

import tiny_video_pipelines as tvp

STEPS = 3
NUM_VIDEO = tvp.TOKEN_GRID[0] * tvp.TOKEN_GRID[1] * tvp.TOKEN_GRID[2]
RADIAL = dict(block_size=16, dense_timesteps=1, dense_layers=0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=[None, 2], ids=["cogvideox1.0", "cogvideox1.5"])
def cog(request):
    pipe = tvp.build_tiny_cogvideox_pipeline(patch_size_t=request.param)
    return pipe, tvp.run_tiny_cogvideox(pipe, steps=STEPS)


@pytest.fixture(scope="module")
def hunyuan():
    pipe = tvp.build_tiny_hunyuan_video_pipeline()
    stock = {cfg: tvp.run_tiny_hunyuan_video(pipe, steps=STEPS, true_cfg_scale=cfg) for cfg in (1.0, 3.0)}
    return pipe, stock


def test_builders_are_what_the_tests_assume(cog, hunyuan):
    cog_pipe, cog_out = cog
    hy_pipe, hy_out = hunyuan
    cog_frames = tvp.NUM_FRAMES if cog_pipe.transformer.config.patch_size_t is None else tvp.NUM_FRAMES_COGVIDEOX_15
    assert cog_out.shape == (1, cog_frames, 3, tvp.HEIGHT, tvp.WIDTH)
    assert hy_out[1.0].shape == (1, tvp.NUM_FRAMES, 3, tvp.HEIGHT, tvp.WIDTH)
    assert cog_pipe.transformer.config.use_rotary_positional_embeddings
    for out in (cog_out, hy_out[1.0], hy_out[3.0]):
        assert torch.isfinite(out).all()
    # True CFG really runs a second, different forward.
    assert max_diff(hy_out[1.0], hy_out[3.0]) > 1e-4
    # The template crop leaves exactly the prompt's words and <|eot_id|>, then padding: a non-trivial mask.
    mask = tvp.hunyuan_prompt_mask(hy_pipe)
    words = len(tvp.PROMPT.split())
    assert mask.shape == (1, tvp.MAX_TEXT)
    assert mask[0].tolist() == [1] * (words + 1) + [0] * (tvp.MAX_TEXT - words - 1)


# ---- dense equals stock ---------------------------------------------------------------------------------------
def test_cogvideox_dense_equals_stock_with_batched_cfg(cog):
    pipe, stock = cog
    diffattn.apply(pipe, "dense")
    try:
        assert len(diffattn.api.installed(pipe.transformer).replaced) == 2
        out = tvp.run_tiny_cogvideox(pipe, steps=STEPS)
    finally:
        diffattn.remove(pipe)
    assert max_diff(out, stock) <= 1e-5
    assert max_diff(tvp.run_tiny_cogvideox(pipe, steps=STEPS), stock) <= 1e-6  # remove restored the stock path


@pytest.mark.parametrize("true_cfg", [1.0, 3.0], ids=["distilled", "true_cfg"])
def test_hunyuan_video_dense_equals_stock(hunyuan, true_cfg):
    pipe, stock = hunyuan
    diffattn.apply(pipe, "dense")
    try:
        assert len(diffattn.api.installed(pipe.transformer).replaced) == 4
        out = tvp.run_tiny_hunyuan_video(pipe, steps=STEPS, true_cfg_scale=true_cfg)
    finally:
        diffattn.remove(pipe)
    assert max_diff(out, stock[true_cfg]) <= 1e-5
    assert max_diff(tvp.run_tiny_hunyuan_video(pipe, steps=STEPS, true_cfg_scale=true_cfg), stock[true_cfg]) <= 1e-6


# ---- the context the methods see ------------------------------------------------------------------------------
def _forwards(records: list[dict], layers: int) -> list[list[dict]]:
    """Records grouped by model forward (every forward calls each replaced layer once, in order)."""
    assert records and len(records) % layers == 0, len(records)
    groups = [records[i : i + layers] for i in range(0, len(records), layers)]
    for group in groups:
        assert [r["layer"] for r in group] == list(range(layers))
        for key in ("step", "pass_name", "pass_index", "num_steps", "timestep", "grid", "text_len"):
            assert len({repr(r[key]) for r in group}) == 1, f"{key} changed within one forward"
    return groups


def test_cogvideox_context(cog, spy):
    pipe, _ = cog
    diffattn.apply(pipe, "spy")
    try:
        latents = tvp.run_tiny_cogvideox(pipe, steps=STEPS, output_type="latent")  # [B, F, C, H, W]
    finally:
        diffattn.remove(pipe)
    p, p_t = pipe.transformer.config.patch_size, pipe.transformer.config.patch_size_t or 1
    _, f, _, h, w = latents.shape  # CogVideoX 1.5: frames padded to a multiple of p_t
    grid = (f // p_t, h // p, w // p)
    assert grid == tvp.TOKEN_GRID and grid[0] >= 3 and grid[1] * grid[2] >= 16
    timesteps = pipe.scheduler.timesteps.tolist()
    forwards = _forwards(spy, layers=2)
    assert len(forwards) == STEPS  # CFG as one batch-2 forward per step
    for i, group in enumerate(forwards):
        r = group[0]
        assert r["step"] == i and r["pass_index"] == 0 and r["pass_name"] == "cond_uncond"
        assert r["num_steps"] == STEPS
        assert r["timestep"] == pytest.approx(timesteps[i])
        for r in group:
            assert r["role"] == "joint" and r["grid"] == grid
            assert r["text_len"] == tvp.MAX_TEXT and r["text_first"]
            assert r["sq"] == r["sk"] == tvp.MAX_TEXT + NUM_VIDEO
            assert r["visual"] == (tvp.MAX_TEXT, tvp.MAX_TEXT + NUM_VIDEO)
            assert r["key_padding"] is None and r["text_mask"] is None


@pytest.mark.parametrize("true_cfg", [1.0, 3.0], ids=["distilled", "true_cfg"])
def test_hunyuan_video_context(hunyuan, spy, true_cfg):
    pipe, _ = hunyuan
    masks = {"cond": tvp.hunyuan_prompt_mask(pipe, tvp.PROMPT), "uncond": tvp.hunyuan_prompt_mask(pipe, tvp.NEGATIVE_PROMPT)}
    assert not torch.equal(masks["cond"], masks["uncond"])
    diffattn.apply(pipe, "spy")
    try:
        latents = tvp.run_tiny_hunyuan_video(pipe, steps=STEPS, true_cfg_scale=true_cfg, output_type="latent")
    finally:
        diffattn.remove(pipe)
    cfg = pipe.transformer.config
    _, _, f, h, w = latents.shape  # [B, C, F, H, W]
    grid = (f // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size)
    assert grid == tvp.TOKEN_GRID
    timesteps = pipe.scheduler.timesteps.tolist()
    passes = ["cond", "uncond"] if true_cfg > 1 else ["cond"]
    forwards = _forwards(spy, layers=4)
    assert len(forwards) == STEPS * len(passes)
    for n, group in enumerate(forwards):
        step, pass_index = divmod(n, len(passes))
        name = passes[pass_index]
        r = group[0]
        assert (r["step"], r["pass_index"], r["pass_name"]) == (step, pass_index, name)
        assert r["num_steps"] == STEPS
        assert r["timestep"] == pytest.approx(timesteps[step])
        for r in group:
            assert r["role"] == "joint" and r["grid"] == grid
            assert r["text_len"] == tvp.MAX_TEXT and not r["text_first"]
            assert r["sq"] == r["sk"] == NUM_VIDEO + tvp.MAX_TEXT
            assert r["visual"] == (0, NUM_VIDEO)
            assert torch.equal(r["text_mask"], masks[name].bool())
            assert r["key_padding"][:, :NUM_VIDEO].all()
            assert torch.equal(r["key_padding"][:, NUM_VIDEO:], masks[name].bool())


# ---- radial ---------------------------------------------------------------------------------------------------
@pytest.fixture
def radial_reference(monkeypatch):
    """Registers "radial_ref": masked SDPA with the model's own attention mask AND, from the first non-warm-up
    step on, the radial block mask over the video x video part. The step comes from the pipeline's step callback;
    the text position from what the family is (CogVideoX text first, HunyuanVideo text last)."""

    @dataclass
    class RefConfig(MethodConfig):
        method_name = "radial_ref"

    state = {"step": 0, "family": None, "calls": 0, "dense_steps": ()}

    def callback(pipe, i, t, kwargs):
        state["step"] = i + 1
        return {}

    class RadialRef(AttentionMethod):
        name = "radial_ref"

        def attend(self, call):
            state["calls"] += 1
            q, k, v = call.q, call.k, call.v
            if state["step"] in state["dense_steps"]:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=call.attn_mask)
            defaults = FAMILY_DEFAULTS[state["family"]]
            frames, height, width = tvp.TOKEN_GRID
            block = radial_mask(
                frames, height * width, block_size=RADIAL["block_size"], decay_factor=defaults["decay_factor"],
                sink=defaults["sink"],
            )
            tokens = block.repeat_interleave(RADIAL["block_size"], 0).repeat_interleave(RADIAL["block_size"], 1)
            tokens = tokens[:NUM_VIDEO, :NUM_VIDEO]
            b, _, s, _ = q.shape
            vis = slice(s - NUM_VIDEO, s) if state["family"] == "cogvideox" else slice(0, NUM_VIDEO)
            keep = torch.ones(b, 1, s, s, dtype=torch.bool)
            if call.attn_mask is not None:
                keep &= call.attn_mask.bool()
            keep[:, :, vis, vis] &= tokens
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    spec = registry.MethodSpec("radial_ref", "test reference", RefConfig, registry.ALL_FAMILIES, RadialRef)
    monkeypatch.setitem(registry._REGISTRY, "radial_ref", spec)

    def run(pipe, family: str, runner, dense_steps=tuple(range(RADIAL["dense_timesteps"])), **kwargs):
        state.update(step=0, family=family, calls=0, dense_steps=tuple(dense_steps))
        diffattn.apply(pipe, "radial_ref")
        try:
            out = runner(pipe, steps=STEPS, callback_on_step_end=callback, **kwargs)
        finally:
            diffattn.remove(pipe)
        assert state["calls"] > 0
        return out

    return run


def _run_radial(pipe, runner, **kwargs):
    out = {}
    for dense_steps in (RADIAL["dense_timesteps"], STEPS):
        diffattn.apply(pipe, "radial", **{**RADIAL, "dense_timesteps": dense_steps})
        try:
            out[dense_steps] = runner(pipe, steps=STEPS, **kwargs)
            method = diffattn.api.installed(pipe.transformer).runtime
        finally:
            diffattn.remove(pipe)
        if dense_steps < STEPS:
            masks = list(method._masks.values())
            assert len(masks) == 1 and masks[0].float().mean().item() < 0.9, "the test geometry must be sparse"
    return out[RADIAL["dense_timesteps"]], out[STEPS]


def test_cogvideox_radial(cog, radial_reference):
    pipe, stock = cog
    sparse, all_dense = _run_radial(pipe, tvp.run_tiny_cogvideox)
    assert torch.isfinite(sparse).all()
    assert max_diff(sparse, stock) > 1e-4, "radial must differ from dense on a sparse mask"
    assert max_diff(all_dense, stock) <= 1e-5
    ref = radial_reference(pipe, "cogvideox", tvp.run_tiny_cogvideox)
    assert max_diff(sparse, ref) <= 1e-5


HUNYUAN_RADIAL_CASES = {
    "distilled": dict(true_cfg_scale=1.0),
    "true_cfg": dict(true_cfg_scale=3.0),
    # two prompts of different lengths in one batch: per-element text padding
    "batch2": dict(prompt=[tvp.PROMPT, "big green square"], seed=[0, 1]),
}


@pytest.mark.parametrize("case", list(HUNYUAN_RADIAL_CASES))
def test_hunyuan_video_radial(hunyuan, radial_reference, case):
    pipe, stock = hunyuan
    kwargs = HUNYUAN_RADIAL_CASES[case]
    dense = stock.get(kwargs.get("true_cfg_scale"))
    if dense is None:
        dense = tvp.run_tiny_hunyuan_video(pipe, steps=STEPS, **kwargs)
    sparse, all_dense = _run_radial(pipe, tvp.run_tiny_hunyuan_video, **kwargs)
    assert torch.isfinite(sparse).all()
    assert max_diff(sparse, dense) > 1e-4, "radial must differ from dense on a sparse mask"
    assert max_diff(all_dense, dense) <= 1e-5
    ref = radial_reference(pipe, "hunyuan_video", tvp.run_tiny_hunyuan_video, **kwargs)
    assert max_diff(sparse, ref) <= 1e-5


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video"])
def test_radial_dense_last_steps(request, radial_reference, family):
    """`dense_last_steps` needs the step count, which the context takes from the pipeline."""
    if family == "cogvideox":
        pipe = tvp.build_tiny_cogvideox_pipeline()
        runner, kwargs = tvp.run_tiny_cogvideox, {}
    else:
        pipe, _ = request.getfixturevalue("hunyuan")
        runner, kwargs = tvp.run_tiny_hunyuan_video, dict(true_cfg_scale=3.0)
    diffattn.apply(pipe, "radial", **RADIAL, dense_last_steps=1)
    try:
        out = runner(pipe, steps=STEPS, **kwargs)
    finally:
        diffattn.remove(pipe)
    ref = radial_reference(pipe, family, runner, dense_steps=(0, STEPS - 1), **kwargs)
    assert max_diff(out, ref) <= 1e-5
    wrong = radial_reference(pipe, family, runner, dense_steps=(0,), **kwargs)
    assert max_diff(out, wrong) > 1e-4


# ---- with Diffusers' caching hooks ----------------------------------------------------------------------------
def _cache_config(kind: str, pipe, distilled: bool):
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if kind == "faster":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=distilled, current_timestep_callback=lambda: pipe.current_timestep,
        )
    if kind == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 950),
            current_timestep_callback=lambda: pipe.current_timestep,
        )
    return FirstBlockCacheConfig(threshold=0.8)


@pytest.mark.parametrize("family,kind", [("cogvideox", "faster"), ("hunyuan_video", "pab"), ("hunyuan_video", "fbc")])
def test_step_index_with_caching_hooks(request, spy, family, kind):
    """Caching hooks skip attention calls; every call that does run still sees the pipeline's own step index
    (counted here by the step callback), over two generations in a row."""
    if family == "cogvideox":
        pipe = tvp.build_tiny_cogvideox_pipeline()
        runner, kwargs, layers, passes = tvp.run_tiny_cogvideox, {}, 2, 1
    else:
        pipe, _ = request.getfixturevalue("hunyuan")
        runner, kwargs, layers, passes = tvp.run_tiny_hunyuan_video, dict(true_cfg_scale=3.0), 4, 2
    steps = 5
    seen: list[int] = []

    def callback(p, i, t, kw):
        seen.append(len(spy))  # records made up to the end of step i
        return {}

    pipe.transformer.enable_cache(_cache_config(kind, pipe, distilled=family == "hunyuan_video"))
    diffattn.apply(pipe, "spy")
    try:
        for _ in range(2):
            spy.clear()
            seen.clear()
            runner(pipe, steps=steps, callback_on_step_end=callback, output_type="latent", **kwargs)
            assert 0 < len(spy) < steps * layers * passes, "the cache must skip some attention calls"
            bounds = [0, *seen]
            for step in range(steps):
                for r in spy[bounds[step] : bounds[step + 1]]:
                    assert r["step"] == step and r["num_steps"] == steps
                    assert (r["pass_name"], r["pass_index"]) in {("cond_uncond", 0), ("cond", 0), ("uncond", 1)}
    finally:
        diffattn.remove(pipe)
        pipe.transformer.disable_cache()


@pytest.fixture
def batch_probe(monkeypatch):
    """Registers "batch_probe": dense attention that records, per call, the context's batch size and step next to
    the batch the attention really runs on."""

    @dataclass
    class ProbeConfig(MethodConfig):
        method_name = "batch_probe"

    records: list[tuple[int, int, int]] = []

    class Probe(AttentionMethod):
        name = "batch_probe"

        def attend(self, call):
            records.append((call.context.step_index, call.context.batch_size, call.q.shape[0]))
            return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=call.attn_mask)

    spec = registry.MethodSpec("batch_probe", "test probe", ProbeConfig, registry.ALL_FAMILIES, Probe)
    monkeypatch.setitem(registry._REGISTRY, "batch_probe", spec)
    return records


def _fastercache_uncond_skip(pipe, batch_probe, cache_first: bool):
    """CogVideoX's batched CFG under FasterCache with unconditional-batch skipping: on every other step the
    cache's hook cuts the batch-2 input down to the conditional half before the forward runs."""
    from diffusers import FasterCacheConfig

    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 0),  # attention always runs
        unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 901),
        attention_weight_callback=lambda _: 0.5, is_guidance_distilled=False,
        current_timestep_callback=lambda: pipe.current_timestep,
    )
    if cache_first:
        pipe.transformer.enable_cache(config)
        diffattn.apply(pipe, "batch_probe")
    else:
        diffattn.apply(pipe, "batch_probe")
        pipe.transformer.enable_cache(config)
    try:
        tvp.run_tiny_cogvideox(pipe, steps=4, output_type="latent")
    finally:
        diffattn.remove(pipe)
        pipe.transformer.disable_cache()
    assert {q_batch for _, _, q_batch in batch_probe} == {1, 2}, "the cache must skip the unconditional half"
    return [(ctx_batch, q_batch) for _, ctx_batch, q_batch in batch_probe]


@pytest.mark.parametrize("cache_first", [False, True], ids=["apply_then_cache", "cache_then_apply"])
def test_context_batch_under_fastercache(batch_probe, cache_first):
    """The context hook must sit inside FasterCache's denoiser hook in either order, so that it reads the batch the
    attention really runs on (it read the uncut batch-2 inputs when enable_cache() ran first; fixed in 3e83baa)."""
    pipe = tvp.build_tiny_cogvideox_pipeline()
    pairs = _fastercache_uncond_skip(pipe, batch_probe, cache_first=cache_first)
    assert all(ctx == q for ctx, q in pairs), pairs

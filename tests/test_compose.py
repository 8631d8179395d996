"""Composition: an attention method + softpag through `diffattn.apply(pipe, [...])`, any method + a Diffusers cache
hook, and clear errors where two methods cannot share a layer."""

from __future__ import annotations

import pytest
import torch

import diffattn
from diffattn.api import installed
from diffattn.call import AttentionCall, LayerInfo
from diffattn.compose import ComposedMethod, cache_config, check_cache, compose, enable_cache
from diffattn.context import TokenGrid

import tiny
from tiny_pipelines import build_tiny_wan_pipeline

RADIAL = dict(block_size=16, dense_layers=0, dense_timesteps=0, decay_factor=0.2)


def run_tiny_wan(pipe, steps: int = 2, seed: int = 0):
    """9 frames of 64x96 pixels: 3 latent frames of 4x6 tokens (72 tokens, 5 blocks of 16), where radial's mask is
    sparse (at the default tiny size it covers every block)."""
    return pipe(
        prompt="a red circle moving left", negative_prompt="blue square", height=64, width=96, num_frames=9,
        num_inference_steps=steps, guidance_scale=5.0, max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).frames


@pytest.fixture(scope="module")
def wan_pipe():
    return build_tiny_wan_pipeline()


def _call(grid: TokenGrid, heads: int = 4, d: int = 16, layer: int = 0) -> AttentionCall:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, grid.num_tokens, d, generator=gen) for _ in range(3))
    info = LayerInfo(index=layer, slot="attn1", path=f"blocks.{layer}.attn1", role="self", num_layers=2)
    return AttentionCall(q, k, v, info, "self", None, grid=grid)


def test_softpag_on_radial_blends_the_sparse_map():
    """Chosen heads: (1 - u) * radial + u * target (identity: P v = v); other heads: radial's output exactly."""
    spec, config = compose(["radial", "softpag"], {**RADIAL, "heads": "L0H1,L0H3", "u": 0.6, "guidance": "off"})
    method = spec.build(config)
    assert isinstance(method, ComposedMethod) and spec.name == "radial+softpag"
    call = _call(TokenGrid(4, 4, 5))
    radial_out = method.attention.attend(call)
    dense = torch.nn.functional.scaled_dot_product_attention(call.q, call.k, call.v)
    assert (radial_out - dense).abs().max() > 1e-3, "the radial mask must be sparse here"
    out = method.attend(call)
    for h in range(4):
        want = torch.lerp(radial_out[:, h], call.v[:, h], 0.6) if h in (1, 3) else radial_out[:, h]
        torch.testing.assert_close(out[:, h], want, rtol=1e-5, atol=1e-6)


def test_apply_a_composition_on_a_pipeline(wan_pipe):
    """Installed as one runtime; differs from each method alone; remove restores stock."""
    ref = run_tiny_wan(wan_pipe, steps=2)
    diffattn.apply(wan_pipe, "radial", **RADIAL)
    radial_only = run_tiny_wan(wan_pipe, steps=2)
    diffattn.apply(wan_pipe, ["radial", "softpag"], radial=RADIAL, softpag={"heads": "L1", "scale": 2.0})
    state = installed(wan_pipe.transformer)
    assert state.method == "radial+softpag" and set(state.options) == {"radial", "softpag"}
    both = run_tiny_wan(wan_pipe, steps=2)
    diffattn.apply(wan_pipe, "softpag", heads="L1", scale=2.0)
    softpag_only = run_tiny_wan(wan_pipe, steps=2)
    diffattn.remove(wan_pipe)
    after = run_tiny_wan(wan_pipe, steps=2)
    assert torch.isfinite(both).all()
    assert (both - radial_only).abs().max() > 1e-4 and (both - softpag_only).abs().max() > 1e-4
    assert torch.equal(after, ref)


@pytest.mark.parametrize(
    "methods,options,word",
    [
        (["radial", "gna"], {}, "cannot share a layer"),
        (["freeswim", "softpag"], {}, "change the forward's batch"),
        (["radial", "radial"], {}, "twice"),
        (["softpag"] * 1 + ["dense"], {"block_size": 16}, "unknown option 'block_size'"),
        (["radial", "softpag"], {"radial": 3}, "as a dict"),
        (["softpag", "softpag"], {}, "twice"),
    ],
)
def test_compositions_that_cannot_share_a_layer(methods, options, word):
    with pytest.raises(ValueError, match=word):
        compose(methods, options)


def test_ambiguous_option_must_be_given_per_method(monkeypatch):
    """`dense_timesteps` is an option of both radial and gna: named per method, it is accepted."""
    import dataclasses

    from diffattn import compose as compose_module

    real = compose_module.get_method  # gna posing as a guidance method, so that the pair composes

    def get_method(name):
        spec = real(name)
        return dataclasses.replace(spec, role="guidance") if name == "gna" else spec

    monkeypatch.setattr(compose_module, "get_method", get_method)
    with pytest.raises(ValueError, match="several composed methods"):
        compose(["radial", "gna"], {"dense_timesteps": 2, "kernel_size": 3})


def test_families_are_intersected():
    model, _ = tiny.BUILDERS["flux"]()
    with pytest.raises(ValueError, match="does not support"):
        diffattn.apply(model, ["radial", "softpag"], heads="L0")


def _steps_seen(pipe, cache: str | None, **cache_options) -> tuple[list[int], torch.Tensor]:
    """Denoising step of every layer-0 self-attention call (cond pass) and the output, with an optional cache."""
    seen: list[int] = []
    method = installed(pipe.transformer).runtime
    original = method.attend

    def attend(call):
        if call.role == "self" and call.layer.index == 0 and call.context.pass_name == "cond":
            seen.append(call.context.step_index)
        return original(call)

    method.attend = attend
    if cache is not None:
        enable_cache(pipe, cache, method="radial", **cache_options)
    try:
        out = run_tiny_wan(pipe, steps=4)
    finally:
        if cache is not None:
            pipe.transformer.disable_cache()
        del method.attend
    return seen, out


def test_radial_with_first_block_cache(wan_pipe):
    """FirstBlockCache skips the later blocks, never the first: layer 0 still sees every step, numbered by the
    pipeline's steps (not by counted calls); threshold 0 never skips and gives radial's output exactly."""
    diffattn.apply(wan_pipe, "radial", **{**RADIAL, "dense_timesteps": 1})
    try:
        seen_plain, plain = _steps_seen(wan_pipe, None)
        seen_zero, zero = _steps_seen(wan_pipe, "fbc", threshold=0.0)
        seen_skip, skipping = _steps_seen(wan_pipe, "fbc", threshold=10.0)
    finally:
        diffattn.remove(wan_pipe)
    assert seen_plain == seen_zero == seen_skip == [0, 1, 2, 3]
    assert torch.equal(zero, plain)
    assert torch.isfinite(skipping).all() and (skipping - plain).abs().max() > 1e-5, "threshold 10 must skip blocks"


def test_radial_with_taylorseer(wan_pipe):
    diffattn.apply(wan_pipe, "radial", **RADIAL)
    try:
        seen, out = _steps_seen(wan_pipe, "taylorseer", cache_interval=2, disable_cache_before_step=1)
    finally:
        diffattn.remove(wan_pipe)
    assert torch.isfinite(out).all()
    assert seen and all(a < b for a, b in zip(seen, seen[1:])) and set(seen) <= {0, 1, 2, 3}


def test_cache_errors():
    with pytest.raises(ValueError, match="cache must be one of"):
        cache_config("teacache")
    with pytest.raises(ValueError, match="cannot be combined with a Diffusers cache"):
        check_cache(["freeswim"])
    assert type(cache_config("fbc", threshold=0.1)).__name__ == "FirstBlockCacheConfig"


RECTIFIED = dict(block_size=16, tau=0.3, sa_drop_rate=0.8, dense_layers=0, dense_timesteps=1)


def _rectified_both_orders(pipe, methods, options, cache: str | None = None, **cache_options):
    """The pipeline's output with rectified running each forward in its token order, and with the token-stream hooks
    taken off (every layer gathers): a cache or a guidance method composed with it must not see the difference."""
    from diffattn.token_order import remove_token_stream

    outs = []
    for keep_model_order in (False, True):
        diffattn.apply(pipe, methods, **options)
        try:
            if keep_model_order:
                remove_token_stream(pipe.transformer)
            if cache is not None:
                enable_cache(pipe, cache, method="rectified", **cache_options)
            outs.append(run_tiny_wan(pipe, steps=4))
        finally:
            if cache is not None:
                pipe.transformer.disable_cache()
            diffattn.remove(pipe)
    return outs


@pytest.mark.parametrize("cache,options", [("fbc", dict(threshold=10.0)),
                                           ("taylorseer", dict(cache_interval=2, disable_cache_before_step=1))])
def test_rectified_token_order_with_caches(wan_pipe, cache, options):
    """Caches reuse block outputs across steps (a dense warm-up step included): one token order throughout."""
    ordered, per_layer = _rectified_both_orders(wan_pipe, "rectified", RECTIFIED, cache, **options)
    assert torch.isfinite(ordered).all()
    torch.testing.assert_close(ordered, per_layer, rtol=1e-4, atol=1e-4)


def test_rectified_token_order_with_softpag(wan_pipe):
    """SoftPAG's perturbed rows and head blend follow the forward's token order."""
    opts = {**RECTIFIED, "heads": "L0H1,L1H0", "u": 0.6}
    ordered, per_layer = _rectified_both_orders(wan_pipe, ["rectified", "softpag"], opts)
    plain, _ = _rectified_both_orders(wan_pipe, "rectified", RECTIFIED)
    assert (ordered - plain).abs().max() > 1e-5, "softpag must change the output"
    torch.testing.assert_close(ordered, per_layer, rtol=1e-4, atol=1e-4)


def test_two_compositions_in_one_process():
    """Each composition has its own config class (a spec stamps its name on it): radial+softpag, then
    rectified+softpag, then radial+softpag again, in one process."""
    for att in ("radial", "rectified", "radial"):
        spec, config = compose([att, "softpag"], {"heads": "L0H1"})
        assert spec.name == f"{att}+softpag" and type(config).method_name == spec.name
        assert isinstance(config, spec.config_cls)

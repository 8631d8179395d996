"""SoftPAG guidance: the combined prediction's algebra against eps_u, eps_c, eps_ptb computed by hand, batched and
separate perturbed passes, the step window, the adaptive scale, and parity with Diffusers' PAG pipelines."""

from __future__ import annotations

import pytest
import torch
from tiny import BUILDERS, output_of
from tiny_image_pipelines import (
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sd_pipeline,
    run_tiny_flux,
    run_tiny_sd,
    run_tiny_sd3,
)
from tiny_pipelines import build_tiny_wan_pipeline, run_tiny_wan

import diffattn
from diffattn.api import installed

S = 2.5  # perturbed-guidance scale used throughout


def eps(model, inputs, **softpag):
    """The model's output with softpag options (guidance="off": perturbation only), or stock without options."""
    if softpag:
        diffattn.apply(model, "softpag", **softpag)
    try:
        return output_of(model, inputs)
    finally:
        diffattn.remove(model)


def rows(inputs, sl):
    return {k: v[sl] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 2 else v for k, v in inputs.items()}


# ---- model level ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [True, False])
def test_batched_cfg_forward_algebra(batched):
    """SD3 bare model, one [uncond; cond] forward (same latents, different text): both rows get s (eps_c - eps_ptb)."""
    model, make_inputs = BUILDERS["sd3"]()
    inputs = make_inputs(batch=2)
    inputs["hidden_states"] = inputs["hidden_states"][:1].repeat(2, 1, 1, 1)
    perturb = dict(heads="L1H0,L2", u=0.7, target="identity", scope="full")
    stock = eps(model, inputs)
    eps_u, eps_c = stock[:1], stock[1:]
    eps_ptb = eps(model, rows(inputs, slice(1, 2)), guidance="off", **perturb)
    got = eps(model, inputs, guidance="on", scale=S, batched=batched, **perturb)
    assert (got[:1] - (eps_u + S * (eps_c - eps_ptb))).abs().max() < 1e-5
    assert (got[1:] - (eps_c + S * (eps_c - eps_ptb))).abs().max() < 1e-5
    g = 4.0
    combined = got[:1] + g * (got[1:] - got[:1])
    assert (combined - (eps_u + g * (eps_c - eps_u) + S * (eps_c - eps_ptb))).abs().max() < 1e-4
    # cfg=False: the same batch is two conditional rows, each guided by its own perturbed row
    both_ptb = eps(model, inputs, guidance="off", **perturb)
    got = eps(model, inputs, guidance="on", scale=S, batched=batched, cfg=False, **perturb)
    assert (got - (stock + S * (stock - both_ptb))).abs().max() < 1e-5


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_named_separate_passes_algebra(batched, family):
    """Bare model, cond then uncond under cache_context: both outputs are shifted by the cond pass's s Delta."""
    model, make_inputs = BUILDERS[family]()
    inputs = make_inputs(batch=1)
    uncond = dict(inputs, encoder_hidden_states=torch.randn(inputs["encoder_hidden_states"].shape,
                                                            generator=torch.Generator().manual_seed(5)))
    perturb = dict(heads="L0H1,L1", u=0.5, target="mean_q")
    eps_c, eps_u = eps(model, inputs), eps(model, uncond)
    eps_ptb = eps(model, inputs, guidance="off", **perturb)
    diffattn.apply(model, "softpag", guidance="on", scale=S, batched=batched, **perturb)
    try:
        with model.cache_context("cond"):
            got_c = output_of(model, inputs)
        with model.cache_context("uncond"):
            got_u = output_of(model, uncond)
    finally:
        diffattn.remove(model)
    shift = S * (eps_c - eps_ptb)
    assert (got_c - (eps_c + shift)).abs().max() < 1e-5
    assert (got_u - (eps_u + shift)).abs().max() < 1e-5


def test_uncond_before_cond_is_an_error():
    model, make_inputs = BUILDERS["wan"]()
    diffattn.apply(model, "softpag", heads="L0", guidance="on")
    try:
        with model.cache_context("uncond"), pytest.raises(RuntimeError, match="must come first"):
            output_of(model, make_inputs())
    finally:
        diffattn.remove(model)


# ---- pipelines: what the guided forward returns, against the pipeline's transformer run by hand ----------------
def capture_first_calls(model, count):
    """Record the kwargs and outputs of the first `count` forwards of `model` (as the pipeline calls it)."""
    calls = []

    def pre(module, args, kwargs):
        if len(calls) < count:
            names = ("sample", "timestep", "encoder_hidden_states")[: len(args)]  # the UNet is called positionally
            calls.append({"kwargs": {**dict(zip(names, args)), **kwargs}})

    def post(module, args, kwargs, output):
        for call in calls:
            if "out" not in call:
                call["out"] = output[0].detach().clone()
                break

    return calls, [model.register_forward_pre_hook(pre, with_kwargs=True),
                   model.register_forward_hook(post, with_kwargs=True)]


def call_model(model, kwargs, **softpag):
    if softpag:
        diffattn.apply(model, "softpag", **softpag)
    try:
        with torch.no_grad():
            return model(**kwargs)[0]
    finally:
        diffattn.remove(model)


@pytest.mark.parametrize("kind", ["sd3", "sd", "flux"])
def test_pipeline_step_against_manual_eps(kind):
    build, run, component, g = {
        "sd3": (build_tiny_sd3_pipeline, run_tiny_sd3, "transformer", 4.0),
        "sd": (build_tiny_sd_pipeline, run_tiny_sd, "unet", 5.0),
        "flux": (build_tiny_flux_pipeline, run_tiny_flux, "transformer", 3.5),
    }[kind]
    pipe = build()
    model = getattr(pipe, component)
    perturb = dict(heads="L1H1,L0", u=0.8, target="identity", scope="image")
    diffattn.apply(pipe, "softpag", scale=S, **perturb)
    calls, handles = capture_first_calls(model, 1)
    try:
        run(pipe, steps=2, guidance=g, output_type="latent")
    finally:
        for h in handles:
            h.remove()
        diffattn.remove(pipe)
    kwargs, got = calls[0]["kwargs"], calls[0]["out"]
    stock = call_model(model, kwargs)
    if kind == "flux":  # FLUX-dev: one conditional forward, no CFG
        ptb = call_model(model, kwargs, guidance="off", **perturb)
        assert (got - (stock + S * (stock - ptb))).abs().max() < 1e-5
        return
    n = stock.shape[0] // 2
    cond = {k: v[n:] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 2 * n else v for k, v in kwargs.items()}
    ptb = call_model(model, cond, guidance="off", **perturb)
    shift = S * (stock[n:] - ptb)
    assert (got[:n] - (stock[:n] + shift)).abs().max() < 1e-5
    assert (got[n:] - (stock[n:] + shift)).abs().max() < 1e-5


def test_wan_pipeline_separate_cfg_passes():
    pipe = build_tiny_wan_pipeline()
    perturb = dict(heads="L1", u=1.0, scale=S)
    calls, handles = capture_first_calls(pipe.transformer, 2)  # step 0: cond, then uncond
    diffattn.apply(pipe, "softpag", **perturb)
    try:
        batched = run_tiny_wan(pipe, steps=2)
    finally:
        for h in handles:
            h.remove()
    diffattn.apply(pipe, "softpag", batched=False, **perturb)
    separate = run_tiny_wan(pipe, steps=2)
    diffattn.apply(pipe, "softpag", heads="L1", scale=0.0)
    no_guidance = run_tiny_wan(pipe, steps=2)
    diffattn.remove(pipe)
    stock = run_tiny_wan(pipe, steps=2)
    assert (batched - separate).abs().max() < 1e-5
    assert torch.equal(no_guidance, stock)
    assert (batched - stock).abs().max() > 1e-4
    model = pipe.transformer
    eps_c, eps_u = call_model(model, calls[0]["kwargs"]), call_model(model, calls[1]["kwargs"])
    ptb = call_model(model, calls[0]["kwargs"], guidance="off", heads="L1", u=1.0)
    shift = S * (eps_c - ptb)
    assert (calls[0]["out"] - (eps_c + shift)).abs().max() < 1e-5
    assert (calls[1]["out"] - (eps_u + shift)).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_batched_equals_separate(kind):
    build, run = {"sd3": (build_tiny_sd3_pipeline, run_tiny_sd3), "flux": (build_tiny_flux_pipeline, run_tiny_flux)}[kind]
    pipe = build()
    options = dict(heads="L0H1,L2", u=0.5, target="uniform", scale=S, adaptive_scale=0.001)
    diffattn.apply(pipe, "softpag", **options)
    batched = run(pipe, steps=3, output_type="latent")
    diffattn.apply(pipe, "softpag", batched=False, **options)
    separate = run(pipe, steps=3, output_type="latent")
    diffattn.remove(pipe)
    stock = run(pipe, steps=3, output_type="latent")
    assert (batched - separate).abs().max() < 1e-5
    assert (batched - stock).abs().max() > 1e-4


# ---- step window and adaptive scale -----------------------------------------------------------------------------
def record_states(pipe, model):
    """Per forward: (step, timestep, s_t, perturbed rows, batch the attention sees), read from the attention calls."""
    runtime = installed(model).runtime
    original = runtime.attend
    states, seen = [], []  # contexts kept alive, so that ids are not reused

    def attend(call):
        ctx = call.context
        if not any(ctx is other for other in seen):
            seen.append(ctx)
            state = ctx.extras["softpag"]
            states.append((ctx.step_index, ctx.timestep, state.scale, state.rows, call.q.shape[0]))
        return original(call)

    runtime.attend = attend
    return states


def test_step_window():
    pipe = build_tiny_sd3_pipeline()
    diffattn.apply(pipe, "softpag", heads="L1", scale=S, start=0.25, end=0.75)
    states = record_states(pipe, pipe.transformer)
    run_tiny_sd3(pipe, steps=4, output_type="latent")
    assert [s[0] for s in states] == [0, 1, 2, 3]
    assert [s[2] > 0 for s in states] == [False, True, True, False]
    assert [s[4] for s in states] == [2, 3, 3, 2]  # perturbed row appended only inside the window
    # no active step at all: exactly the stock result
    diffattn.apply(pipe, "softpag", heads="L1", scale=S, start=0.9, end=1.0)
    inactive = run_tiny_sd3(pipe, steps=3, output_type="latent")
    diffattn.remove(pipe)
    assert torch.equal(inactive, run_tiny_sd3(pipe, steps=3, output_type="latent"))


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_adaptive_scale(kind):
    build, run, component = {"sd": (build_tiny_sd_pipeline, run_tiny_sd, "unet"),
                             "flux": (build_tiny_flux_pipeline, run_tiny_flux, "transformer")}[kind]
    pipe = build()
    diffattn.apply(pipe, "softpag", heads="L1", scale=S, adaptive_scale=0.004)
    states = record_states(pipe, getattr(pipe, component))
    run(pipe, steps=3, output_type="latent")
    diffattn.remove(pipe)
    assert len(states) == 3
    for _, timestep, scale, _, _ in states:
        t = timestep * 1000 if kind == "flux" else timestep
        assert scale == pytest.approx(max(0.0, S - 0.004 * (1000 - t)))
    assert states[0][2] > 0 and states[-1][2] == 0.0  # the last step's t is low enough to switch it off


# ---- parity with Diffusers PAG ---------------------------------------------------------------------------------
# Diffusers' layer names -> diffattn layer index: SD3 "blocks.1" -> L1 (block index); the tiny SD UNet's "mid" -> L3
# (BasicTransformerBlocks in named_modules() order: down_blocks.0 (0), up_blocks.1 (1, 2), mid_block (3)).
@pytest.mark.parametrize("kind", ["sd3", "sd"])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
@pytest.mark.parametrize("batched", [True, False])
def test_parity_with_diffusers_pag(kind, guidance, batched):
    build, run, pag_layer, ours, adaptive = {
        "sd3": (build_tiny_sd3_pipeline, run_tiny_sd3, "blocks.1", "L1", 0.0),
        "sd": (build_tiny_sd_pipeline, run_tiny_sd, "mid", "L3", 0.002),
    }[kind]
    pag = build(pag=True, pag_applied_layers=[pag_layer])
    expected = run(pag, guidance=guidance, pag_scale=S, pag_adaptive_scale=adaptive, output_type="latent")
    pipe = build()
    stock = run(pipe, guidance=guidance, output_type="latent")
    diffattn.apply(pipe, "softpag", heads=ours, u=1.0, target="identity", scope="image", scale=S,
                   adaptive_scale=adaptive, batched=batched)
    got = run(pipe, guidance=guidance, output_type="latent")
    assert (got - expected).abs().max() <= 1e-4
    assert (stock - expected).abs().max() > 1e-2  # PAG does change the result


def test_unnamed_repeated_timestep_is_guided_again():
    """Second-order solvers call the model twice at one t: each unnamed forward is conditional and guided alone."""
    model, make_inputs = BUILDERS["flux"]()
    inputs = make_inputs(batch=1)
    diffattn.apply(model, "softpag", heads="L2", guidance="on", scale=S)
    try:
        first, second = output_of(model, inputs), output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert installed(model) is None and torch.equal(first, second)


def test_bound_pipeline_gives_the_same_result():
    """apply() on a pipeline binds it (CFG read from the pipeline); unbound, CFG is detected from the latent halves."""
    pipe = build_tiny_sd3_pipeline()
    diffattn.apply(pipe, "softpag", heads="L1H2", u=0.5, scale=S)
    runtime = installed(pipe.transformer).runtime
    assert runtime._pipeline() is pipe
    bound = run_tiny_sd3(pipe, steps=2, output_type="latent")
    runtime._pipeline = None
    detected = run_tiny_sd3(pipe, steps=2, output_type="latent")
    diffattn.remove(pipe)
    assert torch.equal(detected, bound)


@pytest.mark.parametrize("batched", [True, False])
def test_sdxl_unet_added_cond_kwargs(batched):
    """SDXL's `added_cond_kwargs` (text_embeds, time_ids) are split/duplicated with the rows (a nested dict)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=24, attention_head_dim=(2, 4), norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(1, 4, 12, 20, generator=g).repeat(2, 1, 1, 1), "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(2, 7, 24, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 12, generator=g), "time_ids": torch.randn(2, 6, generator=g)},
    }
    cond = {k: v[1:] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in inputs.items()}
    cond["added_cond_kwargs"] = {k: v[1:] for k, v in inputs["added_cond_kwargs"].items()}
    perturb = dict(heads="L1H1,L6", u=0.7)
    stock = eps(model, inputs)
    ptb = eps(model, cond, guidance="off", **perturb)
    got = eps(model, inputs, guidance="on", scale=S, batched=batched, **perturb)
    assert (got - (stock + S * (stock[1:] - ptb))).abs().max() < 1e-5

"""`radial` through the adapters: the block-sparse path equals a token-level masked-SDPA reference built
independently from the same block mask, warm-up steps and dense layers behave, and errors are clear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn.methods import radial as radial_module

import tiny
import tiny_pipelines as tp


def token_level_reference(call, block_mask, block_size):
    """Masked SDPA over a token mask expanded from the block mask: video x video from the mask, video x text by
    the padding, text rows dense over valid keys. Independent of the kernel and of block_masked_attention."""
    b, h, s, d = call.q.shape
    vis, txt = call.visual_slice(), call.text_slice()
    nv = vis.stop - vis.start
    expanded = block_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:nv, :nv]
    keep = torch.zeros(b, s, s, dtype=torch.bool)
    pad = call.key_padding if call.key_padding is not None else torch.ones(b, s, dtype=torch.bool)
    keep[:, vis, vis] = expanded.cpu()
    keep[:, vis, txt] = pad[:, None, txt]
    keep[:, txt, :] = pad[:, None, :]
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=keep[:, None], scale=call.scale)


CASES = {
    # family: (inputs, options) with grids that make the mask sparse at block 16
    "wan": (dict(frames=4, height=8, width=10), dict(block_size=16, decay_factor=0.5)),
    "wan_i2v": (dict(frames=4, height=8, width=10, text=512), dict(block_size=16, decay_factor=0.5)),
    "hunyuan_video": (dict(frames=4, height=8, width=10), dict(block_size=16)),
    "cogvideox": (dict(frames=4, height=8, width=10), dict(block_size=16, decay_factor=0.5)),
}


@pytest.mark.parametrize("family", list(CASES))
def test_radial_matches_token_level_reference(family, monkeypatch):
    inputs_kw, options = CASES[family]
    model, make_inputs = tiny.BUILDERS[family]()
    inputs = make_inputs(batch=2, **inputs_kw)
    dense = tiny.output_of(model, inputs)
    diffattn.apply(model, "radial", dense_timesteps=0, dense_layers=0, **options)
    try:
        fast = tiny.output_of(model, inputs)
        method = diffattn.api.installed(model).runtime
        assert method._masks, "no mask was built: the sparse path did not run"
        mask = next(iter(method._masks.values()))
        assert 0.3 < mask.float().mean().item() < 1.0, "the test geometry must give a sparse mask"
        monkeypatch.setattr(radial_module, "block_masked_attention", token_level_reference)
        ref = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert (fast - ref).abs().max().item() <= 1e-5
    assert (fast - dense).abs().max().item() > 1e-4, "radial must differ from dense on a sparse mask"


def test_dense_layers_and_steps_make_it_dense():
    model, make_inputs = tiny.BUILDERS["wan"]()
    inputs = make_inputs(batch=1, frames=4, height=8, width=10)
    dense = tiny.output_of(model, inputs)
    for opts in (dict(dense_layers=2, dense_timesteps=0), dict(dense_layers=0, dense_timesteps=1)):
        diffattn.apply(model, "radial", block_size=16, **opts)
        try:
            out = tiny.output_of(model, inputs)  # a bare forward is step 0
        finally:
            diffattn.remove(model)
        assert (out - dense).abs().max().item() <= 1e-6, opts


@pytest.fixture(scope="module")
def wan_pipe():
    return tp.build_tiny_wan_pipeline()


def _run(pipe, steps=3):
    # 9 frames of 64x64 pixels: latent 3x8x8, 3 frames of 4x4 tokens, 3 blocks of 16 tokens
    return pipe(
        prompt="a red circle", negative_prompt="blue", height=64, width=64, num_frames=9, num_inference_steps=steps,
        guidance_scale=5.0, max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="pt",
    ).frames


def test_warmup_steps_in_a_pipeline(wan_pipe):
    dense = _run(wan_pipe)
    diffattn.apply(wan_pipe, "radial", block_size=16, dense_layers=0, dense_timesteps=3)
    all_dense = _run(wan_pipe)
    diffattn.apply(wan_pipe, "radial", block_size=16, dense_layers=0, dense_timesteps=1)
    sparse_after_1 = _run(wan_pipe)
    diffattn.apply(wan_pipe, "radial", block_size=16, dense_layers=0, dense_timesteps=1, dense_last_steps=2)
    dense_again = _run(wan_pipe)
    diffattn.remove(wan_pipe)
    assert (all_dense - dense).abs().max().item() <= 1e-5
    assert (dense_again - dense).abs().max().item() <= 1e-5
    assert (sparse_after_1 - dense).abs().max().item() > 1e-5


def test_radial_errors_are_clear():
    flux, _ = tiny.BUILDERS["flux"]()
    with pytest.raises(ValueError, match="it supports the families: wan, hunyuan_video, cogvideox"):
        diffattn.apply(flux, "radial")
    model, make_inputs = tiny.BUILDERS["wan"]()
    with pytest.raises(ValueError, match=r"'block_size'.*one of 16, 32, 64, 128"):
        diffattn.apply(model, "radial", block_size=100)
    with pytest.raises(ValueError, match=r"'decay_factor'.*expected"):
        diffattn.apply(model, "radial", decay_factor=-1.0)


def test_processor_without_context():
    """Installed by hand: the grid comes from the constructor, and warm-up steps are refused clearly."""
    from diffattn.processors import WanProcessor

    model, make_inputs = tiny.BUILDERS["wan"]()
    inputs = make_inputs(batch=1, frames=4, height=8, width=10)
    stock = dict(model.attn_processors)
    model.set_attn_processor(WanProcessor("radial", grid=(4, 4, 5), block_size=16, dense_layers=0))
    try:
        with pytest.raises(RuntimeError, match="dense warm-up steps need the denoising step"):
            tiny.output_of(model, inputs)
        model.set_attn_processor(
            WanProcessor("radial", grid=(4, 4, 5), block_size=16, dense_layers=0, dense_timesteps=0)
        )
        out = tiny.output_of(model, inputs)
        model.set_attn_processor(WanProcessor("radial", block_size=16, dense_layers=0, dense_timesteps=0))
        with pytest.raises(RuntimeError, match="needs the token grid"):
            tiny.output_of(model, inputs)
    finally:
        model.set_attn_processor(stock)
    diffattn.apply(model, "radial", block_size=16, dense_layers=0, dense_timesteps=0)
    ref = tiny.output_of(model, inputs)
    diffattn.remove(model)
    assert (out - ref).abs().max().item() <= 1e-6


def test_gradient_checkpointing_recompute_sees_the_context():
    """Checkpointed blocks re-run in backward, after the forward returned; they must still find the context."""
    model, make_inputs = tiny.BUILDERS["wan"]()
    inputs = make_inputs(batch=1, frames=4, height=8, width=10)
    diffattn.apply(model, "radial", block_size=16, dense_layers=0, dense_timesteps=0)
    try:
        grads = []
        for checkpointing in (False, True):
            model.zero_grad(set_to_none=True)
            if checkpointing:
                model.enable_gradient_checkpointing()
            model.train()
            model(**inputs, return_dict=False)[0].square().mean().backward()
            grads.append(model.blocks[1].attn1.to_q.weight.grad.clone())
            model.disable_gradient_checkpointing()
            model.eval()
    finally:
        diffattn.remove(model)
        model.requires_grad_(False)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

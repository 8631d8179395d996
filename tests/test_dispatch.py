"""diffattn methods as Diffusers attention backends (`via="dispatcher"`): same outputs as the adapter route on the
families diffattn knows, methods on models without an adapter (LTX-Video, Qwen-Image), exact removal, clear refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn.dispatch import DispatchInstall, Layout, register_backend
from diffattn.masks import radial_mask
from tiny import roundtrip, tiny_flux, tiny_hunyuan_video, tiny_unet, tiny_wan

RADIAL = dict(block_size=16, dense_timesteps=0, dense_layers=0, decay_factor=0.5, sink=True)

CASES = {
    "wan": (tiny_wan, dict(frames=4, height=10, width=14), [
        ("dense", {}), ("radial", RADIAL), ("gna", dict(kernel_size=(3, 3, 3))),
        ("freeswim", dict(dual_path=False, base_height=64, base_width=64)), ("softpag", dict(heads="L0H1,L1", u=0.7)),
    ]),
    "flux": (tiny_flux, dict(height=6, width=7), [
        ("dense", {}), ("gna", dict(kernel_size=(3, 3))), ("softpag", dict(heads="L0H1,L2", u=0.7)),
    ]),
    "hunyuan_video": (tiny_hunyuan_video, dict(frames=4, height=10, width=14), [
        ("dense", {}), ("radial", RADIAL), ("gna", dict(kernel_size=(3, 3, 3))),
    ]),
}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("family", list(CASES))
def test_dispatcher_route_equals_adapter_route(family):
    build, kwargs, methods = CASES[family]
    model, make_inputs = build()
    inputs = make_inputs(batch=2, **kwargs)
    stock = _run(model, inputs)
    for method, options in methods:
        diffattn.apply(model, method, **options)
        adapter = _run(model, inputs)
        diffattn.apply(model, method, via="dispatcher", **options)
        procs = {type(p).__name__ for p in model.attn_processors.values()}
        assert not any(name.startswith("Diffattn") or "diffattn" in name.lower() for name in procs), procs
        dispatched = _run(model, inputs)
        diffattn.remove(model)
        after = _run(model, inputs)
        assert torch.equal(dispatched, adapter), (family, method, (dispatched - adapter).abs().max())
        assert torch.equal(after, stock), (family, method)
        if method == "dense":
            assert torch.equal(dispatched, stock)
        else:
            assert (dispatched - stock).abs().max() > 1e-3, f"{method} had no effect on {family}"


def test_wan22_5b_shape_dispatcher_equals_adapter():
    """Wan 2.2 TI2V-5B's layout (48 latent channels, per-token timesteps as its pipeline passes them) at tiny width."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = roundtrip(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
        text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64,
    ))
    gen = torch.Generator().manual_seed(3)
    tokens = 3 * 5 * 6
    timestep = torch.full((1, tokens), 700.0)
    timestep[:, :30] = 0.0  # the conditioning frame, as Wan 2.2 TI2V does
    inputs = {
        "hidden_states": torch.randn(1, 48, 3, 10, 12, generator=gen), "timestep": timestep,
        "encoder_hidden_states": torch.randn(1, 5, 24, generator=gen),
    }
    diffattn.apply(model, "radial", **RADIAL)
    adapter = _run(model, inputs)
    diffattn.apply(model, "radial", via="dispatcher", **RADIAL)
    dispatched = _run(model, inputs)
    diffattn.remove(model)
    assert torch.equal(adapter, dispatched)


# ---- models without an adapter -------------------------------------------------------------------------------------
def tiny_ltx():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = roundtrip(LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=24,
    ))

    def make_inputs(batch=1, frames=4, height=6, width=5, text=7):
        gen = torch.Generator().manual_seed(2)
        mask = torch.ones(batch, text, dtype=torch.long)
        mask[:, -2:] = 0
        return {
            "hidden_states": torch.randn(batch, frames * height * width, 8, generator=gen),
            "encoder_hidden_states": torch.randn(batch, text, 24, generator=gen),
            "timestep": torch.full((batch,), 500, dtype=torch.long), "encoder_attention_mask": mask,
            "num_frames": frames, "height": height, "width": width,
        }

    return model, make_inputs


def tiny_qwen_image():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = roundtrip(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
    ))

    def make_inputs(batch=1, height=6, width=7, text=5):
        gen = torch.Generator().manual_seed(4)
        return {
            "hidden_states": torch.randn(batch, height * width, 16, generator=gen),
            "encoder_hidden_states": torch.randn(batch, text, 24, generator=gen),
            "encoder_hidden_states_mask": torch.ones(batch, text, dtype=torch.long),
            "timestep": torch.full((batch,), 0.5), "img_shapes": [[(1, height, width)]] * batch,
        }

    return model, make_inputs


def _reference_radial_backend(grid, options):
    """Masked SDPA with the radial block mask expanded to tokens, on calls over exactly the video tokens: an
    independent reference of radial on a model diffattn has no adapter for."""
    frames, tpf = grid[0], grid[1] * grid[2]
    block = radial_mask(frames, tpf, block_size=options["block_size"], decay_factor=options["decay_factor"], sink=True)
    n = frames * tpf
    dense = block.repeat_interleave(options["block_size"], 0).repeat_interleave(options["block_size"], 1)[:n, :n]

    def backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        if q.shape[2] == k.shape[2] == n:
            attn_mask = dense
        elif attn_mask is not None and attn_mask.ndim == 2:
            attn_mask = attn_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).transpose(1, 2)

    return backend


def test_ltx_video_dispatcher():
    from diffusers.models.attention_dispatch import attention_backend

    model, make_inputs = tiny_ltx()
    inputs = make_inputs(batch=2)
    stock = _run(model, inputs)
    diffattn.apply(model, "dense", via="dispatcher")
    assert torch.equal(_run(model, inputs), stock)

    diffattn.apply(model, "radial", via="dispatcher", **RADIAL)
    sparse = _run(model, inputs)
    diffattn.remove(model)
    register_backend("diffattn_test_reference_radial", _reference_radial_backend((4, 6, 5), RADIAL))
    with attention_backend("diffattn_test_reference_radial"):
        reference = _run(model, inputs)
    assert (sparse - stock).abs().max() > 1e-3
    torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(_run(model, inputs), stock)


def test_ltx_geometry_seen_by_the_method(monkeypatch, spy):
    """What the backend hands the method: layer index from the block, role from the shapes, grid from num_frames/
    height/width and the patch size."""
    from diffattn import dispatch

    monkeypatch.setattr(dispatch, "DISPATCH_METHODS", (*dispatch.DISPATCH_METHODS, "spy"))
    model, make_inputs = tiny_ltx()
    inputs = make_inputs(batch=1)
    stock = _run(model, inputs)
    diffattn.apply(model, "spy", via="dispatcher")
    assert torch.equal(_run(model, inputs), stock)
    seen = {(r["layer"], r["slot"], r["role"], r["grid"], r["sq"], r["sk"]) for r in spy}
    assert seen == {
        (i, slot, role, (4, 6, 5), 120, 120 if role == "self" else 7)
        for i in (0, 1) for slot, role in (("attn1", "self"), ("attn2", "cross"))
    }
    diffattn.remove(model)


def test_qwen_image_joint_layout(monkeypatch, spy):
    from diffattn import dispatch

    model, make_inputs = tiny_qwen_image()
    inputs = make_inputs()
    stock = _run(model, inputs)
    diffattn.apply(model, "gna", via="dispatcher", kernel_size=(3, 3))
    with pytest.raises(ValueError, match=r"token_layout=\{'text': 'first'\}"):
        _run(model, inputs)
    diffattn.apply(model, "gna", via="dispatcher", kernel_size=(3, 3), token_layout={"text": "first"})
    sparse = _run(model, inputs)
    assert (sparse - stock).abs().max() > 1e-3
    monkeypatch.setattr(dispatch, "DISPATCH_METHODS", (*dispatch.DISPATCH_METHODS, "spy"))
    diffattn.apply(model, "spy", via="dispatcher", token_layout={"text": "first"})
    assert torch.equal(_run(model, inputs), stock)
    assert {(r["role"], r["grid"], r["text_len"], r["text_first"], r["visual"]) for r in spy} == {
        ("joint", (1, 6, 7), 5, True, (5, 47))
    }
    diffattn.remove(model)
    assert torch.equal(_run(model, inputs), stock)


# ---- removal and refusals ----------------------------------------------------------------------------------------
def test_remove_restores_the_previous_backend_exactly():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model, make_inputs = tiny_wan()
    inputs = make_inputs(frames=4, height=10, width=14)
    model.set_attention_backend("_native_math")
    active = _AttentionBackendRegistry._active_backend
    before = {k: p._attention_backend for k, p in model.attn_processors.items()}
    reference = _run(model, inputs)
    diffattn.apply(model, "radial", via="dispatcher", **RADIAL)
    assert {p._attention_backend for p in model.attn_processors.values()} == {AttentionBackendName("diffattn_radial")}
    assert _AttentionBackendRegistry._active_backend == active  # other models of the process are not rerouted
    sparse = _run(model, inputs)
    # set_attention_backend by name works on the installed model, and switches back and forth
    model.set_attention_backend("_native_math")
    assert torch.equal(_run(model, inputs), reference)
    model.set_attention_backend("diffattn_radial")
    assert torch.equal(_run(model, inputs), sparse)
    diffattn.remove(model)
    assert {k: p._attention_backend for k, p in model.attn_processors.items()} == before
    assert _AttentionBackendRegistry._active_backend == active
    assert torch.equal(_run(model, inputs), reference)
    assert not model._diffusers_hook.hooks  # no diffattn hook left
    model.reset_attention_backend()
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_backend_without_install_explains():
    model, make_inputs = tiny_wan()
    diffattn.dispatch.register_backends(("radial",))
    model.set_attention_backend("diffattn_radial")
    try:
        with pytest.raises(RuntimeError, match=r"via='dispatcher'"):
            _run(model, make_inputs())
    finally:
        model.reset_attention_backend()
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_refusals():
    wan, _ = tiny_wan()
    with pytest.raises(ValueError, match="dual_path=False"):
        diffattn.apply(wan, "freeswim", via="dispatcher")
    with pytest.raises(ValueError, match="via must be"):
        diffattn.apply(wan, "dense", via="dispatch")
    with pytest.raises(ValueError, match="layout"):
        diffattn.apply(wan, "dense", via="dispatcher", token_layout={"txt": "first"})
    with pytest.raises(ValueError, match="token_layout= is for via='dispatcher'"):
        diffattn.apply(wan, "dense", token_layout={"text": "first"})
    unet, _ = tiny_unet()
    with pytest.raises(ValueError, match="dispatch_attention_fn"):
        diffattn.apply(unet, "dense", via="dispatcher")


def test_unknown_grid_names_the_layout_option():
    from diffattn.call import LayerInfo
    from diffattn.context import ContextSlot, ForwardContext

    slot = ContextSlot("generic")
    slot.current = ForwardContext(family="generic", batch_size=1, grid=None)
    install = DispatchInstall("radial", None, None, Layout(), slot, {}, None)
    layer = LayerInfo(0, "attn1", "blocks.0.attn1", "self", 1)
    x = torch.randn(1, 12, 2, 8)
    with pytest.raises(ValueError, match=r"token_layout=\{'grid'"):
        install.describe(x, x, x, None, None, layer, None)
    dense = DispatchInstall("dense", None, None, Layout(), slot, {}, None)
    assert dense.describe(x, x, x, None, None, layer, None) is None


def test_step_index_reaches_the_backend():
    """The context hook's step tracking works the same through the dispatcher: radial's dense warm-up step is dense,
    the next step (lower timestep) sparse, both as in the adapter route."""
    model, make_inputs = tiny_wan()
    inputs = make_inputs(frames=4, height=10, width=14)
    later = {**inputs, "timestep": torch.full((1,), 400.0)}
    options = {**RADIAL, "dense_timesteps": 1}
    outputs = {}
    for via in ("adapter", "dispatcher"):
        diffattn.apply(model, "radial", via=via, **options)
        outputs[via] = (_run(model, inputs), _run(model, later))
        diffattn.remove(model)
    stock_first, stock_later = _run(model, inputs), _run(model, later)
    assert torch.equal(outputs["dispatcher"][0], stock_first)  # step 0: dense warm-up
    assert torch.equal(outputs["dispatcher"][1], outputs["adapter"][1])
    assert (outputs["dispatcher"][1] - stock_later).abs().max() > 1e-3  # step 1: sparse

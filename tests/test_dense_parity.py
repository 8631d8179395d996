"""`dense` through diffattn's adapters equals the stock processors for every family; `remove` restores them."""

from __future__ import annotations

import pytest
import torch

import diffattn
import diffattn.processors
from diffattn.api import installed

import tiny

FAMILY_CASES = ["wan", "wan_i2v", "hunyuan_video", "cogvideox", "flux", "sd3", "unet"]


@pytest.fixture(scope="module", params=FAMILY_CASES)
def family_model(request):
    model, make_inputs = tiny.BUILDERS[request.param]()
    return request.param, model, make_inputs


@pytest.mark.parametrize("batch", [1, 2])
def test_dense_equals_stock_and_remove_is_exact(family_model, batch):
    name, model, make_inputs = family_model
    inputs = make_inputs(batch=batch, gen=torch.Generator().manual_seed(batch + 10))
    stock_processors = dict(model.attn_processors)
    ref = tiny.output_of(model, inputs)

    diffattn.apply(model, "dense")
    state = installed(model)
    assert state is not None and state.replaced, "no attention module was replaced"
    replaced_types = {type(p).__name__ for p in model.attn_processors.values()}
    assert any(t.endswith("Processor") and t in diffattn.processors.__all__ for t in replaced_types)
    out = tiny.output_of(model, inputs)
    diffattn.remove(model)
    after = tiny.output_of(model, inputs)

    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5, name
    assert torch.equal(after, ref), "after remove() the outputs must be bit-identical to stock"
    assert all(model.attn_processors[k] is v for k, v in stock_processors.items()), "remove() must restore the same objects"
    assert installed(model) is None


def test_parity_check_can_fail(family_model, monkeypatch):
    """The parity test above would catch a method that changes attention: a scaled output is detected."""
    from diffattn.methods.dense import DenseMethod

    name, model, make_inputs = family_model
    inputs = make_inputs(batch=1)
    ref = tiny.output_of(model, inputs)
    original = DenseMethod.attend
    monkeypatch.setattr(DenseMethod, "attend", lambda self, call: original(self, call) * 0.9)
    diffattn.apply(model, "dense")
    try:
        out = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert (out - ref).abs().max().item() > 1e-4, name


@pytest.mark.parametrize("name", ["wan", "flux", "sd3", "cogvideox", "unet"])
def test_dense_with_fused_projections(name):
    """Fused QKV projections (to_qkv / to_kv / to_added_qkv) give the unfused stock result. The reference is taken
    before fusing: stock SD3's fused processor cannot run SD3.5's image-only `attn2`, diffattn's can."""
    model, make_inputs = tiny.BUILDERS[name]()
    inputs = make_inputs(batch=1)
    ref = tiny.output_of(model, inputs)
    model.fuse_qkv_projections()
    diffattn.apply(model, "dense")
    out = tiny.output_of(model, inputs)
    diffattn.remove(model)
    assert (out - ref).abs().max().item() <= 1e-5


def test_wan_i2v_uses_real_image_token_count(spy):
    """Stock Wan I2V assumes 512 text tokens; diffattn reads the real text and image counts from the inputs."""
    model, make_inputs = tiny.BUILDERS["wan_i2v"]()
    inputs = make_inputs(batch=1, text=20)
    diffattn.apply(model, "spy")
    try:
        out = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert out.isfinite().all()
    cross = {(r["role"], r["sk"]) for r in spy if r["slot"] == "attn2"}
    assert cross == {("cross_image", 5), ("cross", 20)}

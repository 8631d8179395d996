"""SoftPAG on bare tiny models of every supported family: the chosen heads are perturbed in every forward."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from test_softpag_core import reference
from tiny import BUILDERS, output_of

import diffattn
from diffattn.api import installed

FAMILIES = ["sd3", "flux", "unet", "wan", "hunyuan_video"]


@pytest.fixture(scope="module")
def models():
    return {name: BUILDERS[name]() for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_u_zero_equals_stock(models, family):
    model, make_inputs = models[family]
    inputs = make_inputs(batch=2)
    stock = output_of(model, inputs)
    diffattn.apply(model, "softpag", heads="all", u=0.0)
    try:
        assert torch.equal(output_of(model, inputs), stock)
    finally:
        diffattn.remove(model)


@pytest.fixture
def identity_reference(monkeypatch):
    """A method "ref_identity": layer 1's self/joint attention returns V (identity map), all else dense."""
    from diffattn import registry
    from diffattn.config import MethodConfig
    from diffattn.methods.base import AttentionMethod

    @dataclass
    class Config(MethodConfig):
        method_name = "ref_identity"

    class Method(AttentionMethod):
        def attend(self, call):
            if call.layer.index == 1 and call.role in ("self", "joint"):
                return call.v
            return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=call.attn_mask)

    spec = registry.MethodSpec("ref_identity", "test", Config, registry.ALL_FAMILIES, Method)
    monkeypatch.setitem(registry._REGISTRY, "ref_identity", spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_u_one_identity_is_value_rows(models, family, identity_reference):
    model, make_inputs = models[family]
    inputs = make_inputs(batch=2)
    try:
        diffattn.apply(model, "ref_identity")
        expected = output_of(model, inputs)
        diffattn.apply(model, "softpag", heads="L1", u=1.0, target="identity", scope="full")
        got = output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert (got - expected).abs().max() < 1e-6
    assert (got - output_of(model, inputs)).abs().max() > 1e-4  # the perturbation changes the output


def record_attend(model, records):
    runtime = installed(model).runtime
    original = runtime.attend

    def attend(call):
        out = original(call)
        records.append((call, out))
        return out

    runtime.attend = attend


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target,scope", [("mean_q", "image"), ("uniform", "full"), ("identity", "image")])
def test_head_subset_per_head(models, family, target, scope):
    """Only head 1 of one layer changes, exactly as the materialised reference says; everything else is stock.
    SD3's layer 0 is a dual-attention (SD3.5) block: its joint `attn` and image-only `attn2` are both perturbed."""
    model, make_inputs = models[family]
    inputs = make_inputs(batch=2)
    records = []
    layer = 0 if family == "sd3" else 1
    diffattn.apply(model, "softpag", heads=f"L{layer}H1", u=0.6, target=target, scope=scope)
    try:
        record_attend(model, records)
        output_of(model, inputs)
    finally:
        diffattn.remove(model)
    chosen = 0
    for call, out in records:
        dense = F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=call.attn_mask)
        for h in range(out.shape[1]):
            if call.layer.index == layer and h == 1 and call.role in ("self", "joint"):
                chosen += 1
                text_len = call.text_len if call.role == "joint" else 0
                ref = reference(call.q, call.k, call.v, 0.6, target, scope, text_len, call.text_first,
                                mask=call.attn_mask, key_padding=call.key_padding)[:, h]
                diff = (out[:, h].double() - ref).abs()
                if call.key_padding is not None:
                    diff = diff[call.key_padding]
                assert diff.max() < 1e-5, (call.layer.path, h)
                assert (out[:, h] - dense[:, h]).abs().max() > 1e-6
            else:
                assert torch.equal(out[:, h], dense[:, h]), (call.layer.path, call.role, h)
    assert chosen == {"sd3": 2, "flux": 1, "unet": 1, "wan": 1, "hunyuan_video": 1}[family]


def test_preset_of_another_family_is_refused(models):
    model, make_inputs = models["flux"]
    diffattn.apply(model, "softpag", heads="sd3:dark")
    try:
        with pytest.raises(ValueError, match="sd3 cannot be applied to a flux model"):
            output_of(model, make_inputs())
    finally:
        diffattn.remove(model)


@pytest.mark.parametrize("heads,match", [("L9H0", "has 4 attention layers"), ("L0H7", "has 2 heads")])
def test_out_of_range_heads(models, heads, match):
    model, make_inputs = models["flux"]
    diffattn.apply(model, "softpag", heads=heads)
    try:
        with pytest.raises(ValueError, match=match):
            output_of(model, make_inputs())
    finally:
        diffattn.remove(model)

"""`gna` through the adapters equals masked SDPA over a token mask built here from NATTEN's window formulas, for
3-D video grids and 2-D image grids, with text as extra keys (padding honoured) and text queries dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn.methods import gna as gna_module

import tiny


def axis_keep(length: int, k: int, s: int, d: int, causal: bool) -> torch.Tensor:
    """[L, L] bool: query i attends key j along one axis (NATTEN semantics, written from the formulas)."""
    keep = torch.zeros(length, length, dtype=torch.bool)
    wl = k // 2
    for i in range(length):
        g_i, x = i % d, i // d
        group_len = length // d + (1 if g_i < length % d else 0)
        if causal:
            leader = min((x // s) * s + s - 1, group_len - 1)
            lo, hi = max(leader - k + 1, 0), x + 1
        else:
            leader = min((x // s) * s + s // 2, group_len - 1)
            lo = min(max(leader - wl, 0), group_len - k)
            hi = lo + k
        for xj in range(lo, hi):
            keep[i, xj * d + g_i] = True
    return keep


def token_keep(shape, ks, st, dl, causal) -> torch.Tensor:
    masks = [axis_keep(n, k, s, d, c) for n, k, s, d, c in zip(shape, ks, st, dl, causal)]
    keep = masks[0]
    for m in masks[1:]:  # raster order: the AND of per-axis masks as a Kronecker product
        keep = (keep[:, None, :, None] & m[None, :, None, :]).reshape(keep.shape[0] * m.shape[0], -1)
    return keep


def reference_for(shape, ks, st, dl, causal):
    def reference(call, *_args, **_kw):
        b, h, s, d = call.q.shape
        vis, txt = call.visual_slice(), call.text_slice()
        keep = torch.zeros(b, s, s, dtype=torch.bool)
        pad = call.key_padding if call.key_padding is not None else torch.ones(b, s, dtype=torch.bool)
        keep[:, vis, vis] = token_keep(shape, ks, st, dl, causal)
        keep[:, vis, txt] = pad[:, None, txt]
        keep[:, txt, :] = pad[:, None, :]
        return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=keep[:, None], scale=call.scale)

    return reference


CASES = [
    # family, inputs, options, grid the window applies to, expected per-axis settings after fitting
    ("wan", dict(frames=4, height=10, width=14), dict(kernel_size=(3, 3, 5), stride=(1, 2, 2)), (4, 5, 7)),
    ("hunyuan_video", dict(frames=4, height=10, width=14), dict(kernel_size=(2, 4, 4), dilation=(1, 1, 2)), (4, 5, 7)),
    ("cogvideox", dict(frames=5, height=10, width=14), dict(kernel_size=(-1, 3, 3), is_causal=(True, False, False)), (5, 5, 7)),
    ("flux", dict(height=9, width=10), dict(kernel_size=(4, 5), stride=(2, 5)), (9, 10)),
    ("sd3", dict(height=14, width=12), dict(kernel_size=3), (7, 6)),
]


@pytest.mark.parametrize("family,inputs_kw,options,shape", CASES, ids=[c[0] for c in CASES])
def test_gna_matches_window_reference(family, inputs_kw, options, shape, monkeypatch):
    model, make_inputs = tiny.BUILDERS[family]()
    inputs = make_inputs(batch=2, **inputs_kw)
    dense = tiny.output_of(model, inputs)
    diffattn.apply(model, "gna", **options)
    try:
        fast = tiny.output_of(model, inputs)
        method = diffattn.api.installed(model).runtime
        s = method.fit(shape, method.settings_for(0), "test")
        monkeypatch.setattr(gna_module, "visual_with_text", reference_for(shape, s["kernel_size"], s["stride"], s["dilation"], s["is_causal"]))
        ref = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert (fast - ref).abs().max().item() <= 1e-5
    assert (fast - dense).abs().max().item() > 1e-4


def test_window_reference_is_itself_checked():
    """The test's own window rule against hand-worked NATTEN examples (doc: L=30, K=18, s=16)."""
    keep = axis_keep(30, 18, 16, 1, False)
    assert keep[0].nonzero().flatten().tolist() == list(range(0, 18))
    assert keep[15].nonzero().flatten().tolist() == list(range(0, 18))
    assert keep[16].nonzero().flatten().tolist() == list(range(12, 30))
    assert keep[5].sum() == 18 and axis_keep(7, 3, 1, 1, False)[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert axis_keep(7, 3, 1, 1, True)[4].nonzero().flatten().tolist() == [2, 3, 4]
    assert axis_keep(8, 2, 1, 2, False)[3].nonzero().flatten().tolist() == [1, 3]


def test_layers_per_layer_presets_and_dense_steps():
    model, make_inputs = tiny.BUILDERS["wan"]()
    inputs = make_inputs(batch=1, frames=4, height=10, width=14)
    dense = tiny.output_of(model, inputs)
    for opts in (dict(kernel_size=3, layers=[]), dict(kernel_size=3, dense_timesteps=1), dict(kernel_size=-1)):
        diffattn.apply(model, "gna", **opts)
        out = tiny.output_of(model, inputs)
        diffattn.remove(model)
        assert (out - dense).abs().max().item() <= 1e-5, opts
    diffattn.apply(model, "gna", kernel_size=-1, per_layer={1: {"kernel_size": (2, 3, 3)}})
    one_layer = tiny.output_of(model, inputs)
    runtime = diffattn.api.installed(model).runtime
    diffattn.remove(model)
    assert (one_layer - dense).abs().max().item() > 1e-4
    assert runtime.settings_for(1)["kernel_size"] == (2, 3, 3) and runtime.settings_for(0)["kernel_size"] == -1
    preset = gna_module.GNAMethod(gna_module.GNAConfig(preset="wan-720p-cosmos-mix"))
    assert preset.settings_for(0)["kernel_size"] == (-1, 20, 40)
    assert preset.settings_for(2)["dilation"] == (1, 11, 5)
    assert preset.settings_for(1)["kernel_size"] == (-1, 12, 24)
    fitted = preset.fit((21, 45, 80), preset.settings_for(2), "x")
    assert fitted["kernel_size"] == (21, 4, 16) and fitted["dilation"] == (1, 11, 5)
    hy = gna_module.GNAMethod(gna_module.GNAConfig(preset="hunyuan-720p"))
    assert hy.fit((30, 48, 80), hy.settings_for(5), "x") == {
        "kernel_size": (18, 24, 24), "stride": (16, 8, 8), "dilation": (1, 1, 1), "is_causal": (False, False, False)
    }


def test_gna_options_are_validated():
    model, _ = tiny.BUILDERS["flux"]()
    with pytest.raises(ValueError, match="needs kernel_size=... or preset="):
        diffattn.apply(model, "gna")
    with pytest.raises(ValueError, match=r"'kernel_size'.*expected ints >= 1 \(or -1"):
        diffattn.apply(model, "gna", kernel_size=(0, 3))
    with pytest.raises(ValueError, match=r"'preset'.*one of"):
        diffattn.apply(model, "gna", preset="nope")
    with pytest.raises(ValueError, match="'per_layer'"):
        diffattn.apply(model, "gna", kernel_size=3, per_layer={0: {"window": 3}})
    unet, _ = tiny.BUILDERS["unet"]()
    with pytest.raises(ValueError, match="does not support UNet2DConditionModel"):
        diffattn.apply(unet, "gna", kernel_size=3)

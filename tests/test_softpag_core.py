"""SoftPAG's tensor functions against materialised L x L references, and its option parsing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffattn.methods.softpag import SoftPAGConfig, parse_heads, soft_perturbed_attention, target_attention
from diffattn.methods.softpag_presets import PRESETS, preset_names


def reference(q, k, v, u, target, scope, text_len=0, text_first=False, mask=None, key_padding=None):
    """Materialise A and the target map P (float64) and return ((1 - u) A + u P) v."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, s, d = q.shape
    logits = q @ k.transpose(-1, -2) * d**-0.5
    add = torch.zeros(1, 1, s, s, dtype=torch.float64)
    if mask is not None:
        if mask.dtype == torch.bool:
            add = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        else:
            add = mask.double()
    add = add.expand(b, h, s, s)
    attn = torch.softmax(logits + add, -1)
    if scope == "full" or text_len == 0:
        rows = cols = torch.arange(s)
    else:
        rows = cols = torch.arange(text_len, s) if text_first else torch.arange(0, s - text_len)
    if scope == "full" and target == "identity":
        p = torch.eye(s, dtype=torch.float64).expand(b, h, s, s)
    else:
        t = logits.clone()
        block = t[:, :, rows][:, :, :, cols]
        if target == "identity":
            diag = torch.diagonal(block, dim1=-2, dim2=-1)
            block = torch.full_like(block, float("-inf"))
            block.diagonal(dim1=-2, dim2=-1).copy_(diag)
        elif target == "uniform":
            block = torch.zeros_like(block)
        else:
            qr = q[:, :, rows]
            if key_padding is not None and scope == "full":
                w = key_padding.double()[:, None, :, None]
                qbar = (qr * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)
            else:
                qbar = qr.mean(2, keepdim=True)
            block = (qbar @ k[:, :, cols].transpose(-1, -2) * d**-0.5).expand_as(block)
        t[:, :, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = block
        p = torch.softmax(t + add, -1)
        keep = torch.ones(s, dtype=torch.bool)
        keep[rows] = False
        p[:, :, keep] = attn[:, :, keep]  # rows outside the scope are unperturbed
    return ((1 - u) * attn + u * p) @ v


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", ["identity", "uniform", "mean_q"])
@pytest.mark.parametrize(
    "scope,text_len,text_first", [("full", 4, False), ("image", 4, False), ("image", 3, True), ("image", 0, False)]
)
@pytest.mark.parametrize("u", [1.0, 0.3])
def test_targets_match_materialised_reference(target, scope, text_len, text_first, u):
    b, h, s, d = 2, 3, 11, 5
    q, k, v = rand(b, h, s, d, seed=1), rand(b, h, s, d, seed=2), rand(b, h, s, d, seed=3)
    out = soft_perturbed_attention(q, k, v, u, target, scope, text_len=text_len, text_first=text_first)
    ref = reference(q, k, v, u, target, scope, text_len, text_first)
    assert (out.double() - ref).abs().max() < 1e-5
    if u == 1.0 and target == "identity" and scope == "full":
        assert torch.equal(out, v)


@pytest.mark.parametrize("target", ["identity", "uniform", "mean_q"])
@pytest.mark.parametrize("scope", ["full", "image"])
def test_key_padding_mask(target, scope):
    """HunyuanVideo-style boolean key mask [B, 1, 1, S] over padded text keys (text last)."""
    b, h, s, d, text_len = 2, 2, 9, 4, 4
    q, k, v = rand(b, h, s, d, seed=4), rand(b, h, s, d, seed=5), rand(b, h, s, d, seed=6)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, -2:] = False
    mask = valid[:, None, None, :]
    out = soft_perturbed_attention(q, k, v, 0.7, target, scope, text_len=text_len, attn_mask=mask, key_padding=valid)
    ref = reference(q, k, v, 0.7, target, scope, text_len, False, mask=mask, key_padding=valid)
    rows = valid[:, None, :, None].expand_as(out)  # padded query rows are meaningless in both
    assert (out.double() - ref)[rows].abs().max() < 1e-5


def test_image_scope_identity_with_per_query_additive_mask():
    b, h, s, d, text_len = 1, 2, 10, 4, 3
    q, k, v = rand(b, h, s, d, seed=7), rand(b, h, s, d, seed=8), rand(b, h, s, d, seed=9)
    mask = rand(1, h, s, s, seed=10)  # additive, different per query and head
    out = soft_perturbed_attention(q, k, v, 1.0, "identity", "image", text_len=text_len, text_first=True, attn_mask=mask)
    ref = reference(q, k, v, 1.0, "identity", "image", text_len, True, mask=mask)
    assert (out.double() - ref).abs().max() < 1e-5
    with pytest.raises(NotImplementedError, match="same for every query"):
        target_attention(q, k, v, "uniform", "image", text_len=text_len, text_first=True, attn_mask=mask)


def test_image_scope_chunks(monkeypatch):
    """Tiny chunks of image rows give the same result (the chunk loop has no off-by-one)."""
    import diffattn.methods.softpag_targets as sp

    q, k, v = rand(1, 2, 13, 4, seed=11), rand(1, 2, 13, 4, seed=12), rand(1, 2, 13, 4, seed=13)
    whole = target_attention(q, k, v, "mean_q", "image", text_len=5)
    monkeypatch.setattr(sp, "_CHUNK_ELEMENTS", 13)
    assert torch.allclose(target_attention(q, k, v, "mean_q", "image", text_len=5), whole, atol=1e-6)


def test_u_zero_is_dense():
    q, k, v = rand(1, 2, 7, 4, seed=14), rand(1, 2, 7, 4, seed=15), rand(1, 2, 7, 4, seed=16)
    assert torch.equal(soft_perturbed_attention(q, k, v, 0.0, "mean_q", "image", text_len=2),
                       F.scaled_dot_product_attention(q, k, v))


def test_parse_heads_forms():
    spec = parse_heads("L11H15, l1h10,L1H2")
    assert spec.layers == {11: (15,), 1: (2, 10)} and not spec.all_layers
    assert parse_heads("L5").layers == {5: None}
    assert parse_heads("L5,L5H3").layers == {5: None}  # all heads win
    assert parse_heads("L2-L4").layers == {2: None, 3: None, 4: None}
    assert parse_heads("all").all_layers
    assert parse_heads({3: [1, 0], "4": "all", 5: 2}).layers == {3: (0, 1), 4: None, 5: (2,)}
    assert parse_heads([(0, 1), "L2H3"]).layers == {0: (1,), 2: (3,)}
    golden = parse_heads("sd3:golden-hour")
    assert golden.layers == {18: (11,), 0: (17,), 2: (3,)} and golden.families == {"sd3"}
    assert parse_heads("flux:bokeh,L3H1").layers == {34: (0,), 3: (1,)}


@pytest.mark.parametrize("bad", [None, "", "L1X2", "sd3:nope", "flux2:bokeh", {}, {1: []}, {-1: [0]}, 3, [(1,)], "L4-L2"])
def test_parse_heads_errors(bad):
    with pytest.raises(ValueError, match="heads|preset|range"):
        parse_heads(bad)


def test_presets_follow_the_paper():
    assert PRESETS["sd3"]["shearing"] == ((11, 15),)
    assert set(PRESETS["sd3"]["dark"]) == {(1, 2), (1, 10)}
    assert set(PRESETS["sd3"]["white"]) == {(0, 15), (1, 19)}
    assert set(PRESETS["sd3"]["golden-hour"]) == {(18, 11), (0, 17), (2, 3)}
    flux = {"golden-hour": (38, 18), "glossy": (43, 17), "green-filter": (52, 12), "cool-tone": (52, 6),
            "bokeh": (34, 0), "warm-red": (52, 22), "vintage-film": (51, 23)}
    assert {name: heads[0] for name, heads in PRESETS["flux"].items()} == flux
    assert "sd3:golden-hour" in preset_names()
    for family, table in PRESETS.items():  # SD3-medium: 24 x 24 heads; FLUX.1-dev: 57 layers x 24 heads
        for heads in table.values():
            assert all(0 <= l < (24 if family == "sd3" else 57) and 0 <= h < 24 for l, h in heads)


@pytest.mark.parametrize("options,match", [
    ({"heads": "L1", "u": 1.5}, "'u'"),
    ({"heads": "L1", "target": "eye"}, "'target'"),
    ({"heads": "L1", "scope": "img"}, "'scope'"),
    ({"heads": "L1", "start": 0.6, "end": 0.5}, "start"),
    ({}, "required"),
])
def test_config_errors(options, match):
    with pytest.raises(ValueError, match=match):
        SoftPAGConfig.from_options(**options)


@pytest.mark.parametrize("target", ["identity", "uniform", "mean_q"])
def test_image_scope_with_a_masked_image_key(target):
    """A per-key mask over an image key: that key leaves every image row (the own-key logit of its query too)."""
    b, h, s, d, text_len = 2, 2, 9, 4, 3
    q, k, v = rand(b, h, s, d, seed=17), rand(b, h, s, d, seed=18), rand(b, h, s, d, seed=19)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, 2] = False
    mask = valid[:, None, None, :]
    out = soft_perturbed_attention(q, k, v, 1.0, target, "image", text_len=text_len, attn_mask=mask)
    ref = reference(q, k, v, 1.0, target, "image", text_len, False, mask=mask)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("text,expected", [
    ("L11H15,L1H10", "L11H15,L1H10"), ("sd3:golden-hour", "sd3:golden-hour"), ("L5", "L5"),
    ('{"3": [1, 2]}', {3: [1, 2]}), ("[[0, 1], [2, 3]]", [[0, 1], [2, 3]]),
])
def test_cli_heads_text(text, expected):
    value = SoftPAGConfig.parse_option("heads", text)
    assert value == expected
    SoftPAGConfig.from_options(heads=value)  # and it validates

"""The training-free FICGen processor on a tiny SD1.5 UNet (real Diffusers classes, random weights)."""

from __future__ import annotations

import math

import pytest
import torch

import diffattn
from diffattn.frequency import band_split
from diffattn.layout import Layout
from diffattn.methods.ficgen import (
    FICGenInputs, block_name, encode_phrases, frequency_composite, parse_layers, region_bias,
)
from tiny_image_pipelines import PROMPT, build_tiny_sd_pipeline, run_tiny_sd

FULL = {"instances": [{"phrase": PROMPT, "box": [0, 0, 1, 1]}]}
TWO = {"instances": [{"phrase": "a red cat", "box": [0.0, 0.0, 0.5, 1.0]},
                     {"phrase": "a blue dog", "box": [0.4, 0.2, 1.0, 0.9]}]}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd_pipeline()


def test_full_instance_same_phrase_equals_stock(pipe):
    stock = run_tiny_sd(pipe, output_type="latent", steps=2)
    diffattn.apply(pipe, "ficgen", layout=FULL, alpha=1.0, beta=1.0, layers="all", band="square")
    try:
        out = run_tiny_sd(pipe, output_type="latent", steps=2)
    finally:
        diffattn.remove(pipe)
    torch.testing.assert_close(out, stock, atol=2e-5, rtol=1e-5)
    # ... and the Gaussian band too (the split is exact for any mask)
    diffattn.apply(pipe, "ficgen", layout=FULL, alpha=1.0, beta=1.0, band="gaussian")
    try:
        torch.testing.assert_close(run_tiny_sd(pipe, output_type="latent", steps=2), stock, atol=2e-5, rtol=1e-5)
    finally:
        diffattn.remove(pipe)


def test_layout_changes_output_and_remove_restores(pipe):
    stock = run_tiny_sd(pipe, output_type="latent", steps=2)
    diffattn.apply(pipe, "ficgen", layout=TWO, alpha=0.3, beta=1.5, self_attention_bias=2.0)
    out = run_tiny_sd(pipe, output_type="latent", steps=2)
    diffattn.remove(pipe)
    assert (out - stock).abs().max() > 1e-4
    assert torch.equal(run_tiny_sd(pipe, output_type="latent", steps=2), stock)


def _unet_inputs(pipe, cfg_rows: bool):
    torch.manual_seed(1)
    latent = torch.randn(1, 4, 12, 20)
    text = encode_phrases(pipe, [PROMPT, "dark blue"], "cpu")
    if cfg_rows:
        return torch.cat([latent, latent]), torch.cat([text[1:], text[:1]])  # [uncond; cond]
    return latent, text[:1]


def test_uncond_rows_unchanged_and_inputs_through_cross_attention_kwargs(pipe):
    layout = Layout.from_dict(TWO)
    emb = encode_phrases(pipe, layout.phrases, "cpu")
    inputs = FICGenInputs.from_layouts(layout, emb)
    sample, text = _unet_inputs(pipe, cfg_rows=True)
    t = torch.tensor(500)
    with torch.no_grad():
        stock = pipe.unet(sample, t, encoder_hidden_states=text).sample
        diffattn.apply(pipe.unet, "ficgen", self_attention_bias=float("inf"))
        try:
            out = pipe.unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs={"ficgen": inputs}).sample
            plain = pipe.unet(sample, t, encoder_hidden_states=text).sample  # no layout this call: stock
        finally:
            diffattn.remove(pipe.unet)
    torch.testing.assert_close(out[0], stock[0], atol=1e-5, rtol=1e-5)  # uncond row: stock attention
    assert (out[1] - stock[1]).abs().max() > 1e-4
    torch.testing.assert_close(plain, stock, atol=1e-6, rtol=1e-6)


def test_step_window(pipe):
    stock = run_tiny_sd(pipe, output_type="latent", steps=3)
    diffattn.apply(pipe, "ficgen", layout=TWO, start_step=5, end_step=7)  # never active in 3 steps
    try:
        torch.testing.assert_close(run_tiny_sd(pipe, output_type="latent", steps=3), stock, atol=1e-6, rtol=0)
    finally:
        diffattn.remove(pipe)
    diffattn.apply(pipe, "ficgen", layout=TWO, end_step=0.5)
    try:
        assert (run_tiny_sd(pipe, output_type="latent", steps=3) - stock).abs().max() > 1e-4
    finally:
        diffattn.remove(pipe)


def _composite_loop(g, p, maps, hw, rho, alpha, beta, band, weight):
    """The composite written per instance and cell, to check the vectorised one."""
    b, heads, s, d = g.shape
    h, w = hw
    num = g.clone().double()
    den = torch.ones(b, 1, s, 1, dtype=torch.float64)
    low0, _ = band_split(g.double().transpose(-1, -2).reshape(b, heads, d, h, w), rho, band)
    low0 = low0.reshape(b, heads, d, s).transpose(-1, -2)
    for i in range(p.shape[1]):
        low, high = band_split(p[:, i].double().transpose(-1, -2).reshape(b, heads, d, h, w), rho, band)
        low, high = (x.reshape(b, heads, d, s).transpose(-1, -2) for x in (low, high))
        y = (1 - alpha) * low0 + alpha * low + beta * high
        m = weight * maps[:, i].double()[:, None, :, None]
        num += m * y
        den = den + m
    return num / den


@pytest.mark.parametrize("band", ["square", "gaussian"])
def test_frequency_composite_matches_loop(band):
    torch.manual_seed(0)
    hw = (6, 10)
    g, p = torch.randn(2, 3, 60, 4), torch.randn(2, 2, 3, 60, 4)
    maps = torch.rand(2, 2, 60)
    maps[1, 1] = 0  # a padded instance
    got = frequency_composite(g, p, maps, hw, rho=0.3, alpha=0.4, beta=1.7, band=band, instance_weight=10.0)
    ref = _composite_loop(g, p, maps, hw, 0.3, 0.4, 1.7, band, 10.0)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # background cells (all maps 0) keep the prompt's output
    maps0 = torch.zeros(2, 2, 60)
    torch.testing.assert_close(frequency_composite(g, p, maps0, hw), g)


def test_background_phrase_in_the_composite(pipe):
    torch.manual_seed(2)
    hw = (6, 10)
    g, p, bg = torch.randn(2, 3, 60, 4), torch.randn(2, 2, 3, 60, 4), torch.randn(2, 3, 60, 4)
    maps = torch.rand(2, 2, 60) * (torch.rand(2, 2, 60) > 0.5)
    got = frequency_composite(g, p, maps, hw, rho=0.3, alpha=0.4, beta=1.7, background_out=bg)
    m_bg = (1 - maps.amax(1))[:, None, :, None]
    # the loop with the base B = M_bg O_bg + (1 - M_bg) O_0 in place of O_0 (the LP(O_0) share keeps the prompt)
    num = m_bg * bg + (1 - m_bg) * g
    ref = frequency_composite(g, p, maps, hw, rho=0.3, alpha=0.4, beta=1.7) * (1 + 10 * maps.sum(1)[:, None, :, None])
    ref = (ref - g + num) / (1 + 10 * maps.sum(1)[:, None, :, None])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    empty = torch.zeros(2, 2, 60)  # no instance anywhere: the background phrase's output everywhere
    torch.testing.assert_close(frequency_composite(g, p, empty, hw, background_out=bg), bg)
    # a full-image instance leaves no background, so a background phrase changes nothing there
    stock = run_tiny_sd(pipe, output_type="latent", steps=2)
    diffattn.apply(pipe, "ficgen", layout={**FULL, "background": "a green field"}, alpha=1.0, beta=1.0, layers="all")
    try:
        torch.testing.assert_close(run_tiny_sd(pipe, output_type="latent", steps=2), stock, atol=2e-5, rtol=1e-5)
    finally:
        diffattn.remove(pipe)
    # ... while with background cells it does
    diffattn.apply(pipe, "ficgen", layout=TWO, layers="all")
    try:
        plain = run_tiny_sd(pipe, output_type="latent", steps=2)
    finally:
        diffattn.remove(pipe)
    diffattn.apply(pipe, "ficgen", layout={**TWO, "background": "a green field"}, layers="all")
    try:
        named = run_tiny_sd(pipe, output_type="latent", steps=2)
    finally:
        diffattn.remove(pipe)
    assert (named - plain).abs().max() > 1e-5


def test_region_bias():
    maps = torch.zeros(1, 2, 4)
    maps[0, 0, :2] = 1  # instance 0 on tokens 0, 1; instance 1 on token 2; token 3 background
    maps[0, 1, 2] = 1
    hard = region_bias(maps, math.inf)[0, 0]
    allowed = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(torch.isfinite(hard), allowed)
    soft = region_bias(maps, 3.0)[0, 0]
    assert torch.equal(soft, torch.where(allowed, 0.0, -3.0))


def test_options_and_layer_names():
    assert parse_layers("mid,up1") == (frozenset({"mid", "up1"}), frozenset(), False)
    assert parse_layers([15, "down2"]) == (frozenset({"down2"}), frozenset({15}), False)
    assert block_name("up_blocks.1.attentions.2.transformer_blocks.0.attn2") == "up1"
    assert block_name("mid_block.attentions.0.transformer_blocks.0.attn1") == "mid"
    from diffattn.methods.ficgen import FICGenConfig

    for bad, msg in [
        (dict(layers="middle"), "cannot parse"), (dict(layers=""), "empty"), (dict(rho=0.0), "rho"),
        (dict(alpha=1.5), "alpha"), (dict(band="box"), "band"), (dict(self_attention_bias=-1.0), "self_attention_bias"),
        (dict(start_step=0.6, end_step=0.4), "start must be before end"), (dict(end_step=2.5), "fraction"),
        (dict(layout={"instances": []}), "at least one instance"), (dict(nope=1), "unknown option"),
    ]:
        with pytest.raises(ValueError, match=msg):
            FICGenConfig.from_options(**bad)


def test_layout_without_pipeline_is_a_clear_error(pipe):
    sample, text = _unet_inputs(pipe, cfg_rows=False)
    diffattn.apply(pipe.unet, "ficgen", layout=TWO)
    try:
        with pytest.raises(ValueError, match="needs a pipeline"):
            pipe.unet(sample, torch.tensor(10), encoder_hidden_states=text)
    finally:
        diffattn.remove(pipe.unet)


def test_sdxl_unet_full_instance_equals_stock_and_layout_changes_cond_rows():
    """An SDXL-style UNet (text_time added conditioning, 2 transformer layers per block), bare forwards with the
    inputs through cross_attention_kwargs: full-image instance with the forward's own text = stock; a layout changes
    only the conditional row."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2), norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8,
    ).eval()
    sample = torch.randn(1, 4, 10, 14).repeat(2, 1, 1, 1)
    text = torch.randn(2, 7, 24)
    added = {"text_embeds": torch.randn(2, 12), "time_ids": torch.randn(2, 6)}
    t = torch.tensor(400)
    full = Layout.from_dict({"instances": [{"phrase": "the prompt", "box": [0, 0, 1, 1]}]})
    two = Layout.from_dict(TWO)
    with torch.no_grad():
        stock = unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        diffattn.apply(unet, "ficgen", alpha=1.0, beta=1.0, layers="all", cfg=True)
        try:
            same = unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added,
                        cross_attention_kwargs={"ficgen": FICGenInputs.from_layouts(full, text[1:])}).sample
            moved = unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added,
                         cross_attention_kwargs={"ficgen": FICGenInputs.from_layouts(two, torch.randn(2, 7, 24))}).sample
        finally:
            diffattn.remove(unet)
    torch.testing.assert_close(same, stock, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(moved[0], stock[0], atol=1e-6, rtol=1e-6)
    assert (moved[1] - stock[1]).abs().max() > 1e-4

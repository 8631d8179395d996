"""FICGen's exemplar K/V path (facts file §3.4 step 5): the pure attention against its float64 reference, its two
reductions, and the path inside a tiny SD1.5 UNet (extra batch rows, CFG, gradients into trained modules)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn.layout import Layout
from diffattn.methods.ficgen import FICGenInputs, encode_phrases
from diffattn.methods.ficgen_exemplar import (
    exemplar_attention, exemplar_attention_reference, exemplar_weights, load_exemplar_image, noised_exemplar,
)
from tiny_image_pipelines import PROMPT, build_tiny_sd_pipeline

TWO = {"instances": [{"phrase": "a red cat", "box": [0.0, 0.0, 0.5, 1.0]},
                     {"phrase": "a blue dog", "box": [0.4, 0.2, 1.0, 0.9]}]}


def _maps(layout: dict, h: int, w: int, b: int = 1) -> torch.Tensor:
    inputs = FICGenInputs.from_layouts(Layout.from_dict(layout), torch.zeros(len(layout["instances"]), 3, 4))
    return inputs.maps(h, w, device=torch.device("cpu"), dtype=torch.float32).flatten(-2).expand(b, -1, -1)


@pytest.mark.parametrize("grid,band,scale", [((4, 6), "square", 1.0), ((5, 3), "gaussian", 2.5), ((8, 8), "square", 0.3)])
def test_matches_weighted_softmax_reference(grid, band, scale):
    g = torch.Generator().manual_seed(0)
    b, heads, d = 2, 3, 8
    s = grid[0] * grid[1]
    q, k, v = (torch.randn(b, heads, s, d, generator=g) for _ in range(3))
    ek, ev = torch.randn(1, heads, s, d, generator=g), torch.randn(1, heads, s, d, generator=g)  # one exemplar, 2 rows
    maps = _maps(TWO, *grid, b=b)
    out = exemplar_attention(q, k, v, ek, ev, maps, grid, rho=0.3, band=band, scale=scale)
    ref = exemplar_attention_reference(q, k, v, ek, ev, maps, grid, rho=0.3, band=band, scale=scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_reductions_to_plain_self_attention():
    g = torch.Generator().manual_seed(1)
    grid, heads, d = (6, 5), 2, 16
    s = grid[0] * grid[1]
    q, k, v = (torch.randn(1, heads, s, d, generator=g) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v)
    maps = _maps(TWO, *grid)
    # weight 0: the exemplar's keys get -inf, the path without exemplar
    ek, ev = torch.randn_like(k), torch.randn_like(v)
    torch.testing.assert_close(exemplar_attention(q, k, v, ek, ev, maps, grid, scale=0.0), plain, atol=1e-6, rtol=1e-5)
    # the exemplar is the image itself, the whole spectrum in the low band (rho 0.5), no instance: every key twice
    none = torch.zeros(1, 0, s)
    same = exemplar_attention(q, k, v, k, v, none, grid, rho=0.5, band="square", scale=1.0)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    # ... but with instances the high band comes in and the output changes
    assert (exemplar_attention(q, k, v, k, v, maps, grid, rho=0.5) - plain).abs().max() > 1e-3


def test_weights_route_bands_by_region():
    maps = _maps({"instances": [{"phrase": "a", "box": [0, 0, 0.5, 0.5]}, {"phrase": "b", "box": [0.5, 0.5, 1, 1]}]}, 4, 4)
    w_low, w_high = exemplar_weights(maps, 2.0)
    fg = maps.amax(1)
    torch.testing.assert_close(w_low[..., 0], 2.0 * (1 - fg))
    # a background cell (no instance) sees no high band; a cell of instance 0 only sees cells of instance 0
    bg_cells = (fg == 0).nonzero()[:, 1]
    assert bg_cells.numel() and w_high[0, bg_cells].abs().max() == 0
    only0 = ((maps[0, 0] == 1) & (maps[0, 1] == 0)).nonzero()[:, 0]
    assert torch.equal(w_high[0, only0[0]] > 0, maps[0, 0] > 0)


def test_noised_exemplar_and_image_loading(tmp_path):
    x0, noise = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    alphas = torch.linspace(0.99, 0.01, 1000)
    a = float(alphas[500])
    torch.testing.assert_close(noised_exemplar(x0, noise, alphas, 500.2), a**0.5 * x0 + (1 - a) ** 0.5 * noise)
    assert torch.equal(noised_exemplar(x0, noise, alphas, None), x0)
    from PIL import Image

    Image.new("RGB", (10, 6), (255, 0, 0)).save(tmp_path / "ex.png")
    img = load_exemplar_image(str(tmp_path / "ex.png"), 8, 8)
    assert img.shape == (1, 3, 8, 8) and torch.allclose(img[0, 0], torch.ones(8, 8)) and img[0, 1].max() == -1
    with pytest.raises(TypeError, match="exemplar_image"):
        load_exemplar_image(12, 8, 8)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        load_exemplar_image(torch.zeros(4, 8, 8), 8, 8)


# ---- inside a UNet -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd_pipeline()


def _inputs(pipe, with_exemplar: bool, scale_rows: int = 1):
    layout = Layout.from_dict(TWO)
    emb = encode_phrases(pipe, layout.phrases, "cpu")
    extra = {}
    if with_exemplar:
        g = torch.Generator().manual_seed(5)
        extra = dict(exemplar_latents=torch.randn(scale_rows, 4, 12, 20, generator=g),
                     alphas_cumprod=pipe.scheduler.alphas_cumprod)
    return FICGenInputs.from_layouts(layout, emb, **extra)


def _cfg_batch(pipe):
    torch.manual_seed(1)
    latent = torch.randn(1, 4, 12, 20)
    text = encode_phrases(pipe, [PROMPT, ""], "cpu")
    return torch.cat([latent, latent]), torch.cat([text[1:], text[:1]])  # [uncond; cond]


def _run(pipe, inputs, **options):
    sample, text = _cfg_batch(pipe)
    diffattn.apply(pipe.unet, "ficgen", layers="all", **options)
    try:
        with torch.no_grad():
            return pipe.unet(sample, torch.tensor(400), encoder_hidden_states=text,
                             cross_attention_kwargs={"ficgen": inputs}).sample
    finally:
        diffattn.remove(pipe.unet)


def test_unet_exemplar_rows_cfg_and_off_switch(pipe):
    sample, text = _cfg_batch(pipe)
    with torch.no_grad():
        stock = pipe.unet(sample, torch.tensor(400), encoder_hidden_states=text).sample
    without = _run(pipe, _inputs(pipe, False))
    with_ex = _run(pipe, _inputs(pipe, True))
    off = _run(pipe, _inputs(pipe, True), exemplar_scale=0.0)
    assert with_ex.shape == stock.shape  # the exemplar's rows are dropped from the output
    torch.testing.assert_close(with_ex[0], stock[0], atol=1e-5, rtol=1e-5)  # the uncond row stays stock
    assert (with_ex[1] - without[1]).abs().max() > 1e-4  # the cond row sees the exemplar
    assert torch.equal(off, without)  # weight 0: no extra rows, the existing path exactly
    # with the self-attention region bias on as well, still finite and different
    both = _run(pipe, _inputs(pipe, True), self_attention_bias=2.0)
    assert torch.isfinite(both).all() and (both[1] - with_ex[1]).abs().max() > 1e-5


def test_layout_option_with_exemplar_image_runs_in_the_pipeline(pipe, tmp_path):
    from PIL import Image

    from tiny_image_pipelines import run_tiny_sd

    Image.new("RGB", (32, 32), (20, 200, 30)).save(tmp_path / "ex.png")
    base = run_tiny_sd(pipe, output_type="latent", steps=2)
    diffattn.apply(pipe, "ficgen", layout=TWO, layers="all")
    try:
        plain = run_tiny_sd(pipe, output_type="latent", steps=2)
    finally:
        diffattn.remove(pipe)
    diffattn.apply(pipe, "ficgen", layout=TWO, layers="all", exemplar_image=str(tmp_path / "ex.png"))
    try:
        out = run_tiny_sd(pipe, output_type="latent", steps=2)
    finally:
        diffattn.remove(pipe)
    assert out.shape == base.shape and (out - plain).abs().max() > 1e-5


def test_option_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="exemplar_scale"):
        diffattn.apply(pipe.unet, "ficgen", exemplar_scale=-1.0)
    with pytest.raises(ValueError, match="exemplar_image"):
        diffattn.apply(pipe.unet, "ficgen", exemplar_image=str(tmp_path / "missing.png"))
    layout = Layout.from_dict(TWO)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        FICGenInputs.from_layouts(layout, torch.zeros(2, 3, 4), exemplar_latents=torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="exemplar_latents must be"):
        FICGenInputs.from_layouts(layout, torch.zeros(2, 3, 4), exemplar_latents=torch.zeros(3, 4, 2, 2),
                                  alphas_cumprod=torch.ones(10))


def test_gradients_reach_trained_modules_with_the_exemplar_path():
    """Training with the exemplar path on: the trainable modules get gradients, the frozen UNet none."""
    from diffattn.api import installed
    from diffattn.methods.ficgen_modules import FICGenModules
    from diffattn.pipelines.demo_unet import DemoUNetConfig, build_demo_unet_pipeline

    demo = build_demo_unet_pipeline(DemoUNetConfig(size=32, channels=(32, 64), layers_per_block=1))
    unet = demo.unet.requires_grad_(False)
    modules = FICGenModules.for_unet(unet, "mid,up1", reference_size=16, encoder_width=4, resampler_depth=1)
    layout = Layout.from_dict({"instances": [{"phrase": "a red circle", "box": [0.1, 0.1, 0.6, 0.6]}]})
    emb = encode_phrases(demo, layout.phrases, "cpu")
    text = encode_phrases(demo, ["a red circle on a gray background"], "cpu")
    x = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    inputs = FICGenInputs.from_layouts(layout, emb, cond_rows=slice(0, 1), exemplar_latents=torch.randn_like(x),
                                       alphas_cumprod=demo.scheduler.alphas_cumprod)
    diffattn.apply(unet, "ficgen", layers="mid,up1", cfg=False)
    installed(unet).runtime.attach_modules(modules)
    try:
        out = unet(x, torch.tensor(300), encoder_hidden_states=text, cross_attention_kwargs={"ficgen": inputs}).sample
    finally:
        diffattn.remove(unet)
    assert out.shape == x.shape
    # the new attention outputs start at zero, so push on the ASFA scores and the attention outputs alike
    out.square().mean().backward()
    grads = [p.grad for p in modules.parameters() if p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads)
    assert all(p.grad is None for p in unet.parameters())

"""`diffattn.explorer` (and `diffattn.masks.preview`): the mask explorer behind `diffattn mask` and the app, checked against independent
references (the radial block mask, a token-level neighborhood mask reduced to tiles by brute force)."""

from __future__ import annotations

import math

import pytest
import torch
from diffattn.kernels.neighborhood.reference import neighborhood_mask

from diffattn.masks import radial_mask
from diffattn.explorer import (
    GEOMETRIES,
    MaskView,
    explore_mask,
    mask_options,
    parse_mask_options,
)


def _brute_tile_mask(shape, kernel_size, stride, dilation, q_tile, kv_tile) -> torch.Tensor:
    """Visited (query tile, key tile) pairs: tiles holding any token pair of the token-level window mask.

    Tiles are laid over group-local coordinates (dilation group major, then the tile grid in raster order), as
    the kernel orders them; computed here from coordinates, independently of the tiling tables.
    """
    tokens = neighborhood_mask(shape, kernel_size, stride, dilation, False)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))

    def tile_index(tile):
        groups = [d for d in dilation]
        counts = [math.ceil(math.ceil(n / d) / t) for n, d, t in zip(shape, dilation, tile)]
        g = torch.zeros(len(coords), dtype=torch.long)
        t = torch.zeros(len(coords), dtype=torch.long)
        for axis in range(len(shape)):
            g = g * groups[axis] + coords[:, axis] % dilation[axis]
            t = t * counts[axis] + (coords[:, axis] // dilation[axis]) // tile[axis]
        return g * math.prod(counts) + t, math.prod(groups) * math.prod(counts)

    qi, nq = tile_index(q_tile)
    ki, nk = tile_index(kv_tile)
    out = torch.zeros(nq, nk, dtype=torch.bool)
    pairs = tokens.nonzero()
    out[qi[pairs[:, 0]], ki[pairs[:, 1]]] = True
    return out


def _view_mask(view: MaskView) -> torch.Tensor:
    """The tile mask the picture shows (recomputed by the explorer's own builder at full size)."""
    from diffattn.kernels.neighborhood.tiling import make_plan

    from diffattn.masks.preview import _tile_mask

    def ints(text):
        return tuple(int(v) for v in text.split("x"))

    shape, ks, st, dl = (ints(view.info[k]) for k in ("grid", "kernel_size", "stride", "dilation"))
    plan = make_plan(shape, ks, st, dl, (False,) * len(shape), ints(view.info["q_tile"]), ints(view.info["kv_tile"]))
    n_q = plan.groups * math.prod(a.n_q_tiles for a in plan.axes)
    n_k = plan.groups * math.prod(a.n_kv_tiles for a in plan.axes)
    return _tile_mask(plan, torch.arange(n_q), torch.arange(n_k))


def test_radial_uses_the_family_defaults_and_the_real_mask():
    view = explore_mask("radial", (6, 10, 30), block_size=64)  # explicit video grid: Wan defaults
    ref = radial_mask(6, 300, block_size=64, decay_factor=0.2, sink=True)
    assert view.density == pytest.approx(ref.float().mean().item())
    assert view.predicted_speedup == pytest.approx(1 / view.density)
    assert view.info["decay_factor"] == 0.2 and view.info["sink"] is True and view.info["num_blocks"] == ref.shape[0]
    hy = explore_mask("radial", "hunyuan-720p")
    assert hy.info["decay_factor"] == 0.95 and hy.info["sink"] is False and hy.info["grid"] == "33x45x80"
    assert hy.density == pytest.approx(radial_mask(33, 3600, decay_factor=0.95, sink=False).float().mean().item())
    # big masks are pooled for the picture, never for the numbers
    assert max(hy.image.size) < 900 and hy.info["picture"].startswith("2x2 blocks/px")


def test_radial_options_override_defaults():
    view = explore_mask("radial", "wan-14b-720p", decay_factor=1.0, sink=False, block_size=64)
    ref = radial_mask(21, 3600, block_size=64, decay_factor=1.0, sink=False)
    assert view.density == pytest.approx(ref.float().mean().item())


@pytest.mark.parametrize(
    "shape,kernel,stride,dilation,q_tile,kv_tile",
    [
        ((5, 6, 7), (3, 3, 5), (1, 1, 1), (1, 1, 1), (2, 2, 4), (1, 4, 4)),
        ((4, 8, 9), (3, 4, 4), (1, 2, 2), (1, 1, 1), (2, 4, 2), (2, 2, 4)),
        ((12, 10), (5, 3), (2, 1), (2, 3), (2, 8), (8, 2)),
    ],
)
def test_gna_tiles_match_a_brute_force_reduction_of_the_window_mask(shape, kernel, stride, dilation, q_tile, kv_tile):
    view = explore_mask("gna", shape, family="flux" if len(shape) == 2 else "wan", kernel_size=kernel, stride=stride,
                        dilation=dilation, q_tile=q_tile, kv_tile=kv_tile)
    ref = _brute_tile_mask(shape, kernel, stride, dilation, q_tile, kv_tile)
    got = _view_mask(view)
    assert got.shape == ref.shape and torch.equal(got, ref)
    n = math.prod(shape)
    assert view.density == pytest.approx(ref.sum().item() * math.prod(q_tile) * math.prod(kv_tile) / n**2)
    assert view.info["flop_density"] == pytest.approx(neighborhood_mask(shape, kernel, stride, dilation).float().mean().item())
    assert view.predicted_speedup == pytest.approx(1 / view.density)


def test_gna_presets_at_their_geometries():
    hy = explore_mask("gna", "hunyuan-768p", preset="hunyuan-720p")
    assert hy.info["kernel_size"] == "18x24x24" and hy.info["stride"] == "16x8x8"
    assert hy.info["perfectly_block_sparse"] is True
    # perfectly block-sparse: computed work == useful work (18*24*24 / (30*48*80))
    assert hy.density == pytest.approx(18 * 24 * 24 / (30 * 48 * 80))
    flux = explore_mask("gna", "flux-4k", preset="flux-4k")
    assert flux.info["grid"] == "256x256" and flux.info["kernel_size"] == "80x80"
    mix = explore_mask("gna", "wan-14b-720p", preset="wan-720p-cosmos-mix", layer=2)
    assert mix.info["dilation"] == "1x11x5" and mix.info["kernel_size"] == "21x4x16"


def test_freeswim_window_comes_from_the_base_size():
    view = explore_mask("freeswim", "wan-14b-720p")  # base 480x832: window 21 x 31 x 53 tokens
    assert view.info["kernel_size"] == "21x31x53" and view.info["stride"] == "1x1x1"
    assert view.info["flop_density"] == pytest.approx(21 * 31 * 53 / (21 * 45 * 80))
    native = explore_mask("freeswim", "wan-1.3b-480p")  # at the base size the window is the whole grid
    assert native.info["kernel_size"] == "21x30x52" and native.info["flop_density"] == 1.0
    small = explore_mask("freeswim", (3, 8, 10), base_height=64, base_width=64, q_tile=(1, 4, 4), kv_tile=(1, 4, 4))
    assert small.info["kernel_size"] == "3x5x5"
    assert torch.equal(_view_mask(small), _brute_tile_mask((3, 8, 10), (3, 5, 5), (1, 1, 1), (1, 1, 1), (1, 4, 4), (1, 4, 4)))


def test_every_named_geometry_runs_every_method_it_fits():
    for name, geometry in GEOMETRIES.items():
        for method in ("radial", "gna", "freeswim"):
            if method != "gna" and len(geometry.grid) == 2:
                continue
            opts = {"kernel_size": 7} if method == "gna" else {}
            view = explore_mask(method, name, **opts)
            # computed work can exceed dense through tile padding (FreeSwim at its own base size: the whole grid)
            assert 0 < view.info.get("flop_density", view.density) <= 1
            assert view.predicted_speedup == pytest.approx(1 / view.density)
            assert max(view.image.size) < 1400 and view.info["geometry"] == name


def test_tiny_tiles_are_sampled_for_the_picture():
    # the smallest tiles the kernel runs (16 tokens) on a grid with more tile pairs than a whole picture holds
    view = explore_mask("gna", (4, 160, 160), kernel_size=(3, 5, 5), q_tile=(1, 4, 4), kv_tile=(1, 4, 4))
    assert view.info["picture"] == "sampled tiles"
    assert explore_mask("gna", "demo-video", kernel_size=5).info["picture"] == "all tiles"
    # by hand: along time each query frame visits 3 key frames; along a 160-token axis with tiles of 4 and window 5,
    # a query tile visits the key tiles beside it (3), the two border tiles 2: 38 * 3 + 2 * 2 = 118 of 40 x 40 pairs
    assert view.density == pytest.approx((4 * 3 / 4**2) * (118 * 4 * 4 / 160**2) ** 2)
    assert max(view.image.size) < 1400


def test_save_writes_a_png(tmp_path):
    from PIL import Image

    path = explore_mask("radial", "demo-video", block_size=16).save(str(tmp_path / "sub" / "m.png"))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: explore_mask("softpag", "demo-video"), "accepted methods: radial, rectified, freeswim, gna"),
        (lambda: explore_mask("radial", "wan-9000"), "unknown geometry 'wan-9000'; accepted: wan-1.3b-480p"),
        (lambda: explore_mask("radial", (2, 0, 3)), "geometry must be a name"),
        (lambda: explore_mask("radial", "flux-1024"), "radial needs a video geometry"),
        (lambda: explore_mask("freeswim", "flux-1024"), "freeswim needs a video geometry"),
        (lambda: explore_mask("radial", "demo-video", nope=1), "unknown mask option 'nope' for method 'radial'"),
        (lambda: explore_mask("radial", "demo-video", decay_factor=-1.0), "decay_factor"),
        (lambda: explore_mask("radial", "demo-video", block_size=48), "block_size"),
        (lambda: explore_mask("gna", "demo-video"), "needs kernel_size=... or preset="),
        (lambda: explore_mask("gna", "demo-video", kernel_size=3, q_tile=(2, 2)), "q_tile must be 3 ints"),
        (lambda: explore_mask("gna", "demo-video", kernel_size=(3, 3)), "does not fit a 3-D token grid"),
        (lambda: explore_mask("freeswim", "demo-video", base_height=8), "base_height"),
    ],
)
def test_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=None) as err:
        call()
    assert message in str(err.value)


def test_parse_mask_options():
    assert parse_mask_options("radial", ["decay_factor=0.5", "sink=false", "block_size=64"]) == {
        "decay_factor": 0.5, "sink": False, "block_size": 64}
    assert parse_mask_options("gna", {"kernel_size": "18,24,24", "q_tile": "2,8,8", "preset": "None"}) == {
        "kernel_size": (18, 24, 24), "q_tile": (2, 8, 8), "preset": None}
    with pytest.raises(ValueError, match="unknown mask option 'dense_timesteps' for method 'radial'"):
        parse_mask_options("radial", ["dense_timesteps=3"])
    with pytest.raises(ValueError, match="key=value"):
        parse_mask_options("gna", ["kernel_size"])
    assert set(mask_options("freeswim")) == {"base_height", "base_width", "vae_scale_factor", "q_tile", "kv_tile"}
    assert "lower is sparser" in mask_options("radial")["decay_factor"]


def test_demo_geometries_come_from_the_models_configs():
    """The demo models' grids are what their transformers see at their training size (diffattn/pipelines/demo.py)."""
    from diffattn.pipelines.demo import DemoImageConfig, DemoVideoConfig

    v, i = DemoVideoConfig(), DemoImageConfig()
    # video: the pixel-space VAE packs 4 frames per latent frame after the first, patch (1, 2, 2)
    assert GEOMETRIES["demo-video"].grid == ((v.num_frames - 1) // 4 + 1, v.height // 2, v.width // 2)
    assert GEOMETRIES["demo-video"].family == "wan"
    assert GEOMETRIES["demo-image"].grid == (i.size // 2, i.size // 2)
    assert GEOMETRIES["demo-image"].family == "sd3"


def test_masks_beyond_the_memory_limit_are_refused_before_building():
    from diffattn.masks.preview import MAX_MASK_ELEMENTS

    with pytest.raises(ValueError, match="more than the Mask explorer builds"):
        explore_mask("radial", (150, 150, 150))
    # just under the limit at block 128: (8192 blocks)^2 = 2^26 is allowed; one more frame is not
    assert MAX_MASK_ELEMENTS == 8192 ** 2
    with pytest.raises(ValueError, match="8,193 x 8,193"):
        explore_mask("radial", (8193, 128, 1))

"""`rectified` through the adapters of all four families: the method's output equals the float64 reference of
the same formulas applied to the same q/k/v (reordered, text split, forced blocks), tau = 1 equals dense, the
reorder round trip is exact, the per-model defaults and the shared warm-up rule behave."""

from __future__ import annotations

import pytest
import torch

import diffattn
from diffattn.masks import reorder
from diffattn.methods import rectified as rect

import tiny
import tiny_pipelines as tp

GRIDS = {  # small grids with several 16-token blocks
    "wan": dict(frames=4, height=8, width=10),
    "wan_i2v": dict(frames=4, height=8, width=10, text=512),
    "hunyuan_video": dict(frames=4, height=8, width=10),
    "cogvideox": dict(frames=4, height=8, width=10),
    "flux": dict(height=9, width=11),
}
OPTIONS = dict(block_size=16, tau=0.3, sa_drop_rate=0.8, dense_layers=0, dense_timesteps=0)


def _reference(q, k, v, *, return_stats=False, backend=None, **kw):
    out, _ = rect.rectified_attention_reference(q, k, v, **kw)
    return out.to(q.dtype)


@pytest.mark.parametrize("family", list(GRIDS))
def test_method_equals_reference_of_the_same_formulas(family, monkeypatch):
    model, make_inputs = tiny.BUILDERS[family]()
    inputs = make_inputs(batch=2, **GRIDS[family])
    dense = tiny.output_of(model, inputs)
    diffattn.apply(model, "rectified", **OPTIONS)
    try:
        method = diffattn.api.installed(model).runtime
        method.record_stats = True
        fast = tiny.output_of(model, inputs)
        assert method.stats, "the sparse path did not run"
        densities = [s["density"] for s in method.stats]
        assert min(densities) < 1.0, "the test geometry must give a sparse selection"
        method.record_stats = False
        monkeypatch.setattr(rect, "rectified_attention", _reference)
        ref = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert (fast - ref).abs().max().item() <= 2e-5
    assert (fast - dense).abs().max().item() > 1e-4, "rectified must differ from dense on a sparse selection"


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "flux"])
def test_tau_one_equals_dense(family):
    model, make_inputs = tiny.BUILDERS[family]()
    inputs = make_inputs(batch=2, **GRIDS[family])
    dense = tiny.output_of(model, inputs)
    diffattn.apply(model, "rectified", **{**OPTIONS, "tau": 1.0})
    try:
        out = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert (out - dense).abs().max().item() <= 2e-5


def test_batch_rows_are_independent():
    """Batched CFG: each batch element gets its own selection, equal to running it alone."""
    model, make_inputs = tiny.BUILDERS["hunyuan_video"]()
    inputs = make_inputs(batch=2, **GRIDS["hunyuan_video"])
    diffattn.apply(model, "rectified", **OPTIONS)
    try:
        both = tiny.output_of(model, inputs)
        one = tiny.output_of(model, {k: (v[1:] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                                     for k, v in inputs.items()})
    finally:
        diffattn.remove(model)
    assert (both[1:] - one).abs().max().item() <= 2e-5


@pytest.mark.parametrize("grid", [(21, 45, 80), (4, 8, 10), (1, 9, 11), (2, 3, 5), (5, 7, 3)])
@pytest.mark.parametrize("bs", [16, 128])
@pytest.mark.parametrize("order", ["tiles", "gilbert"])
def test_reorder_round_trip_is_exact(grid, bs, order):
    perm = reorder.token_order(grid, order, bs)
    inv = reorder.inverse((grid, order, bs))
    n = grid[0] * grid[1] * grid[2]
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    x = torch.randn(2, 3, n, 4)
    assert torch.equal(x.index_select(2, perm).index_select(2, inv), x)
    nb = -(-n // bs)
    nbr = reorder.neighbor_blocks(grid, order, bs)
    assert nbr.shape == (nb, nb) and torch.equal(nbr, nbr.T) and nbr.diagonal().all()
    if grid[0] > 1:  # the frame-0 square holds exactly the blocks with frame-0 tokens
        ff = reorder.first_frame_blocks(grid, order, bs)
        rows = ff.any(1).nonzero().flatten()
        frame0 = set((inv[: grid[1] * grid[2]] // bs).tolist())
        assert set(rows.tolist()) == frame0


@pytest.mark.parametrize("order", ["tiles", "gilbert"])
def test_to_order_gathers_token_rows_and_undoes_exactly(order):
    """`to_order` equals index_select on the token axis for both input layouts the adapters pass ([B, H, S, D]
    memory from the fused prologue, [B, S, H, D] views), lands in [B, S, H, D] memory, and the inverse is exact."""
    grid = (5, 7, 3)
    perm, inv = reorder.token_order(grid, order, 16), reorder.inverse((grid, order, 16))
    x = torch.randn(2, 3, 105, 8)
    for inp in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
        y = rect.to_order(inp, perm)
        assert torch.equal(y, x.index_select(2, perm))
        assert y.transpose(1, 2).is_contiguous()  # the adapter's flatten to [B, S, H * D] is a view
        assert torch.equal(rect.to_order(y, inv), x)


@pytest.mark.parametrize("order", ["tiles", "gilbert"])
def test_token_order_is_built_once_per_forward(order, monkeypatch):
    """Every layer of a forward reuses the forward's permutation (one geometry lookup per forward, not per layer);
    the output with a compact order and tau = 1 equals dense (RoPE saw the original positions, the undo is exact)."""
    model, make_inputs = tiny.BUILDERS["wan"]()
    inputs = make_inputs(batch=1, **GRIDS["wan"])
    dense = tiny.output_of(model, inputs)
    diffattn.apply(model, "rectified", **{**OPTIONS, "reorder": order, "tau": 1.0})
    try:
        method = diffattn.api.installed(model).runtime
        method.record_stats = True
        lookups = []
        real = method.geometry
        monkeypatch.setattr(method, "geometry", lambda *a: lookups.append(a) or real(*a))
        out = tiny.output_of(model, inputs)
        again = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    layers = len(method.stats) // 2
    assert layers >= 2, "the tiny model must have several sparse layers"
    assert len(lookups) == 2  # one per forward
    assert (out - dense).abs().max().item() <= 2e-5 and torch.equal(out, again)


@pytest.mark.parametrize("grid", [(21, 45, 80), (1, 64, 64), (5, 32, 32), (13, 30, 52)])
@pytest.mark.parametrize("order", ["tiles", "gilbert"])
def test_orders_make_blocks_compact(grid, order):
    """Mean squared distance of a block's tokens from its centroid: tiles (serpentine, so blocks straddling two
    tiles stay compact) and the Gilbert curve against raster order."""
    bs = 128
    hw = grid[1] * grid[2]

    def spread(order):
        perm = reorder.token_order(grid, order, bs)
        n = perm.numel() // bs * bs
        pos = torch.stack([perm // hw, (perm % hw) // grid[2], perm % grid[2]], -1).float()[:n].view(-1, bs, 3)
        return ((pos - pos.mean(1, keepdim=True)) ** 2).sum(-1).mean(1)

    ordered, raster = spread(order), spread("none")
    assert ordered.mean() * 5 < raster.mean() and ordered.max() < raster.mean()


@pytest.mark.parametrize("grid", [(1, 1, 7), (1, 5, 3), (2, 3, 3), (4, 5, 5), (3, 7, 9), (6, 1, 5), (21, 45, 80)])
def test_gilbert_curve_walks_between_neighbours(grid):
    """Any box size: every cell once; consecutive tokens are adjacent cells except a few diagonal steps (odd
    sizes force them: the curve then cannot end at the corner it needs with unit steps only)."""
    t, h, w = grid
    cells = reorder.gilbert_curve(w, h, t)
    assert sorted(cells) == [(x, y, z) for x in range(w) for y in range(h) for z in range(t)]
    c = torch.tensor(cells)
    step = (c[1:] - c[:-1]).abs().sum(-1)
    if step.numel():
        assert step.min() >= 1 and step.max() <= 2
        assert (step == 1).float().mean() > (0.99 if c.shape[0] > 10000 else 0.9)
    perm = reorder.token_order(grid, "gilbert", 128)
    if t > 1:  # frame 0 first, on its own
        assert bool((perm[: h * w] < h * w).all())


def test_gilbert_order_in_a_tiny_pipeline(monkeypatch):
    """reorder="gilbert" end to end: at tau = 1 the output equals dense (the permutation is undone exactly and RoPE
    saw the original positions); at a sparse setting it equals the float64 formulas on the same reordered q/k/v and
    differs from dense."""
    model, make_inputs = tiny.BUILDERS["wan"]()
    inputs = make_inputs(batch=2, **GRIDS["wan"])
    dense = tiny.output_of(model, inputs)
    opts = {**OPTIONS, "reorder": "gilbert", "neighbors": False, "first_frame": False}
    diffattn.apply(model, "rectified", **{**opts, "tau": 1.0})
    try:
        full = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert (full - dense).abs().max().item() <= 2e-5
    diffattn.apply(model, "rectified", **opts)
    try:
        method = diffattn.api.installed(model).runtime
        method.record_stats = True
        fast = tiny.output_of(model, inputs)
        assert min(s["density"] for s in method.stats) < 1.0
        method.record_stats = False
        monkeypatch.setattr(rect, "rectified_attention", _reference)
        ref = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert (fast - ref).abs().max().item() <= 2e-5
    assert (fast - dense).abs().max().item() > 1e-4


def test_model_defaults_per_variant():
    from diffusers import WanTransformer3DModel

    m = rect.RectifiedMethod(rect.RectifiedConfig())
    assert m.settings("wan")["dense_timesteps"] == 5 and m.settings("wan")["sa_drop_rate"] == 0.75
    assert m.settings("hunyuan_video")["dense_layers"] == 0 and m.settings("hunyuan_video")["sa_drop_rate"] == 0.8
    assert m.settings("flux")["sa_drop_rate"] == 0.9
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, text_dim=8, freq_dim=8, ffn_dim=8,
               num_layers=1, rope_max_seq_len=32)
    i2v21 = WanTransformer3DModel(in_channels=36, out_channels=16, image_dim=8, added_kv_proj_dim=16, **cfg)
    i2v22 = WanTransformer3DModel(in_channels=36, out_channels=16, **cfg)
    t2v = WanTransformer3DModel(in_channels=16, out_channels=16, **cfg)
    assert rect.model_variant("wan", i2v21) == "wan2.1-i2v"
    assert rect.model_variant("wan", i2v22, two_experts=True) == "wan2.2-i2v"
    assert rect.model_variant("wan", t2v) == "wan2.1-t2v"
    assert rect.model_variant("wan", t2v, two_experts=True) == "wan2.2-t2v"
    m2 = rect.RectifiedMethod(rect.RectifiedConfig(sa_drop_rate=0.5, dense_timesteps=1))
    assert m2.settings("wan", t2v)["sa_drop_rate"] == 0.5 and m2.settings("wan", t2v)["dense_timesteps"] == 1


def test_options_are_validated():
    with pytest.raises(ValueError, match="tau"):
        diffattn.registry.build_method("rectified", tau=1.5)
    with pytest.raises(ValueError, match="reorder"):
        diffattn.registry.build_method("rectified", reorder="zigzag")
    assert "rectified" in diffattn.available_methods()


def test_wan_pipeline_with_cfg_and_warmup():
    """A real WanPipeline (CFG as two passes): the dense warm-up steps equal dense, later steps differ."""
    pipe = tp.build_tiny_wan_pipeline()
    dense = tp.run_tiny_wan(pipe, steps=3)
    diffattn.apply(pipe, "rectified", block_size=16, dense_layers=0, dense_timesteps=3)
    try:
        warm = tp.run_tiny_wan(pipe, steps=3)
    finally:
        diffattn.remove(pipe)
    assert torch.allclose(torch.as_tensor(warm), torch.as_tensor(dense), atol=1e-5)
    diffattn.apply(pipe, "rectified", block_size=16, dense_layers=0, dense_timesteps=0, tau=0.1, sa_drop_rate=0.9,
                   neighbors=False, first_frame=False)
    try:
        method = diffattn.api.installed(pipe.transformer).runtime
        method.record_stats = True
        sparse = tp.run_tiny_wan(pipe, steps=3)
    finally:
        diffattn.remove(pipe)
    assert torch.isfinite(torch.as_tensor(sparse)).all()
    assert len(method.stats) == 3 * 2 * 2  # steps x CFG passes x layers: every call took the sparse path


def test_mask_explorer_preview_on_the_demo_model():
    """`diffattn mask rectified`: a selection from a real forward of the bundled demo video model."""
    from diffattn.explorer import explore_mask

    view = explore_mask("rectified", "demo-video", block_size=64, layer=1)
    assert 0.0 < view.density < 1.0
    assert view.info["layer"] == 1 and view.image.size[0] > 0
    with pytest.raises(ValueError, match="smaller geometry"):
        explore_mask("rectified", "wan-14b-720p")

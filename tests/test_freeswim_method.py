"""`freeswim` on Wan: the inward window, the [window; full] dual path with the text cross-attention override, the
cross-attention cache, and the reduction to full attention when the window covers the grid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn import registry
from diffattn.methods.base import AttentionMethod
from diffattn.methods.freeswim import FreeSwimConfig, FreeSwimMethod

import tiny
import tiny_pipelines as tp
from test_gna_method import token_keep

# base 64x96 pixels with VAE 8 and patch 2: a 4x6 token grid -> window (T, 2*2+1, 2*3+1) = (T, 5, 7)
BASE = dict(base_height=64, base_width=96)


def test_window_and_scale_from_the_base_resolution():
    m = FreeSwimMethod(FreeSwimConfig(base_height=480, base_width=832))
    from diffattn.context import TokenGrid

    grid = TokenGrid(21, 68, 120)  # 1088x1920, 81 frames
    assert m.window(grid) == (21, 31, 53)  # upstream: 2*15+1, 2*26+1
    d = 128
    full = m.scale(d, grid, grid.num_tokens)
    assert math.isclose(full, d**-0.5 * math.sqrt(math.log(21 * 68 * 120) / math.log(21 * 30 * 52)))
    up = FreeSwimMethod(FreeSwimConfig(scale_mode="upstream")).scale(d, grid, grid.num_tokens)
    assert math.isclose(up, 0.09246, rel_tol=1e-3)  # upstream's sqrt(log_1560(3120) / 128)
    assert FreeSwimMethod(FreeSwimConfig(scale_mode="none")).scale(d, grid, 10) == d**-0.5
    small = TokenGrid(3, 4, 5)
    assert m.window(small) == (3, 4, 5) and m.scale(d, small, small.num_tokens) == d**-0.5


class ManualFreeSwim(AttentionMethod):
    """Reference written from the method's description: rows [window; full] by masked SDPA, the text cross-attention
    of the full rows copied to the window rows."""

    name = "manual"

    def __init__(self, config, window, scales):
        super().__init__(config)
        self.window, self.scales = window, scales

    def attend(self, call):
        b = call.q.shape[0] // 2
        if call.role == "self":
            grid = tuple(call.grid)
            keep = token_keep(grid, self.window, (1, 1, 1), (1, 1, 1), (False, False, False))
            w = F.scaled_dot_product_attention(call.q[:b], call.k[:b], call.v[:b], attn_mask=keep, scale=self.scales[0])
            f = F.scaled_dot_product_attention(call.q[b:], call.k[b:], call.v[b:], scale=self.scales[1])
            return torch.cat([w, f])
        out = F.scaled_dot_product_attention(call.q[b:], call.k[b:], call.v[b:])
        return torch.cat([out, out])


def test_dual_path_equals_a_manual_reference(monkeypatch):
    model, make_inputs = tiny.BUILDERS["wan"]()
    inputs = make_inputs(batch=1, frames=3, height=14, width=20)  # grid 3x7x10, window (3,5,7)
    diffattn.apply(model, "freeswim", **BASE)
    try:
        fast = tiny.output_of(model, inputs)
        method = diffattn.api.installed(model).runtime
        assert sorted(method.cache) == [0, 1], "the full branch's cross-attention must be cached per layer"
        from diffattn.context import TokenGrid

        grid = TokenGrid(3, 7, 10)
        scales = (method.scale(16, grid, 3 * 5 * 7), method.scale(16, grid, grid.num_tokens))
    finally:
        diffattn.remove(model)
    window_only = None
    diffattn.apply(model, "freeswim", dual_path=False, **BASE)
    window_only = tiny.output_of(model, inputs)
    diffattn.remove(model)

    from diffattn.config import MethodConfig

    spec = registry.MethodSpec("manual", "ref", type("C", (MethodConfig,), {"method_name": "manual"}), ("wan",),
                               lambda cfg: ManualFreeSwim(cfg, (3, 5, 7), scales))
    monkeypatch.setitem(registry._REGISTRY, "manual", spec)
    diffattn.apply(model, "manual")
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim else v for k, v in inputs.items()}
    ref = tiny.output_of(model, doubled)[:1]
    diffattn.remove(model)
    assert (fast - ref).abs().max().item() <= 1e-5
    assert (fast - window_only).abs().max().item() > 1e-4, "the cross-attention override must matter"


def _run(pipe, steps=4, **kw):
    # 32x48 pixels: latent grid 2x2x3 tokens; base 32x48 makes the window cover the grid
    return tp.run_tiny_wan(pipe, steps=steps, **kw)


@pytest.fixture(scope="module")
def wan_pipe():
    return tp.build_tiny_wan_pipeline()


def test_window_covering_the_grid_with_cache_steps_1_is_full_attention(wan_pipe):
    dense = _run(wan_pipe)
    diffattn.apply(wan_pipe, "freeswim", base_height=32, base_width=48, cache_steps=1)
    out = _run(wan_pipe)
    diffattn.remove(wan_pipe)
    assert (out - dense).abs().max().item() <= 1e-5


def test_cache_steps_reuse_and_cpu_cache(wan_pipe, spy):
    modes = []
    original = FreeSwimMethod.prepare_forward

    def record(self, ctx, args):
        result = original(self, ctx, args)
        modes.append((ctx.step_index, ctx.pass_name, ctx.extras["freeswim_mode"], args["hidden_states"].shape[0] * (2 if result else 1)))
        return result

    FreeSwimMethod.prepare_forward = record
    try:
        outs = {}
        for device in ("same", "cpu"):
            modes.clear()
            diffattn.apply(wan_pipe, "freeswim", base_height=32, base_width=48, cache_steps=2, cache_device=device)
            outs[device] = _run(wan_pipe, steps=4)
            diffattn.remove(wan_pipe)
    finally:
        FreeSwimMethod.prepare_forward = original
    assert modes == [
        (0, "cond", "dual", 2), (0, "uncond", "window", 1),
        (1, "cond", "cached", 1), (1, "uncond", "window", 1),
        (2, "cond", "dual", 2), (2, "uncond", "window", 1),
        (3, "cond", "cached", 1), (3, "uncond", "window", 1),
    ]
    assert torch.equal(outs["same"], outs["cpu"])
    diffattn.apply(wan_pipe, "freeswim", base_height=32, base_width=48, cache_steps=1)
    every_step = _run(wan_pipe, steps=4)
    diffattn.remove(wan_pipe)
    assert (every_step - outs["same"]).abs().max().item() > 1e-6, "reusing the cache must change the result"


def test_freeswim_errors():
    flux, _ = tiny.BUILDERS["flux"]()
    with pytest.raises(ValueError, match="it supports the families: wan"):
        diffattn.apply(flux, "freeswim")
    model, _ = tiny.BUILDERS["wan"]()
    with pytest.raises(ValueError, match=r"'cache_steps'.*>= 1"):
        diffattn.apply(model, "freeswim", cache_steps=0)
    with pytest.raises(ValueError, match=r"'cache_device'.*one of 'same', 'cpu'"):
        diffattn.apply(model, "freeswim", cache_device="gpu")


def test_window_follows_the_models_patch():
    """The base grid is base pixels / VAE factor / the model's patch: a 1x1 patch doubles Wan's (2x2) window."""
    from diffattn.geometry import TokenGrid

    m = FreeSwimMethod(FreeSwimConfig(base_height=480, base_width=832))
    grid = TokenGrid(21, 200, 200)
    assert m.window(grid) == m.window(grid, (2, 2)) == (21, 31, 53)
    assert m.window(grid, (1, 1)) == (21, 61, 105)  # 2 * (480 / 8 / 2) + 1, 2 * (832 / 8 / 2) + 1
    import math

    n = grid.num_tokens  # the training token count follows the patch too: frames x base grid
    assert m.scale(64, grid, n, (1, 1)) == pytest.approx(64**-0.5 * math.sqrt(math.log(n) / math.log(21 * 60 * 104)))
    assert m.scale(64, grid, n, (2, 2)) == pytest.approx(64**-0.5 * math.sqrt(math.log(n) / math.log(21 * 30 * 52)))

"""The token stream (`diffattn.token_order`): a forward's block stack runs in another token order, permuted once and
undone once, in tiny models of all four families that declare one.

- Dense attention on every layer, in a compact order, equals the stock model: RoPE saw the original positions and
  the undo is exact (the MLPs, norms and modulation act per token).
- Rectified with the per-forward order equals rectified gathering per layer (the same selection, the same math).
- The forwards that must keep the model's order do (per-token timesteps), and say so; `remove` takes the hooks off.
"""

from __future__ import annotations

import logging

import pytest
import torch

import diffattn
from diffattn.adapters import FAMILIES
from diffattn.methods import rectified as rect
from diffattn.token_order import active_order, remove_token_stream

import tiny

GRIDS = {
    "wan": dict(frames=4, height=8, width=10),
    "wan_i2v": dict(frames=4, height=8, width=10, text=512),
    "hunyuan_video": dict(frames=4, height=8, width=10),
    "cogvideox": dict(frames=4, height=8, width=10),
    "cogvideox_norope": dict(frames=4, height=8, width=10),
    "flux": dict(height=9, width=11),
}
BUILDERS = {**tiny.BUILDERS, "cogvideox_norope": lambda: tiny.tiny_cogvideox(rope=False)}
SPARSE = dict(block_size=16, tau=0.3, sa_drop_rate=0.8, dense_layers=0, dense_timesteps=0)


def _spy_orders(method) -> list[bool]:
    """Record, per self/joint attention call, whether its tokens arrived in the forward's order."""
    seen: list[bool] = []
    real = method.attend

    def attend(call):
        if call.role in ("self", "joint"):
            seen.append(active_order(call) is not None)
        return real(call)

    method.attend = attend
    return seen


@pytest.mark.parametrize("family", list(GRIDS))
@pytest.mark.parametrize("order", ["tiles", "gilbert"])
def test_dense_layers_in_a_compact_order_equal_the_stock_model(family, order):
    model, make_inputs = BUILDERS[family]()
    inputs = make_inputs(batch=2, **GRIDS[family])
    stock = tiny.output_of(model, inputs)
    diffattn.apply(model, "rectified", **{**SPARSE, "reorder": order, "dense_layers": 99})
    try:
        seen = _spy_orders(diffattn.api.installed(model).runtime)
        out = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert seen and all(seen), "every self/joint call must see the tokens in the forward's order"
    assert (out - stock).abs().max().item() <= 2e-5


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox", "flux"])
def test_per_forward_order_equals_per_layer_gathers(family):
    model, make_inputs = BUILDERS[family]()
    inputs = make_inputs(batch=2, **GRIDS[family])
    diffattn.apply(model, "rectified", **SPARSE)
    try:
        method = diffattn.api.installed(model).runtime
        seen = _spy_orders(method)
        method.record_stats = True
        once = tiny.output_of(model, inputs)
        assert min(s["density"] for s in method.stats) < 1.0, "the test geometry must give a sparse selection"
        assert seen and all(seen)
        remove_token_stream(model)  # now the forward keeps the model's order and every call gathers
        seen.clear()
        per_layer = tiny.output_of(model, inputs)
        assert seen and not any(seen)
    finally:
        diffattn.remove(model)
    assert (once - per_layer).abs().max().item() <= 2e-5


def test_gradients_with_checkpointing_equal_per_layer_gathers():
    """Training / LoRA: the entry hook runs again when checkpointing recomputes the blocks; gradients match."""
    model, make_inputs = BUILDERS["wan"]()
    model.enable_gradient_checkpointing()
    model.train()
    inputs = make_inputs(batch=1, **GRIDS["wan"])
    diffattn.apply(model, "rectified", **SPARSE)
    grads = []
    try:
        for keep_order in (False, True):
            if keep_order:
                remove_token_stream(model)
            x = inputs["hidden_states"].clone().requires_grad_(True)
            model.zero_grad()
            out = model(**{**inputs, "hidden_states": x}, return_dict=False)[0]
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append((x.grad.clone(), model.blocks[0].attn1.to_q.weight.grad.clone()))
    finally:
        diffattn.remove(model)
    for a, b in zip(*grads):
        assert a.abs().max() > 0 and (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()


def test_per_token_timesteps_keep_the_models_order(caplog):
    """Wan 2.2 TI2V passes a timestep per token: its modulation is in the model's order, so the forward keeps it."""
    model, make_inputs = BUILDERS["wan"]()
    inputs = make_inputs(batch=1, **GRIDS["wan"])
    g = GRIDS["wan"]
    tokens = g["frames"] * (g["height"] // 2) * (g["width"] // 2)
    inputs["timestep"] = torch.linspace(900, 100, tokens)[None]
    diffattn.apply(model, "rectified", **SPARSE)
    try:
        seen = _spy_orders(diffattn.api.installed(model).runtime)
        with caplog.at_level(logging.INFO, logger="diffattn"):
            out = tiny.output_of(model, inputs)
        assert seen and not any(seen)
        assert "keeps the model's token order (per-token timesteps" in caplog.text
        remove_token_stream(model)
        per_layer = tiny.output_of(model, inputs)
    finally:
        diffattn.remove(model)
    assert torch.equal(out, per_layer)


def test_refusals_name_their_reason():
    wan, hunyuan, flux = (FAMILIES[f].token_stream.refuse for f in ("wan", "hunyuan_video", "flux"))
    assert wan(None, {"timestep": torch.ones(1, 5)}, None) and wan(None, {"timestep": torch.ones(1)}, None) is None
    assert flux(None, {"controlnet_block_samples": [torch.ones(1)]}, None) and flux(None, {}, None) is None

    class Config:
        image_condition_type = "token_replace"

    class Model:
        config = Config()

    assert "token-replace" in hunyuan(Model(), {}, None)
    Config.image_condition_type = "latent_concat"
    assert hunyuan(Model(), {}, None) is None


def test_remove_takes_the_hooks_off_and_none_order_installs_none():
    model, make_inputs = BUILDERS["hunyuan_video"]()
    hooks = lambda: (len(model.transformer_blocks[0]._forward_pre_hooks), len(model.norm_out._forward_pre_hooks),  # noqa: E731
                     len(model.rope._forward_hooks))
    before = hooks()
    diffattn.apply(model, "rectified", **SPARSE)
    assert hooks() == tuple(n + 1 for n in before)
    diffattn.remove(model)
    assert hooks() == before and not hasattr(model, "_diffattn_token_stream")
    diffattn.apply(model, "rectified", **{**SPARSE, "reorder": "none"})
    try:
        assert hooks() == before
    finally:
        diffattn.remove(model)
    diffattn.apply(model, "radial", dense_timesteps=0)  # methods that keep the model's order install nothing
    try:
        assert hooks() == before
    finally:
        diffattn.remove(model)


def test_to_order_is_not_called_when_the_forward_runs_in_order(monkeypatch):
    """No per-layer gathers: the output's inverse gather (`to_order`) never runs inside an ordered forward."""
    model, make_inputs = BUILDERS["flux"]()
    inputs = make_inputs(batch=1, **GRIDS["flux"])
    calls = []
    real = rect.to_order
    monkeypatch.setattr(rect, "to_order", lambda *a: calls.append(1) or real(*a))
    diffattn.apply(model, "rectified", **SPARSE)
    try:
        tiny.output_of(model, inputs)
        assert not calls
        remove_token_stream(model)
        tiny.output_of(model, inputs)
        assert calls
    finally:
        diffattn.remove(model)

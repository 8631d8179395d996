"""Shared fixtures: a recording method registered for one test, tiny models on the import path."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def spy(monkeypatch):
    """Registers a method named "spy" that computes dense attention and records every call's description."""
    import torch.nn.functional as F

    from diffattn import registry
    from diffattn.config import MethodConfig
    from diffattn.methods.base import AttentionMethod

    @dataclass
    class SpyConfig(MethodConfig):
        method_name = "spy"

    records: list[dict] = []

    class SpyMethod(AttentionMethod):
        name = "spy"

        def attend(self, call):
            ctx = call.context
            records.append(
                {
                    "layer": call.layer.index,
                    "slot": call.layer.slot,
                    "role": call.role,
                    "grid": None if call.grid is None else tuple(call.grid),
                    "text_len": call.text_len,
                    "text_first": call.text_first,
                    "sq": call.q.shape[2],
                    "sk": call.k.shape[2],
                    "visual": (call.visual_slice().start, call.visual_slice().stop),
                    "key_padding": None if call.key_padding is None else call.key_padding.clone(),
                    "step": None if ctx is None else ctx.step_index,
                    "pass_name": None if ctx is None else ctx.pass_name,
                    "pass_index": None if ctx is None else ctx.pass_index,
                    "num_steps": None if ctx is None else ctx.num_steps,
                    "timestep": None if ctx is None else ctx.timestep,
                    "text_mask": None if ctx is None or ctx.text_mask is None else ctx.text_mask.clone(),
                    "patch_size": None if ctx is None else ctx.patch_size,
                }
            )
            return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=call.attn_mask)

    spec = registry.MethodSpec("spy", "records calls", SpyConfig, registry.ALL_FAMILIES, SpyMethod)
    monkeypatch.setitem(registry._REGISTRY, "spy", spec)
    return records

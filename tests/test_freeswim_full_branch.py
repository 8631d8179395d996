"""FreeSwim's sparse full branch (`full_branch="radial"|"gna"`) against masked-SDPA references, and through a pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn.context import TokenGrid
from diffattn.kernels.block_sparse import block_sparse_attention_reference
from diffattn.masks import radial_mask
from diffattn.methods.freeswim import FreeSwimConfig, FreeSwimMethod

import tiny_pipelines as tp
from test_gna_method import token_keep

GEN = torch.Generator().manual_seed(11)


def _qkv(grid: TokenGrid, heads: int = 2, d: int = 16):
    return [torch.randn(1, heads, grid.num_tokens, d, generator=GEN) for _ in range(3)]


def test_radial_full_branch_is_the_radial_mask_with_the_full_scale():
    grid = TokenGrid(4, 16, 24)  # 384 tokens a frame: 3 blocks of 128
    method = FreeSwimMethod(FreeSwimConfig(base_height=64, base_width=96, vae_scale_factor=4, full_branch="radial",
                                           full_radial_decay=0.5))
    q, k, v = _qkv(grid)
    out = method._full_attention(q, k, v, grid)
    mask = radial_mask(4, 384, block_size=128, decay_factor=0.5, sink=True)
    assert not mask.all(), "the mask must be sparse here"
    scale = method.scale(16, grid, grid.num_tokens)
    ref = block_sparse_attention_reference(q, k, v, mask[None, None], block_size=128, scale=scale)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    dense = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert (out - dense).abs().max() > 1e-3


def test_gna_full_branch_is_a_dilated_window_spanning_the_frame():
    grid = TokenGrid(3, 20, 28)
    method = FreeSwimMethod(FreeSwimConfig(base_height=80, base_width=112, vae_scale_factor=4, full_branch="gna"))
    kernel, dilation = method.full_window(grid)
    assert kernel[0] == 3 and dilation[0] == 1
    for axis, kk, dd in ((grid.height, kernel[1], dilation[1]), (grid.width, kernel[2], dilation[2])):
        assert dd >= 2 and kk % 2 == 1 and kk * dd <= axis and (kk + 2) * dd > axis, (axis, kk, dd)
    q, k, v = _qkv(grid)
    out = method._full_attention(q, k, v, grid)
    keep = token_keep(tuple(grid), kernel, (1, 1, 1), dilation, (False, False, False))
    scale = method.scale(16, grid, grid.num_tokens)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None], scale=scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def wan_pipe():
    return tp.build_tiny_wan_pipeline()


def test_full_branch_through_the_pipeline(wan_pipe):
    """64x96 px, 5 frames (2 latent frames of 4x6 tokens): every branch runs; gna's dilated window changes the video
    (radial's 128-token blocks cover these 48 tokens whole, so it only has to run); `dense` is the default."""
    opts = dict(base_height=32, base_width=48, cache_steps=2)
    outs = {}
    for branch in (None, "dense", "radial", "gna"):
        diffattn.apply(wan_pipe, "freeswim", **opts, **({} if branch is None else {"full_branch": branch}))
        try:
            outs[branch] = wan_pipe(prompt="a red circle", negative_prompt="blue", height=64, width=96, num_frames=5,
                                    num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16,
                                    generator=torch.Generator().manual_seed(0), output_type="pt").frames
        finally:
            diffattn.remove(wan_pipe)
    assert torch.equal(outs[None], outs["dense"])
    assert torch.isfinite(outs["gna"]).all() and (outs["gna"] - outs["dense"]).abs().max() > 1e-5
    assert torch.isfinite(outs["radial"]).all()


def test_full_branch_option_is_validated():
    with pytest.raises(ValueError, match="full_branch"):
        FreeSwimConfig.from_options(full_branch="flash")

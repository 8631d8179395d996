"""The prologue's reference equals the stock op sequences (Wan: torch.nn.RMSNorm across heads + Wan's RoPE;
HunyuanVideo: Diffusers' RMSNorm per head + apply_rotary_emb), the front door validates its arguments, the adapters
keep the stock path on CPU, and the Triton kernel runs under TRITON_INTERPRET=1 in a subprocess."""

from __future__ import annotations

import os

import pytest
import torch

from interpreter import run_under_interpreter
from diffattn.adapters.wan import apply_wan_rope
from diffattn.kernels.prologue import fused_supported, qk_norm_rope, qk_norm_rope_reference

GEN = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _tables(S, D, dtype=torch.float32):
    ang = torch.rand(S, D // 2, generator=GEN, dtype=torch.float64) * 30
    return ang.cos().repeat_interleave(2, -1).to(dtype), ang.sin().repeat_interleave(2, -1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,H,D", [(7, 3, 16), (13, 5, 8)])
def test_reference_is_wan_stock(S, H, D, dtype):
    x = (torch.randn(2, S, H * D, generator=GEN) * 2).to(dtype)
    norm = torch.nn.RMSNorm(H * D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(H * D, generator=GEN))
    cos, sin = _tables(S, D)
    with torch.no_grad():
        stock = apply_wan_rope(norm(x).unflatten(2, (H, D)), cos[None, :, None], sin[None, :, None]).transpose(1, 2)
        # CPU's composite rms_norm rounds x * rstd before the weight; CUDA's fused one does not (see reference.py)
        ref = qk_norm_rope_reference(x, norm.weight, heads=H, eps=1e-6, norm="across", cos=cos, sin=sin,
                                     round_before_weight=dtype != torch.float32)
    # bf16: the stock CPU path and the reference may round the normalised value differently by one step, which
    # moves both rotated outputs of its pair: bound by two steps of the pair's norm (a rotation keeps it)
    r = stock.double()
    pair = r.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*r.shape[:-1], -1, 2).flatten(-2)
    tol = 1e-6 if dtype == torch.float32 else 2 * 2.0**-7
    assert ((ref.double() - r).abs() <= tol * pair + 1e-30).all()
    if dtype == torch.float32:
        assert ref.is_contiguous() and ref.shape == (2, H, S, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_hunyuan_stock(dtype):
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    S, T, H, D = 11, 4, 3, 16
    x = torch.randn(1, S + T, H * D, generator=GEN).to(dtype)
    norm = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(D, generator=GEN))
    cos, sin = _tables(S, D)
    with torch.no_grad():
        y = norm(x.unflatten(2, (H, D)))
        stock = torch.cat([apply_rotary_emb(y[:, :S], (cos, sin), sequence_dim=1), y[:, S:]], dim=1).transpose(1, 2)
        ref = qk_norm_rope_reference(x, norm.weight, heads=H, eps=1e-6, norm="head", cos=cos, sin=sin,
                                     round_before_weight=True)
    assert torch.equal(ref, stock.contiguous()), (ref.double() - stock.double()).abs().max()


def test_reference_front_door_and_offset_write():
    S, H, D = 6, 2, 8
    x = torch.randn(1, S, H * D, generator=GEN)
    cos, sin = _tables(4, D)
    out = torch.zeros(1, H, S + 3, D)
    got = qk_norm_rope(x, None, heads=H, norm="across", cos=cos, sin=sin, out=out, out_offset=3)
    assert got is out and torch.equal(out[:, :, :3], torch.zeros(1, H, 3, D))
    ref = qk_norm_rope_reference(x, None, heads=H, norm="across", cos=cos, sin=sin)
    assert torch.equal(out[:, :, 3:], ref)
    assert torch.equal(ref[:, :, 4:], qk_norm_rope_reference(x, None, heads=H, norm="across")[:, :, 4:]), \
        "tokens past the tables must not be rotated"


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(heads=5), "heads"),
        (dict(norm="layer"), "norm"),
        (dict(weight=torch.ones(3)), "weight"),
        (dict(cos=torch.ones(6, 8)), "cos and sin"),
        (dict(cos=torch.ones(6, 7), sin=torch.ones(6, 7)), "cos/sin"),
        (dict(cos=torch.ones(9, 8), sin=torch.ones(9, 8)), "cover"),
        (dict(out=torch.zeros(1, 2, 5, 8)), "out_offset"),
        (dict(out_offset=2), "out_offset needs out"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_validation_names_the_argument(kwargs, word):
    args = dict(x=torch.randn(1, 6, 16), weight=None, heads=2, norm="across")
    args.update(kwargs)
    x, weight = args.pop("x"), args.pop("weight")
    with pytest.raises(ValueError, match=word):
        qk_norm_rope(x, weight, **args)


def test_cpu_and_float32_keep_the_stock_path():
    """Outside CUDA (and the interpreter) and in float32 the adapters never take the fused path."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("interpreter is on in this process")
    x = torch.randn(1, 4, 32, dtype=torch.bfloat16)
    assert not fused_supported(x, None, 2)
    assert not fused_supported(x.float(), None, 2)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        qk_norm_rope(x, None, heads=2, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine test_prologue_triton.py runs directly")
def test_prologue_kernel_under_interpreter():
    """Runs tests/test_prologue_triton.py in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    run_under_interpreter("test_prologue_triton.py", timeout=600)

"""The fused prologue kernel against its reference on fresh random inputs (odd sizes, every norm mode, RoPE on all,
some or no tokens, strided inputs, writes at an offset).

Runs on CUDA when there is a GPU; otherwise only under TRITON_INTERPRET=1 (on CPU, small shapes), which
test_prologue.py::test_prologue_kernel_under_interpreter arranges in a subprocess.
"""

from __future__ import annotations

import os

import pytest
import torch

from interpreter import INTERP, triton_device_and_mark  # noqa: E402

DEVICE, pytestmark = triton_device_and_mark("test_prologue.py")
CUDA = DEVICE == "cuda"

from diffattn.kernels.prologue import qk_norm_rope, qk_norm_rope_reference  # noqa: E402

GEN = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-22}


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=GEN) * scale).to(device=DEVICE, dtype=dtype)


def _tables(S, D):
    """Pair-repeated cos/sin tables as Wan's and HunyuanVideo's RoPE build them."""
    ang = torch.rand(S, D // 2, generator=GEN, dtype=torch.float64) * 50
    cos = ang.cos().repeat_interleave(2, -1).float().to(DEVICE)
    sin = ang.sin().repeat_interleave(2, -1).float().to(DEVICE)
    return cos, sin


def _close(out, ref, dtype, seed):
    """At most one rounding step apart (the float32 sum of squares may be ordered differently), and rarely.

    Triton's interpreter converts float32 to bfloat16 by truncation (checked with triton 3.6-3.9: about half of all
    values differ from round-to-nearest-even), so under it bfloat16 results may be two truncations off and the
    rarity check applies to float16 only; on a GPU the conversion rounds to nearest and all checks apply."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), f"non-finite output (seed {seed})"
    diff = (out - ref).abs()
    truncating = INTERP and dtype == torch.bfloat16
    ulps = 3 if truncating else 2
    # a rounding step in the normalised value moves both rotated outputs of its pair: measure against the pair's
    # norm (a rotation keeps it), not against an output that may have cancelled to near zero
    pair = ref.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*ref.shape[:-1], -1, 2).flatten(-2)
    bound = ulps * ULP[dtype] * pair + 1e-30 + (1e-6 if dtype == torch.float32 else 0)
    assert (diff <= bound).all(), f"max diff {diff.max().item():.3g} (seed {seed})"
    if not truncating and dtype != torch.float32:  # float32 keeps the last bit of a differently summed rstd
        assert (diff > 0).double().mean().item() < 0.2, f"too many rounding differences (seed {seed})"


CASES = [
    # B, S, H, D, norm, rope tokens (None: no RoPE; -1: all), weight, round_before_weight
    (1, 7, 3, 16, "across", -1, True, False),
    (2, 13, 5, 32, "across", -1, True, True),
    (2, 9, 4, 16, "head", -1, True, True),
    (1, 11, 3, 32, "head", 6, True, True),
    (2, 5, 2, 16, "head", None, True, False),
    (1, 6, 3, 16, "none", -1, False, False),
    (1, 10, 6, 64, "across", None, True, False),
    (1, 4, 2, 16, "across", 3, False, False),
]
if CUDA:
    CASES += [(2, 1023, 40, 128, "across", -1, True, False), (1, 777, 24, 128, "head", 700, True, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype):
    B, S, H, D, norm, n_rope, has_w, round_w = case
    x = _randn(B, S, H * D, dtype=dtype, scale=3.0)
    w = None
    if has_w:
        w = (1 + 0.5 * _randn(H * D if norm == "across" else D)).to(dtype)
    cos = sin = None
    if n_rope is not None:
        cos, sin = _tables(S if n_rope == -1 else n_rope, D)
    kw = dict(heads=H, eps=1e-6, norm=norm, cos=cos, sin=sin, round_before_weight=round_w)
    out = qk_norm_rope(x, w, backend="triton", **kw)
    ref = qk_norm_rope_reference(x.cpu(), None if w is None else w.cpu(), **{
        **kw, "cos": None if cos is None else cos.cpu(), "sin": None if sin is None else sin.cpu()})
    assert out.shape == (B, H, S, D) and out.dtype == dtype and out.is_contiguous()
    _close(out, ref, dtype, GEN.initial_seed())


def test_strided_input_and_offset_write():
    """A chunk of a fused QKV projection (row stride 3*inner) written into the middle of a joint sequence."""
    B, S, H, D, T = 2, 9, 3, 32, 4
    qkv = _randn(B, S, 3 * H * D, dtype=torch.bfloat16)
    q = qkv.chunk(3, dim=-1)[0]
    assert q.stride(1) == 3 * H * D
    w = (1 + 0.3 * _randn(D)).to(torch.bfloat16)
    cos, sin = _tables(S, D)
    out = torch.full((B, H, T + S + T, D), 7.0, dtype=torch.bfloat16, device=DEVICE)
    qk_norm_rope(q, w, heads=H, norm="head", cos=cos, sin=sin, round_before_weight=True, out=out, out_offset=T,
                 backend="triton")
    ref = qk_norm_rope_reference(q.cpu(), w.cpu(), heads=H, norm="head", cos=cos.cpu(), sin=sin.cpu(),
                                 round_before_weight=True)
    _close(out[:, :, T:T + S], ref, torch.bfloat16, GEN.initial_seed())
    assert (out[:, :, :T] == 7).all() and (out[:, :, T + S:] == 7).all(), "wrote outside its rows"


def test_wan_rope_table_view():
    """Wan hands the tables as [1, S, 1, D] views; the front door reads them as [S, D]."""
    B, S, H, D = 1, 8, 2, 16
    x = _randn(B, S, H * D, dtype=torch.bfloat16)
    cos, sin = _tables(S, D)
    out = qk_norm_rope(x, None, heads=H, norm="across", cos=cos[None, :, None], sin=sin[None, :, None],
                       backend="triton")
    ref = qk_norm_rope_reference(x.cpu(), None, heads=H, norm="across", cos=cos.cpu(), sin=sin.cpu())
    _close(out, ref, torch.bfloat16, GEN.initial_seed())


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_adapters_use_the_prologue_and_match_stock(family, monkeypatch):
    """bf16 tiny models: `dense` through the fused prologue (every self/joint call, counted) stays within bf16
    rounding of the stock processors; the kernel's wrong-RoPE variant is caught by the same bound."""
    import diffattn
    from diffattn.adapters import hunyuan_video as hv_adapter, wan as wan_adapter

    import tiny

    model, make_inputs = tiny.BUILDERS[family]()
    model = model.to(device=DEVICE, dtype=torch.bfloat16)
    if family == "wan":
        model.rope.to(torch.float32)  # as from_pretrained(torch_dtype=bf16) keeps it (_keep_in_fp32_modules)
    inputs = {k: (v.to(DEVICE, torch.bfloat16) if v.is_floating_point() else v.to(DEVICE))
              for k, v in make_inputs(batch=2).items()}
    ref = tiny.output_of(model, inputs).double()

    module = wan_adapter if family == "wan" else hv_adapter
    calls = []
    real = module.fused_norm_rope

    def counting(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "fused_norm_rope", counting)
    diffattn.apply(model, "dense")
    try:
        out = tiny.output_of(model, inputs).double()

        def without_rope(norm, x, heads, mode, cos=None, sin=None, **kwargs):
            return real(norm, x, heads, mode, None, None, **kwargs)

        monkeypatch.setattr(module, "fused_norm_rope", without_rope)
        no_rope = tiny.output_of(model, inputs).double()
    finally:
        diffattn.remove(model)
    assert calls, "the fused prologue never ran"
    rel = ((out - ref).norm() / ref.norm()).item()
    rel_wrong = ((no_rope - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel
    assert rel_wrong > 5 * max(rel, 1e-3), (rel, rel_wrong)

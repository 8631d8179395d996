"""Neighborhood attention through the block-sparse lowering on the GPU: the "fa4" and "gluon" backends of the
neighborhood registry against the float64 reference (output, lse, gradients through the Triton block-sparse
backward), the registry's choice from a measured table, and the refusal of plans that are not exactly block-sparse.

Errors are relative Frobenius norms vs float64, printed as RESULT lines (and appended to DIFFATTN_TEST_OUT)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from diffattn.kernels import backends as registry  # noqa: E402
from diffattn.kernels.neighborhood import neighborhood_attention, neighborhood_attention_reference  # noqa: E402
from metrics import record, rel_error  # noqa: E402

GEN = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3}

# exactly block-sparse at 128-token tiles: (shape, kernel, stride, dilation, q_tile, kv_tile, text tokens, batch)
CASES = [
    ((8, 16, 32), (4, 8, 16), (4, 8, 16), 1, (2, 8, 8), (2, 8, 8), 0, 2),
    ((8, 16, 32), (4, 8, 16), (4, 8, 16), 1, (2, 8, 8), (2, 8, 8), 77, 2),
    ((64, 48), (32, 16), (16, 16), 1, (8, 16), (8, 16), 9, 1),
    ((12, 16, 48), (4, 8, 16), (4, 8, 8), (1, 1, 2), (2, 8, 8), (4, 8, 4), 5, 2),  # dilation, unequal tile shapes
    ((6, 16, 40), (4, 8, 16), (3, 8, 16), 1, (1, 8, 16), (2, 8, 8), 0, 2),  # padded query tiles on the last axis
]


def _randn(*shape, dtype):
    return torch.randn(*shape, generator=GEN).to(device="cuda", dtype=dtype).requires_grad_()


def _needs(name: str, dtype=torch.bfloat16):
    q = torch.empty(1, 8, 16, 32, 2, 128, device="cuda", dtype=dtype)
    req = registry.make_request("neighborhood", q, head_dim=128, block_size=128, block_sparse_plan=True,
                                need_grad=False)
    reason = registry.backends("neighborhood")[name].why_not(req)
    if reason:
        pytest.skip(f"{name}: {reason}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-T{c[6]}-B{c[7]}")
@pytest.mark.parametrize("name", ["fa4", "gluon"])
def test_lowered_backend_matches_reference(name, case, dtype):
    _needs(name, dtype)
    shape, ks, st, dl, qt, kt, T, B = case
    H, D = 2, 128
    ins = [_randn(B, *shape, H, D, dtype=dtype) for _ in range(3)]
    if T:
        ins += [_randn(B, T, H, D, dtype=dtype) for _ in range(2)]
    ek, ev = (ins[3], ins[4]) if T else (None, None)
    out, lse = neighborhood_attention(*ins[:3], ks, st, dl, extra_k=ek, extra_v=ev, return_lse=True, backend=name,
                                      q_tile=qt, kv_tile=kt)
    go = torch.randn(out.shape, generator=GEN).to(device="cuda", dtype=dtype)
    grads = torch.autograd.grad((out.float() * go.float()).sum(), ins)
    i64 = [t.detach().double().requires_grad_() for t in ins]
    ro, rl = neighborhood_attention_reference(*i64[:3], ks, st, dl, extra_k=i64[3] if T else None,
                                              extra_v=i64[4] if T else None, return_lse=True)
    rg = torch.autograd.grad((ro * go.double()).sum(), i64)
    errs = {"out": rel_error(out, ro), "lse": rel_error(lse, rl)}
    errs.update({f"d{n}": rel_error(a, b) for n, a, b in zip(["q", "k", "v", "ek", "ev"], grads, rg)})
    record(test="neighborhood_lowered", backend=name, dtype=str(dtype)[6:], shape=shape, T=T, B=B, **errs)
    assert out.shape == ins[0].shape and lse.shape == ins[0].shape[:-1]
    tol = TOL[dtype]
    assert errs["out"] < tol and errs["lse"] < 1e-3
    assert all(errs[k] < 3 * tol for k in errs if k.startswith("d"))


def test_forced_lowered_backend_refuses_plain_na_with_the_reason():
    q = torch.randn(1, 8, 16, 32, 2, 128, device="cuda", dtype=torch.bfloat16)
    names = [n for n in ("fa4", "gluon") if registry.backends("block_sparse")[n].available() is None]
    if not names:
        pytest.skip("neither FA4 nor the Gluon module is importable here")
    for name in names:  # a backend that is not importable refuses for that reason first (tested in test_backends)
        with pytest.raises(ValueError, match="not exactly block-sparse: .* tile pairs need a per-element mask"):
            neighborhood_attention(q, q, q, (4, 8, 16), 1, backend=name)


def test_table_routes_exact_plans_to_lowered_backends(tmp_path, monkeypatch):
    """A table row for exact plans ("bf16/d128/b128") sends them to fa4/gluon; plain NA (row "bf16/d128") stays
    on triton, and the result is the same attention either way."""
    order = [n for n in ("fa4", "gluon") if registry.backends("block_sparse")[n].available() is None]
    if not order:
        pytest.skip("neither FA4 nor the Gluon module is importable here")
    kind = registry.device_kind(torch.cuda.get_device_name())
    table = {"device": torch.cuda.get_device_name(), "ops": {"neighborhood": {
        "bf16/d128/b128": {"order": order + ["triton"]}, "bf16/d128": {"order": ["triton"]}}}}
    (tmp_path / f"{kind}.json").write_text(json.dumps(table))
    monkeypatch.setenv("DIFFATTN_TUNED_DIR", str(tmp_path))
    monkeypatch.delenv("DIFFATTN_NEIGHBORHOOD_BACKEND", raising=False)
    registry.clear_cache()
    try:
        q = torch.randn(1, 8, 16, 32, 2, 128, device="cuda", dtype=torch.bfloat16)
        shape = (8, 16, 32)
        exact = registry.make_request("neighborhood", q, head_dim=128, block_size=128, block_sparse_plan=True)
        assert registry.choose(exact) == order[0]
        plain = registry.make_request("neighborhood", q, head_dim=128)
        assert registry.choose(plain) == "triton"
        auto = neighborhood_attention(q, q, q, (4, 8, 16), (4, 8, 16), q_tile=(2, 8, 8), kv_tile=(2, 8, 8))
        tri = neighborhood_attention(q, q, q, (4, 8, 16), (4, 8, 16), q_tile=(2, 8, 8), kv_tile=(2, 8, 8),
                                     backend="triton")
        assert auto.shape == (1, *shape, 2, 128) and rel_error(auto, tri) < 1.5e-2
    finally:
        registry.clear_cache()


@pytest.mark.parametrize("name", ["fa4", "gluon"])
def test_lowered_backend_under_cuda_graph_capture(name):
    """The lowering does no host sync and allocates its block mask before capture: a captured call replays to the
    eager result on new inputs."""
    _needs(name)
    shape, ks, st = (8, 16, 32), (4, 8, 16), (4, 8, 16)
    q, k, v = (torch.randn(2, *shape, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def call():
        return neighborhood_attention(q, k, v, ks, st, backend=name, q_tile=(2, 8, 8), kv_tile=(2, 8, 8))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up off the default stream, as CUDA graphs want
            call()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=GEN).to(t))
    graph.replay()
    torch.cuda.synchronize()
    eager = call()
    err = rel_error(out, eager)
    record(test="neighborhood_lowered_graph", backend=name, rel_err_vs_eager=err)
    assert err == 0.0

"""The backend registry (`diffattn.kernels.backends`) on CPU: the choice and its order, refusal messages, forcing,
the environment variables, the measured table's parsing, and every CPU-runnable backend against the reference on
fresh random odd shapes; Triton through the registry under TRITON_INTERPRET=1 (this file re-run in a subprocess).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os

import pytest
import torch

from diffattn.kernels import backends as registry
from diffattn.kernels.block_sparse import block_sparse_attention, block_sparse_attention_reference
from diffattn.kernels.block_sparse.op import apply_epilogue
from diffattn.kernels.neighborhood import neighborhood_attention, neighborhood_attention_reference

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
GEN = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _cuda_req(**over) -> registry.Request:
    kw = dict(op="block_sparse", device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, head_dim=128,
              block_size=128)
    kw.update(over)
    return registry.Request(**kw)


@pytest.fixture
def clean(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFATTN_BLOCK_SPARSE_BACKEND", raising=False)
    monkeypatch.delenv("DIFFATTN_NEIGHBORHOOD_BACKEND", raising=False)
    monkeypatch.setenv("DIFFATTN_TUNED_DIR", str(tmp_path))
    registry.clear_cache()
    yield tmp_path
    registry.clear_cache()


def _table(path, kind, rows, op="block_sparse"):
    (path / f"{kind}.json").write_text(json.dumps({"device": kind, "ops": {op: rows}}))
    registry.clear_cache()


# ---- the registry ------------------------------------------------------------------------------------------------
def test_every_op_declares_its_backends():
    assert registry.names("block_sparse") == ("triton", "gluon", "fa4", "flex", "blocked", "reference")
    assert registry.names("neighborhood") == ("triton", "fa4", "gluon", "blocked", "reference")
    for op in registry.OPS:
        defaults = [n for n, b in registry.backends(op).items() if b.default]
        assert defaults == ["triton", "blocked"]  # the portable order where the table is silent
    assert registry.backends("block_sparse")["fa4"].caps.backward == "triton"  # forward only: backward routed
    assert registry.backends("block_sparse")["triton"].caps.epilogue == "fused"


def test_cpu_choice_and_refusals_are_logged(clean, caplog):
    q = torch.randn(1, 2, 40, 16)
    req = registry.make_request("block_sparse", q, head_dim=16, block_size=16)
    with caplog.at_level(logging.DEBUG, logger="diffattn"):
        name = registry.choose(req)
    assert name == ("triton" if INTERP else "blocked")
    if not INTERP:
        assert any("triton refused" in r.message and "TRITON_INTERPRET=1" in r.message for r in caplog.records)
    assert any(f"{name} chosen" in r.message for r in caplog.records)
    why = registry.explain(req)
    assert why["reference"] is None and why["blocked"] is None and why["flex"] is None
    assert "CUDA" in why["fa4"] and "CUDA" in why["gluon"]


def test_table_order_wins_and_silence_falls_back(clean, monkeypatch, caplog):
    monkeypatch.setattr(registry, "kind_of", lambda req: "h200" if req.device_type == "cuda" else None)
    req = _cuda_req()
    assert registry.choose(req) == "triton"  # no table at all
    _table(clean, "h200", {req.table_key(): {"order": ["flex", "triton"]}})
    assert registry.choose(req) == "flex"
    assert registry.choose(_cuda_req(dtype=torch.float16)) == "triton"  # no row for fp16
    _table(clean, "h200", {req.table_key(): {"order": ["fa4", "flex"]}})
    fa4_reason = registry.backends("block_sparse")["fa4"].why_not(req)
    with caplog.at_level(logging.DEBUG, logger="diffattn"):
        chosen = registry.choose(req)
    if fa4_reason:  # FA4 not installed here: refused (logged), the next in the table runs
        assert chosen == "flex"
        assert any("fa4 refused" in r.message for r in caplog.records)
    else:
        assert chosen == "fa4"
    # a row whose backends all refuse (fp32 is not FA4's) falls back to the defaults
    _table(clean, "h200", {"fp32/d128/b128": {"order": ["fa4"]}})
    assert registry.choose(_cuda_req(dtype=torch.float32)) == "triton"
    assert registry.candidates(_cuda_req(dtype=torch.float32)) == ["fa4", "triton", "blocked"]


def test_capability_rules_say_why():
    fa4 = registry.backends("block_sparse")["fa4"]
    assert "compute capability sm9x or sm10x" in fa4.why_not(_cuda_req(capability=(8, 0)))
    assert "dtype float32" in fa4.why_not(_cuda_req(dtype=torch.float32))
    assert "block_size 256" in fa4.why_not(_cuda_req(block_size=256))
    assert "head dim 100" in fa4.why_not(_cuda_req(head_dim=100))
    assert "gradient" not in (fa4.why_not(_cuda_req(need_grad=True)) or "")  # backward routed to triton
    triton = registry.backends("block_sparse")["triton"]
    assert triton.why_not(_cuda_req(capability=(8, 0))) is None  # portable
    assert "dtype float64" in triton.why_not(_cuda_req(dtype=torch.float64))
    nfa4 = registry.backends("neighborhood")["fa4"]
    reason = nfa4.why_not(_cuda_req(op="neighborhood", block_size=None))
    assert reason and (registry.NOT_BLOCK_SPARSE in reason or "not importable" in reason)
    ntriton = registry.backends("neighborhood")["triton"]
    assert "epilogue" in ntriton.why_not(_cuda_req(op="neighborhood", block_size=None, has_epilogue=True))


def test_gluon_refuses_with_not_built_when_its_module_is_absent():
    gluon = registry.backends("block_sparse")["gluon"]
    reason = gluon.why_not(_cuda_req())
    if importlib.util.find_spec(registry.GLUON_MODULE) is None:
        assert reason is not None and ("not built" in reason or "Gluon dialect" in reason)
    else:  # the module exists: then only its own checks (or Gluon's absence) may refuse
        assert reason is None or "not built" not in reason


def test_forcing_raises_with_the_reason(clean):
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"backend='fa4' cannot run this block_sparse call: needs CUDA tensors"):
        block_sparse_attention(q, k, v, mask, block_size=16, backend="fa4")
    with pytest.raises(ValueError, match=r"backend must be one of 'triton', 'gluon', 'fa4', 'flex', 'blocked', 'reference'"):
        block_sparse_attention(q, k, v, mask, block_size=16, backend="fa3")
    x = torch.randn(1, 6, 7, 2, 8)
    with pytest.raises(ValueError, match=r"backend='fa4' cannot run this neighborhood call"):
        neighborhood_attention(x, x, x, 3, backend="fa4")


@pytest.mark.parametrize("op,env", [("block_sparse", "DIFFATTN_BLOCK_SPARSE_BACKEND"),
                                    ("neighborhood", "DIFFATTN_NEIGHBORHOOD_BACKEND")])
def test_env_vars_force_and_are_named_in_errors(clean, monkeypatch, op, env):
    q = torch.randn(1, 2, 40, 16)
    req = registry.make_request(op, q, head_dim=16, block_size=16 if op == "block_sparse" else None)
    monkeypatch.setenv(env, "reference")
    assert registry.choose(req) == "reference"
    assert registry.choose(req, "blocked") == "blocked"  # an explicit backend wins over the variable
    monkeypatch.setenv(env, "fa4")
    with pytest.raises(ValueError, match=rf"{env}='fa4' cannot run"):
        registry.choose(req)
    monkeypatch.setenv(env, "nope")
    with pytest.raises(ValueError, match=rf"{env} must be one of"):
        registry.choose(req)


def test_table_parsing_rejects_typos():
    ok = registry.parse_table(json.dumps({"device": "h200", "ops": {"block_sparse": {"bf16/d128/b128": {
        "order": ["fa4", "triton"], "ms": {"fa4": 1.0}}}}}))
    assert ok["ops"]["block_sparse"]["bf16/d128/b128"]["order"] == ["fa4", "triton"]
    for bad, word in (({"ops": {"block_sparse": {"k": {"order": ["fa5"]}}}}, "unknown backends"),
                      ({"ops": {"attention": {}}}, "unknown op"),
                      ({"ops": {"block_sparse": {"k": {"order": "fa4"}}}}, "list of backend names"),
                      ([1, 2], "JSON object")):
        with pytest.raises(ValueError, match=word):
            registry.parse_table(json.dumps(bad))


def test_the_shipped_tables_parse():
    for path in registry.TUNED_DIR.glob("*.json"):
        data = registry.parse_table(path.read_text(), source=str(path))
        assert data["ops"], path


def test_device_kind_and_table_key():
    assert registry.device_kind("NVIDIA H200") == "h200"
    assert registry.device_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert registry.device_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert registry.device_kind("NVIDIA GeForce RTX 4090") == "rtx"[:0] + registry.device_kind("NVIDIA GeForce RTX 4090")
    assert _cuda_req().table_key() == "bf16/d128/b128"
    assert _cuda_req(op="neighborhood", block_size=None, dtype=torch.float16, head_dim=64).table_key() == "fp16/d64"


def test_the_choice_is_cached_per_request(clean):
    q = torch.randn(1, 2, 40, 16)
    req = registry.make_request("block_sparse", q, head_dim=16, block_size=16)
    registry.choose(req)
    calls = []
    orig = registry.Backend.why_not
    try:
        registry.Backend.why_not = lambda self, r: calls.append(self.name) or orig(self, r)
        registry.choose(req)
    finally:
        registry.Backend.why_not = orig
    assert calls == []  # the steady path is a dict lookup


# ---- every CPU-runnable backend vs the reference -----------------------------------------------------------------
def _inputs(B, H, Sq, Sk, D, bs, T, mb, mh, dtype, grad=False):
    q, k, v = (torch.randn(B, H, s, D, generator=GEN, dtype=dtype).requires_grad_(grad) for s in (Sq, Sk, Sk))
    ek = torch.randn(B, H, T, D, generator=GEN, dtype=dtype).requires_grad_(grad) if T else None
    ev = torch.randn(B, H, T, D, generator=GEN, dtype=dtype).requires_grad_(grad) if T else None
    mask = torch.rand(mb, mh, math.ceil(Sq / bs), math.ceil(Sk / bs), generator=GEN) < 0.5
    mask[..., 0, :] = False  # a query block without keys
    mask[..., -1, -1] = True
    return q, k, v, ek, ev, mask


SHAPES = [(1, 2, 53, 77, 16, 16, 0, 1, 2), (2, 3, 70, 45, 24, 32, 5, 2, 1), (1, 1, 33, 100, 32, 16, 3, 1, 1)]


@pytest.mark.parametrize("backend", ["blocked", "flex"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_backends_equal_the_reference(backend, shape):
    """Values, lse and (where the backend has a CPU backward) gradients, with extra keys and the epilogue."""
    grad = backend != "flex"  # Flex has no CPU backward: the registry refuses it (below)
    q, k, v, ek, ev, mask = _inputs(*shape, dtype=torch.float64, grad=grad)
    bs = shape[5]
    nq = mask.shape[2]
    scale = torch.rand(1, shape[1], nq, dtype=torch.float64, generator=GEN) + 0.5
    bias = torch.randn(1, 1, nq, shape[4], dtype=torch.float64, generator=GEN)
    leaves = [t for t in (q, k, v, ek, ev) if t is not None]
    results = {}
    for name in ("reference", backend):
        out, lse = block_sparse_attention(q, k, v, mask, block_size=bs, extra_k=ek, extra_v=ev, return_lse=True,
                                          backend=name, out_scale=scale, out_bias=bias)
        fin = torch.isfinite(lse)
        loss = (out * torch.linspace(-1, 1, shape[4], dtype=torch.float64)).sum() + lse[fin].sum()
        results[name] = (out, lse, torch.autograd.grad(loss, leaves) if grad else ())
    (o1, l1, g1), (o2, l2, g2) = results["reference"], results[backend]
    if not grad:
        with pytest.raises(ValueError, match="no backward on CPU"):
            block_sparse_attention(q.detach().requires_grad_(), k, v, mask, block_size=bs, backend="flex")
    tol = 1e-9 if backend == "blocked" else 1e-6  # Flex's text-key merge (merge_attention_states) runs in float32
    torch.testing.assert_close(o2, o1, rtol=tol, atol=tol)
    assert torch.equal(torch.isfinite(l1), torch.isfinite(l2))
    torch.testing.assert_close(l2[torch.isfinite(l2)], l1[torch.isfinite(l1)], rtol=1e-6, atol=1e-6)  # lse is float32
    for a, b in zip(g2, g1):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_in_low_precision_is_close(dtype):
    q, k, v, ek, ev, mask = _inputs(1, 2, 61, 61, 16, 16, 4, 1, 1, dtype=dtype)
    out = block_sparse_attention(q, k, v, mask, block_size=16, extra_k=ek, extra_v=ev, backend="flex")
    ref, _ = block_sparse_attention_reference(*(t.double() for t in (q, k, v)), mask, block_size=16,
                                              extra_k=ek.double(), extra_v=ev.double())
    assert out.dtype == dtype
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_flex_blockmask_has_a_real_mask_mod_and_full_blocks_only():
    """The trap of issue #18: without a mask_mod Flex's FLASH backend runs dense. Ours always has one, and it
    agrees with the block mask at every token pair."""
    from diffattn.kernels.block_sparse import flex, get_block_index

    mask = torch.rand(1, 2, 4, 5, generator=GEN) < 0.5
    idx = get_block_index(mask)
    bm = flex.block_mask_for(mask, idx.kv_idx, idx.kv_cnt, 60, 75, 16)
    assert bm.mask_mod is not None and bm.mask_mod.__name__ == "mask_mod"
    assert int(bm.kv_num_blocks.sum()) == 0 and torch.equal(bm.full_kv_num_blocks, idx.kv_cnt)
    b, h = torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.long)
    for qi, ki in ((0, 0), (17, 40), (59, 74), (33, 5)):
        got = bool(bm.mask_mod(b, h, torch.tensor(qi), torch.tensor(ki)))
        assert got == bool(mask[0, 1, qi // 16, ki // 16])


def test_unfused_epilogue_equals_the_reference_epilogue():
    q, k, v, _, _, mask = _inputs(1, 2, 50, 50, 8, 16, 0, 1, 1, dtype=torch.float64)
    scale = torch.rand(1, 2, 4, dtype=torch.float64)
    bias = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    plain, _ = block_sparse_attention_reference(q, k, v, mask, block_size=16)
    fused, _ = block_sparse_attention_reference(q, k, v, mask, block_size=16, out_scale=scale, out_bias=bias)
    torch.testing.assert_close(apply_epilogue(plain, scale, bias, 16), fused, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_neighborhood_through_the_registry(clean, backend):
    x = [torch.randn(1, 7, 9, 2, 8, generator=GEN, dtype=torch.float64) for _ in range(3)]
    out = neighborhood_attention(*x, (3, 5), backend=backend)
    ref = neighborhood_attention_reference(*x, (3, 5), (1, 1), (1, 1), (False, False))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# ---- Triton through the registry, under the interpreter ----------------------------------------------------------
@pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess (test below)")
def test_triton_is_the_default_under_the_interpreter_and_matches(clean):
    q, k, v, ek, ev, mask = _inputs(1, 2, 45, 40, 16, 16, 3, 1, 2, dtype=torch.float32)
    req = registry.make_request("block_sparse", q, head_dim=16, block_size=16, has_extra=True)
    assert registry.choose(req) == "triton"
    out, lse = block_sparse_attention(q, k, v, mask, block_size=16, extra_k=ek, extra_v=ev, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, mask, block_size=16, extra_k=ek, extra_v=ev)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=1e-4, atol=1e-4)
    x = [torch.randn(1, 6, 7, 2, 16, generator=GEN) for _ in range(3)]
    nreq = registry.make_request("neighborhood", x[0], head_dim=16)
    assert registry.choose(nreq) == "triton"
    torch.testing.assert_close(neighborhood_attention(*x, 3), neighborhood_attention(*x, 3, backend="reference"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(INTERP or torch.cuda.is_available(), reason="the subprocess itself / CUDA runs the GPU file")
def test_under_interpreter():
    pytest.importorskip("triton")
    from interpreter import run_under_interpreter

    out = run_under_interpreter("test_backends.py", timeout=600, allow_skips=True)
    assert "failed" not in out.splitlines()[-1]


def test_tune_table_orders_by_geomean_and_parses(monkeypatch):
    """`diffattn bench kernels --tune` turns measured rows into a table the registry accepts."""
    import argparse

    from diffattn.bench import kernels as bench

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(bench, "env_line", lambda *a: "test env")
    base = dict(shape="wan14b", heads=40, tokens=75600, flop_floor_ms=1.0, byte_floor_ms=0.1, peak_tflops=800.0,
                bw_gbs=4000.0, refused={}, rel_err_vs_triton={})
    rows = [dict(base, mask="dense", target=1.0, density=1.0, ms={"cudnn": 9.0, "triton": 10.0, "fa4": 8.0, "flex": 12.0}),
            dict(base, mask="radial", target=0.1, density=0.1, ms={"triton": 1.0, "fa4": 0.9, "flex": 1.3}),
            dict(base, mask="band", target=0.1, density=0.1, ms={"triton": 1.0, "fa4": 1.1}),
            dict(base, mask="random", target=0.1, density=0.1, ms={"triton": 1.0, "gluon": 0.5})]
    args = argparse.Namespace(dtype="bf16", head_dim=128, block_size=128, shapes="wan14b", masks="radial,band,random",
                              densities="0.1")
    table = bench.tune_table(rows, args)
    row = table["ops"]["block_sparse"]["bf16/d128/b128"]
    assert row["order"] == ["fa4", "triton", "flex"]  # gluon ran 1 of 4 cases: left out; cudnn is no backend
    assert row["cases"] == 4
    registry.parse_table(json.dumps(table))
    md = bench.render_compare(rows, args)
    assert "| wan14b | radial | 0.100 |" in md and "0.900 (" in md
    assert "| 1.11 |" in md  # triton / fa4 at radial 0.1


def test_fwd_bwd_rows_name_the_backward_mode():
    """`bench kernels --backends ... --bwd-modes` times each forward backend with each Triton backward mode, and
    renders one column per label with the ratio to Flex over the best of ours."""
    import argparse

    from diffattn.bench import kernels as bench

    assert bench.fwd_bwd_labels(["cudnn", "triton", "gluon", "flex"], "fused,atomic") == [
        "triton_fused", "triton_atomic", "gluon_fused", "gluon_atomic", "flex"]
    base = dict(shape="flux4096", heads=24, tokens=65536, flop_floor_ms=1.0, byte_floor_ms=0.1, peak_tflops=800.0,
                bw_gbs=4000.0, refused={}, rel_err_vs_triton={}, mask="dense", target=1.0, density=1.0,
                ms={"triton": 10.0})
    rows = [dict(base, fb_ms={"triton_fused": 40.0, "triton_atomic": 32.0, "flex": 36.0})]
    args = argparse.Namespace(dtype="bf16", head_dim=128, block_size=128, shapes="flux4096", masks="", densities="")
    md = bench.render_compare(rows, args)
    assert "| triton_fused ms | triton_atomic ms | flex ms | flex / best ours |" in md
    assert "| 40.000 | 32.000 | 36.000 | 1.12 |" in md

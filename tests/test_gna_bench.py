"""`diffattn bench gna --backends` rows -> the neighborhood row of the registry's measured table (CPU, no GPU)."""

from __future__ import annotations

import json

from diffattn.bench import gna
from diffattn.kernels import backends as registry


def _rows():
    r = lambda case, impl, ms: dict(case=case, impl=impl, ms=ms)  # noqa: E731
    return [
        r("flux-gna", "cuDNN SDPA (dense)", 85.0),
        r("flux-gna", "ours triton, front door", 10.0),
        r("flux-gna", "ours fa4, front door (permute + block-sparse + unpermute)", 9.0),
        r("flux-gna", "ours fa4, kernel only (tokens in tile order)", 8.0),
        r("flux-gna", "ours gluon, front door (permute + block-sparse + unpermute)", 9.9),
        r("hunyuan-gna", "ours triton, front door", 30.0),
        r("hunyuan-gna", "ours fa4, front door (permute + block-sparse + unpermute)", 27.0),
        r("hunyuan-gna", "ours gluon, front door (permute + block-sparse + unpermute)", 26.0),
        # plain NA: fa4/gluon refused, so the case says nothing about the exact-plan order
        r("flux-na", "ours triton, front door", 14.0),
        r("flux-na", "ours fa4 REFUSED", float("nan")),
    ]


def test_order_is_geomean_over_exact_cases():
    row = gna.neighborhood_order(_rows())
    assert row["cases"] == ["flux-gna", "hunyuan-gna"]
    s = row["geomean_time_vs_fastest"]
    assert abs(s["fa4"] - (27 / 26) ** 0.5) < 1e-3 and abs(s["gluon"] - (9.9 / 9) ** 0.5) < 1e-3
    assert row["order"] == ["fa4", "gluon", "triton"]


def test_write_merges_into_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFATTN_TUNED_DIR", str(tmp_path))
    other = {"device": "NVIDIA H200", "ops": {"block_sparse": {"bf16/d128/b128": {"order": ["fa4", "triton"]}}}}
    (tmp_path / "h200.json").write_text(json.dumps(other))
    path = gna.write_neighborhood_rows(_rows(), "h200", "bf16", 128, "NVIDIA H200", "test")
    data = registry.parse_table(path.read_text())
    assert data["ops"]["block_sparse"] == other["ops"]["block_sparse"]  # the other operation is kept
    assert data["ops"]["neighborhood"]["bf16/d128/b128"]["order"] == ["fa4", "gluon", "triton"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in _rows()))
    assert gna.main(["--tune-from", str(rows), "--kind", "h200"]) == 0


def test_na_backward_bench_settings_and_table(tmp_path, capsys, monkeypatch):
    import inspect

    from diffattn.bench import na_backward as nb
    from diffattn.kernels.neighborhood.tiling import make_plan
    from diffattn.kernels.neighborhood.triton_bwd import ENV_Q_SPLIT, dkv_q_split, na_backward

    # the first setting is the kernel's own default (the reference for the gradient differences)
    monkeypatch.delenv(ENV_Q_SPLIT, raising=False)
    params = inspect.signature(na_backward).parameters
    flux_tiles = make_plan((32, 48), (9, 9), (1, 1), (1, 1), (False, False), (8, 16), (8, 16))
    default = (params["num_warps"].default, params["num_stages"].default, dkv_q_split(flux_tiles))
    assert nb.parse_settings(None) == nb.SETTINGS and nb.SETTINGS[0] == default
    assert nb.parse_settings("8,1,4;4,2,1;8,2,2,3") == ((8, 1, 4), (4, 2, 1), (8, 2, 2, 3))
    import pytest
    with pytest.raises(ValueError, match="warps,stages,q_split"):
        nb.parse_settings("8,1")
    with pytest.raises(ValueError, match="warps,stages,q_split"):
        nb.parse_settings("8,2,2,3,1")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(dict(case="flux-na", impl="ours backward only", note="warps=8 stages=1 q_split=4",
                                    ms=40.0, tflops=300.0, dq_ms=12.5, dkv_ms=26.0, other_ms=1.5,
                                    max_rel_diff_vs_first=2e-3, flop_floor_ms=20.0, byte_floor_ms=0.4)) + "\n")
    assert nb.main(["--table", str(rows)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "| 40.00 | 300 | 12.50 | 26.00 | 1.50 | 2.0e-03 | 20.0 / 0.40 |" in line
    assert nb.main(["--cases", "nope"]) == 2


def test_na_backward_bench_fwd_bwd_routes_agree():
    """The fwd+bwd closures the bench times: the front door and the block-sparse lowering give the same gradients
    (float64, CPU backends), and the lowering refuses a plan that is not exactly block-sparse."""
    import pytest
    import torch

    from diffattn.bench.gna import Case
    from diffattn.bench.na_backward import fwd_bwd
    from diffattn.kernels.neighborhood.functional import get_plan

    case = Case((8, 16), 2, (4, 8), (4, 8))
    plan = get_plan(case.shape, case.kernel_size, case.stride, 1, False, (4, 4), (4, 4))
    q, k, v, go = (torch.randn(1, 8, 16, 2, 8, dtype=torch.float64) for _ in range(4))
    grads = {}
    for name in ("reference", "blocked", "lowered:blocked", "lowered:reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        grads[name] = fwd_bwd(name, *leaves, go, case, plan)()
    for name, g in grads.items():
        for a, b in zip(g, grads["reference"]):
            assert torch.allclose(a, b, atol=1e-10), name
    na_case = Case((9, 13), 2, (4, 5), (1, 1))  # plain NA with borders: masked tile pairs, not block-sparse
    na_plan = get_plan(na_case.shape, na_case.kernel_size, na_case.stride, 1, False, (4, 4), (4, 4))
    with pytest.raises(ValueError, match="not exactly block-sparse"):
        fwd_bwd("lowered:blocked", q, k, v, go, na_case, na_plan)

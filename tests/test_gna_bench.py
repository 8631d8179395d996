"""`diffattn bench gna --backends` rows -> the neighborhood row of the registry's measured table (CPU, no GPU)."""

from __future__ import annotations

import json
import sys

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
    # ... at the front door's stage counts (dQ at 2, dK/dV at 3 first: neighborhood.functional.backward_stages)
    from diffattn.kernels.neighborhood.functional import backward_stages

    q_split = dkv_q_split(flux_tiles)
    dq_stages, dkv_stages = backward_stages(q_split)[0]
    assert dq_stages == params["num_stages"].default
    default = (params["num_warps"].default, dq_stages, q_split, dkv_stages)
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


def _fwd_bwd_rows():
    def r(case, impl, note, ms, exact=True):
        return dict(case=case, impl=impl, note=note, ms=ms, exact_plan=exact, dtype="bf16")
    return [
        r("flux-gna", "ours fwd+bwd, front door", "backend=default", 51.7),
        r("flux-gna", "ours fwd+bwd, front door", "backend=triton", 51.7),
        r("flux-gna", "ours fwd+bwd, front door", "backend=gluon", 46.7),
        r("flux-gna", "ours fwd+bwd, block-sparse lowering", "backend=lowered:triton", 10.0),  # not a backend
        r("flux-gna", "FlexAttention fwd+bwd (our tile order)", "", 45.1),
        r("hunyuan-gna", "ours fwd+bwd, front door", "backend=triton", 150.0),
        r("hunyuan-gna", "ours fwd+bwd, front door", "backend=gluon", 120.0),
        r("hunyuan-gna", "ours fwd+bwd FAILED, front door", "backend=fa4: ModuleNotFoundError: x\ny", float("nan")),
        r("flux-na", "ours fwd+bwd, front door", "backend=triton", 57.3, exact=False),  # masked pairs: no row
    ]


def test_na_backward_tune_writes_the_training_row_and_training_calls_read_it(tmp_path, monkeypatch):
    """`diffattn bench na-backward --tune` orders the front-door backends by fwd+bwd time over exactly block-sparse
    cases and writes the `/grad` row; the registry reads it for calls that need gradients, the forward row (or the
    defaults) otherwise."""
    import torch

    from diffattn.bench import na_backward as nb

    row = nb.grad_order(_fwd_bwd_rows())
    assert row["cases"] == ["flux-gna", "hunyuan-gna"]
    assert row["order"] == ["gluon", "triton"]  # fa4 failed, default is the registry itself, lowered:* no backend
    assert abs(row["geomean_time_vs_fastest"]["triton"] - ((51.7 / 46.7) * (150 / 120)) ** 0.5) < 1e-3

    monkeypatch.setenv("DIFFATTN_TUNED_DIR", str(tmp_path))
    fwd = {"device": "NVIDIA H100", "ops": {"neighborhood": {"bf16/d128/b128": {"order": ["fa4", "triton"]}}}}
    (tmp_path / "h100.json").write_text(json.dumps(fwd))
    saved = tmp_path / "rows.jsonl"
    saved.write_text("\n".join(json.dumps(r) for r in _fwd_bwd_rows()))
    argv = ["bench", "na-backward", "--tune-from", str(saved), "--kind", "h100", "--dtype", "bf16"]
    monkeypatch.setattr(sys, "argv", ["diffattn", *argv])  # as the CLI runs it: the row names the command once
    assert nb.main(argv[2:]) == 0
    data = registry.parse_table((tmp_path / "h100.json").read_text())
    assert data["ops"]["neighborhood"]["bf16/d128/b128/grad"]["generated_by"] == "diffattn " + " ".join(argv)
    assert data["ops"]["neighborhood"]["bf16/d128/b128"] == fwd["ops"]["neighborhood"]["bf16/d128/b128"]  # kept
    assert data["ops"]["neighborhood"]["bf16/d128/b128/grad"]["order"] == ["gluon", "triton"]

    monkeypatch.setattr(registry, "kind_of", lambda req: "h100")
    registry.clear_cache()
    req = registry.Request(op="neighborhood", device_type="cuda", capability=(9, 0), dtype=torch.bfloat16,
                           head_dim=128, block_size=128, block_sparse_plan=True)
    train = registry.Request(**{**req.__dict__, "need_grad": True})
    assert train.table_keys() == ("bf16/d128/b128/grad", "bf16/d128/b128") and req.table_keys() == ("bf16/d128/b128",)
    assert registry.candidates(train)[:2] == ["gluon", "triton"]
    assert registry.candidates(req)[:2] == ["fa4", "triton"]
    fp16_train = registry.Request(**{**train.__dict__, "dtype": torch.float16})
    assert registry.candidates(fp16_train) == ["triton", "blocked"]  # no row at all: the portable defaults
    del data["ops"]["neighborhood"]["bf16/d128/b128/grad"]
    (tmp_path / "h100.json").write_text(json.dumps(data))
    registry.clear_cache()
    assert registry.candidates(train)[:2] == ["fa4", "triton"]  # no training row: the forward row orders it
    assert nb.main(["--tune-from", str(saved), "--kind", "h100", "--dtype", "fp16"]) == 1  # no fp16 rows
    registry.clear_cache()

"""The Triton neighborhood kernels (forward and backward) against the reference: compiled on the GPU where there
is one, else on CPU under TRITON_INTERPRET=1 (`interpreter.worker_device_and_env`).

TRITON_INTERPRET must be set before triton is first imported, and the rest of the suite may already have imported
it, so the kernels run in one subprocess that checks every configuration and prints one JSON line each; the tests
below read those lines (the subprocess runs once per session through a module-scoped fixture). On the GPU machine
this file used to run that subprocess under the interpreter too, where Triton 3.6's interpreter failed every case
with a numpy TypeError: an interpreter limitation, not a kernel result; on CUDA the worker now compiles the
kernels (float32 dots as exact fp32 via TRITON_F32_DEFAULT=ieee), and a worker error carries its traceback tail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CONFIGS = [
    # name, shape, kernel_size, stride, dilation, is_causal, extra tokens, q_tile, kv_tile
    ("1d-odd-na", (37,), 7, 1, 1, False, 0, None, None),
    ("1d-even-strided-dilated-causal-extra", (41,), 8, 3, 2, True, 5, None, None),
    ("1d-blocked-padded", (45,), 9, 9, 1, False, 0, (16,), (16,)),
    ("2d-mixed", (9, 11), (4, 5), (2, 3), (2, 1), (False, True), 0, None, None),
    ("2d-blocksparse-extra", (8, 16), (4, 8), (4, 8), 1, False, 20, (4, 4), (4, 4)),
    ("2d-stride-kernel-borders", (13, 10), (6, 3), (6, 2), 1, False, 3, (4, 4), (2, 8)),
    ("3d-causal-t", (5, 9, 7), (3, 4, 5), (1, 2, 5), (1, 2, 1), (True, False, False), 3, None, None),
    ("3d-gna", (6, 8, 8), (4, 4, 4), (2, 4, 4), 1, False, 0, (2, 4, 4), (2, 4, 4)),
]

# dK/dV in query-row slices: name, shape, kernel_size, stride, dilation, causal, q_tile, kv_tile, text tokens, splits
QSPLIT_CASES = [
    ("qsplit-1d-causal-extra", (45,), 9, 2, 1, True, (64,), (16,), 3, [1, 2, 4]),
    ("qsplit-2d-na-dilated", (9, 13), (4, 5), 1, (1, 2), False, (4, 8), (4, 4), 0, [1, 2]),
    ("qsplit-3d-masked-extra", (5, 6, 10), (3, 3, 5), (1, 2, 1), 1, False, (2, 4, 4), (2, 2, 4), 4, [1, 2]),
]

_WORKER = r"""
import json, os, sys, traceback
DEV = sys.argv[2]
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
import torch
def rnd(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEV).requires_grad_(requires_grad)
from diffattn.kernels.neighborhood import neighborhood_attention, neighborhood_attention_reference, get_plan
from diffattn.kernels.neighborhood.tiling import permute_tokens, unpermute_tokens
from diffattn.kernels.neighborhood.triton_fwd import na_forward

configs, QSPLIT_CASES = json.loads(sys.argv[1])
for i, (name, shape, ks, st, dl, ca, T, qt, kt) in enumerate(configs):
    shape = tuple(shape)
    conv = lambda x: tuple(x) if isinstance(x, list) else x
    ks, st, dl, ca = conv(ks), conv(st), conv(dl), conv(ca)
    torch.manual_seed(1000 + i)
    B, H, D = 2, 2, 24  # D not a power of two: exercises the head-dim mask
    mk = lambda *s: rnd(*s, dtype=torch.float64).float().requires_grad_()
    # q/k/v as non-contiguous views of one packed tensor, like a fused projection
    qkv = rnd(B, *shape, 3, H, D)
    q, k, v = (t.requires_grad_() for t in qkv.clone().unbind(-3))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    ins = [q, k, v]
    ek = ev = None
    if T:
        ek, ev = mk(B, T, H, D), mk(B, T, H, D)
        ins += [ek, ev]
    go = rnd(B, *shape, H, D)
    gl = rnd(B, *shape, H)
    res = {"name": name}
    try:
        o, lse = neighborhood_attention(q, k, v, ks, st, dl, ca, scale=0.3, extra_k=ek, extra_v=ev, return_lse=True,
                                        backend="triton", q_tile=qt, kv_tile=kt)
        grads = torch.autograd.grad((o * go).sum() + (lse * gl).sum(), ins)
        ins64 = [t.detach().double().requires_grad_() for t in ins]
        ro, rl = neighborhood_attention_reference(ins64[0], ins64[1], ins64[2], ks, st, dl, ca, scale=0.3,
                                                  extra_k=ins64[3] if T else None, extra_v=ins64[4] if T else None,
                                                  return_lse=True)
        rg = torch.autograd.grad((ro * go.double()).sum() + (rl * gl.double()).sum(), ins64)
        rel = lambda a, b: float((a.double() - b).norm() / b.norm().clamp_min(1e-30))
        res["out"] = rel(o, ro)
        res["lse"] = rel(lse, rl)
        res["grads"] = [rel(a, b) for a, b in zip(grads, rg)]
        res["finite"] = bool(all(torch.isfinite(t).all() for t in (o, lse, *grads)))
        # the permuted (NATTEN-style) layout through the same kernel
        plan = get_plan(shape, ks, st, dl, ca, qt, kt)
        dil = dl if isinstance(dl, tuple) else (dl,) * len(shape)
        qp = permute_tokens(q.detach(), plan.q_tile, dil)
        kp = permute_tokens(k.detach(), plan.kv_tile, dil)
        vp = permute_tokens(v.detach(), plan.kv_tile, dil)
        op, lp = na_forward(qp, kp, vp, plan, 0.3, ek.detach() if T else None, ev.detach() if T else None, True, "permuted")
        res["permuted_out"] = rel(unpermute_tokens(op, shape, plan.q_tile, dil), ro.detach())
        res["permuted_lse"] = rel(unpermute_tokens(lp, shape, plan.q_tile, dil), rl.detach())
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e} | " + traceback.format_exc()[-1200:]
    print("RESULT " + json.dumps(res), flush=True)

# the TMA mode (Hopper: tiles as TMA boxes read in place), called directly: the front door only takes it on CUDA
for name, shape, ks, st, ca, qt, kt, B, T in [
    ("tma-2d-extra", (8, 16), (4, 8), (4, 8), False, (4, 4), (4, 4), 2, 5),
    ("tma-3d", (6, 8, 8), (4, 4, 4), (4, 4, 4), False, (2, 4, 4), (2, 4, 4), 2, 0),
    ("tma-1d-extra", (64,), (32,), (32,), False, (16,), (16,), 3, 3),
    ("tma-1d-one-tile", (32,), (16,), (16,), False, (16,), (16,), 1, 0),
    # masked tile pairs: plain NA with borders, odd sizes, padding tiles, causal
    ("tma-2d-na-masked-extra", (9, 13), (4, 5), 1, False, (4, 4), (4, 4), 2, 3),
    ("tma-3d-na-masked", (4, 6, 10), (3, 3, 5), (1, 2, 1), False, (2, 4, 4), (2, 4, 4), 2, 0),
    ("tma-1d-causal-extra", (45,), 9, 2, True, (16,), (16,), 3, 2),
    # 3-D, batch 3, axis 0 (5) not a multiple of the tiles: the batch folds into axis 0, tiles straddle elements
    ("tma-3d-straddle-extra", (5, 6, 10), (3, 3, 5), (1, 2, 1), False, (2, 4, 4), (4, 2, 4), 3, 4),
]:
    torch.manual_seed(7)
    q, k, v = (rnd(B, *shape, 2, 16) for _ in range(3))
    ek = ev = None
    if T:
        ek, ev = rnd(B, T, 2, 16), rnd(B, T, 2, 16)
    plan = get_plan(shape, ks, st, 1, ca, qt, kt)
    res = {"name": name, "masked": plan.counts()["masked"]}
    try:
        o, l = na_forward(q, k, v, plan, 0.3, ek, ev, True, "spatial", tma=True)
        ro, rl = neighborhood_attention_reference(q, k, v, ks, st, 1, ca, scale=0.3, extra_k=ek, extra_v=ev,
                                                  return_lse=True)
        res["out"] = float((o - ro).norm() / ro.norm())
        res["lse"] = float((l - rl).norm() / rl.norm())
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e} | " + traceback.format_exc()[-1200:]
    print("RESULT " + json.dumps(res), flush=True)

# the dK/dV kernels with each query tile cut into row slices (DIFFATTN_NA_BWD_QSPLIT): the same gradients
for name, shape, ks, st, dl, ca, qt, kt, T, splits in QSPLIT_CASES:
    shape, ks, st, dl, ca, qt, kt = (tuple(x) if isinstance(x, list) else x for x in (shape, ks, st, dl, ca, qt, kt))
    torch.manual_seed(11)
    B, H, D = 2, 2, 24
    ins = [rnd(B, *shape, H, D, requires_grad=True) for _ in range(3)]
    if T:
        ins += [rnd(B, T, H, D, requires_grad=True) for _ in range(2)]
    go = rnd(B, *shape, H, D)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    ro = neighborhood_attention_reference(*ins64[:3], ks, st, dl, ca, scale=0.3, extra_k=ins64[3] if T else None,
                                          extra_v=ins64[4] if T else None)
    rg = torch.autograd.grad((ro * go.double()).sum(), ins64)
    res = {"name": name, "grads": {}, "vs_whole": {}}
    try:
        whole = None
        for n in splits:
            os.environ["DIFFATTN_NA_BWD_QSPLIT"] = str(n)
            o = neighborhood_attention(*ins[:3], ks, st, dl, ca, scale=0.3, extra_k=ins[3] if T else None,
                                       extra_v=ins[4] if T else None, backend="triton", q_tile=qt, kv_tile=kt)
            g = torch.autograd.grad((o * go).sum(), ins)
            res["grads"][n] = max(float((a.double() - b).norm() / b.norm()) for a, b in zip(g, rg))
            whole = g if whole is None else whole
            res["vs_whole"][n] = max(float((a - b).abs().max()) for a, b in zip(g, whole))
        res["masked"] = get_plan(shape, ks, st, dl, ca, qt, kt).counts()["masked"]
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e} | " + traceback.format_exc()[-1200:]
    finally:
        os.environ.pop("DIFFATTN_NA_BWD_QSPLIT", None)
    print("RESULT " + json.dumps(res), flush=True)

# the dK/dV kernels at their own pipeline depth (dkv_stages=3 fits where the dQ kernel at 3 stages does not)
res = {"name": "dkv-stages"}
try:
    from diffattn.kernels.neighborhood.triton_bwd import na_backward
    torch.manual_seed(5)
    shape, ks = (9, 13), (4, 5)
    plan = get_plan(shape, ks, 1, 1, False, (4, 8), (4, 4))
    q, k, v, go = (rnd(2, *shape, 2, 24) for _ in range(4))
    ek, ev = rnd(2, 3, 2, 24), rnd(2, 3, 2, 24)
    o, lse = na_forward(q, k, v, plan, 0.3, ek, ev, True, "spatial")
    base = na_backward(q, k, v, ek, ev, o, lse, go, None, plan, 0.3)
    deep = na_backward(q, k, v, ek, ev, o, lse, go, None, plan, 0.3, dkv_stages=3)
    res["vs_default"] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(deep, base))
    res["masked"] = plan.counts()["masked"]
except Exception as e:
    res["error"] = f"{type(e).__name__}: {e} | " + traceback.format_exc()[-1200:]
print("RESULT " + json.dumps(res), flush=True)

# torch.compile(fullgraph=True) traces through the custom ops (forward and backward), no graph break
res = {"name": "compile-fullgraph"}
try:
    q, k, v = (rnd(1, 6, 10, 2, 16, requires_grad=True) for _ in range(3))
    def f(q, k, v):
        return neighborhood_attention(q, k, v, (3, 4), (1, 2), backend="triton").square().sum()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    g1 = torch.autograd.grad(cf(q, k, v), (q, k, v))
    g2 = torch.autograd.grad(f(q, k, v), (q, k, v))
    res["grads"] = max(float((a - b).abs().max()) for a, b in zip(g1, g2))
except Exception as e:
    res["error"] = f"{type(e).__name__}: {e} | " + traceback.format_exc()[-1200:]
print("RESULT " + json.dumps(res), flush=True)
"""


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    from interpreter import worker_device_and_env

    dev, env = worker_device_and_env()
    limit = float(os.environ.get("DIFFATTN_TEST_WORKER_TIMEOUT", "600"))  # a GPU job's share of device time
    try:
        proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps([CONFIGS, QSPLIT_CASES]), dev], capture_output=True,
                              text=True, env=env, timeout=limit)
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # the worker is killed; the configs it finished still count
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = f"worker timed out after {limit:.0f} s"
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            out[r["name"]] = r
    if not out:
        pytest.fail(f"the {dev} worker produced no results:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_triton_matches_reference(results, cfg):
    r = results.get(cfg[0])
    assert r is not None, "config missing from worker output"
    assert "error" not in r, r.get("error")
    assert r["finite"]
    # fp32 inputs; the interpreter computes dots in fp32 -> errors at rounding level
    assert r["out"] < 1e-5 and r["lse"] < 1e-5, r
    assert max(r["grads"]) < 1e-4, r
    assert r["permuted_out"] < 1e-5 and r["permuted_lse"] < 1e-5, r


@pytest.mark.parametrize("name,masked", [("tma-2d-extra", False), ("tma-3d", False), ("tma-1d-extra", False),
                                         ("tma-1d-one-tile", False), ("tma-2d-na-masked-extra", True),
                                         ("tma-3d-na-masked", True), ("tma-1d-causal-extra", True),
                                         ("tma-3d-straddle-extra", True)])
def test_tma_kernels_match_reference(results, name, masked):
    r = results.get(name)
    assert r is not None and "error" not in r, r
    assert (r["masked"] > 0) == masked  # both kinds of plan are covered
    assert r["out"] < 1e-5 and r["lse"] < 1e-5, r


@pytest.mark.parametrize("case", QSPLIT_CASES, ids=[c[0] for c in QSPLIT_CASES])
def test_dkv_row_slices_give_the_same_gradients(results, case):
    r = results.get(case[0])
    assert r is not None and "error" not in r, r
    assert r["masked"] > 0  # the window test runs on sliced rows too
    assert sorted(map(int, r["grads"])) == case[-1]
    for n, err in r["grads"].items():
        assert err < 1e-4, (n, r)
        assert r["vs_whole"][n] < 1e-4, (n, r)  # same sums in another grouping: rounding-level differences


@pytest.mark.parametrize("q_split,env", [(3, None), (0, None), (8, None), (None, "two"), (None, "3"), (None, "0")])
def test_dkv_row_slices_are_validated(q_split, env, monkeypatch):
    from diffattn.kernels.neighborhood.tiling import make_plan
    from diffattn.kernels.neighborhood.triton_bwd import ENV_Q_SPLIT, dkv_q_split

    plan = make_plan((40,), (9,), (1,), (1,), (False,), (64,), (16,))  # 64-row query tiles: 1, 2, 4 are allowed
    if env is not None:
        monkeypatch.setenv(ENV_Q_SPLIT, env)
    with pytest.raises(ValueError, match="q_split|DIFFATTN_NA_BWD_QSPLIT"):
        dkv_q_split(plan, q_split)
    monkeypatch.delenv(ENV_Q_SPLIT, raising=False)
    assert [dkv_q_split(plan, n) for n in (None, 1, 2, 4)] == [2, 1, 2, 4]


def test_dkv_row_slices_default_and_environment_fit_each_tile(monkeypatch):
    """The default (2 slices) and the environment's preference are lowered to what a tile allows (>= 16 rows a
    slice); an explicit argument that does not fit is an error."""
    from diffattn.kernels.neighborhood.tiling import make_plan
    from diffattn.kernels.neighborhood.triton_bwd import ENV_Q_SPLIT, dkv_q_split

    rows16 = make_plan((45,), (9,), (9,), (1,), (False,), (16,), (16,))
    rows32 = make_plan((9, 13), (4, 5), (1, 1), (1, 2), (False, False), (4, 8), (4, 4))
    rows128 = make_plan((32, 48), (9, 9), (1, 1), (1, 1), (False, False), (8, 16), (8, 16))
    monkeypatch.delenv(ENV_Q_SPLIT, raising=False)
    assert [dkv_q_split(p) for p in (rows16, rows32, rows128)] == [1, 2, 2]
    monkeypatch.setenv(ENV_Q_SPLIT, "4")
    assert [dkv_q_split(p) for p in (rows16, rows32, rows128)] == [1, 2, 4]
    monkeypatch.setenv(ENV_Q_SPLIT, "1")
    assert [dkv_q_split(p) for p in (rows16, rows32, rows128)] == [1, 1, 1]
    with pytest.raises(ValueError, match="16-row query tile"):
        dkv_q_split(rows16, 2)


def test_backward_tries_deep_dkv_first_and_falls_back(monkeypatch):
    """The front door's backward asks for 3-stage dK/dV first; a variant that fails (out of shared memory on a
    bigger tile) falls to the next, and thin row slices (q_split > 2) never get pipelined dK/dV."""
    import torch
    from diffattn.kernels import common
    from diffattn.kernels.neighborhood import functional, triton_bwd

    assert functional.backward_stages(1)[0] == functional.backward_stages(2)[0] == (2, 3)
    assert all(b == 1 for _, b in functional.backward_stages(4))
    for q_split in (1, 2, 4):
        assert functional.backward_stages(q_split)[-1] == (1, 1)  # the plain variant last, its errors propagate

    calls = []

    def fake(q, k, v, ek, ev, out, lse, d_out, d_lse, plan, scale, num_stages, q_split, dkv_stages):
        calls.append((num_stages, dkv_stages))
        if dkv_stages == 3:
            raise RuntimeError("out of resource: shared memory")
        return q.clone(), k.clone(), v.clone(), None, None

    monkeypatch.setattr(triton_bwd, "na_backward", fake)
    monkeypatch.setattr(common, "_failed", set())
    x = torch.randn(1, 40, 2, 16)
    args = (x, x, x, None, None, x, x[..., 0], x, None, [9], [1], [1], [False], [64], [16], 0.25)
    for _ in range(2):
        functional._na_bwd_op(*args)
    assert calls == [(2, 3), (2, 2), (2, 2)]  # the failed variant is remembered for this plan


def test_dkv_kernels_at_their_own_stage_count(results):
    r = results.get("dkv-stages")
    assert r is not None and "error" not in r, r
    assert r["masked"] > 0
    assert r["vs_default"] < 1e-5, r  # the same sums, another software pipeline


def test_torch_compile_fullgraph(results):
    r = results.get("compile-fullgraph")
    assert r is not None and "error" not in r, r
    assert r["grads"] < 1e-5

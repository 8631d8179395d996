"""The CPU-side sm90 compile check (`diffattn.kernels.sass`): real compiles, real SASS, a comparison that fails."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
pytestmark = pytest.mark.skipif(not os.path.exists(NVDISASM), reason="this Triton wheel ships no nvdisasm")


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "diffattn.kernels.sass", *args], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0", **(env or {})}, timeout=900)


def test_fingerprints_real_sm90_code_and_compare_flags_changes(tmp_path):
    out, sass_dir = tmp_path / "a.json", tmp_path / "sass"
    r = _run(str(out), "na1d", env={"DIFFATTN_SASS_DIR": str(sass_dir)})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [k.split(":")[1] for k in rows] == ["_na_fwd_kernel", "_bwd_delta_kernel", "_na_bwd_dq_kernel",
                                               "_na_bwd_dkv_kernel"]
    fwd = (sass_dir / "na1d-0.sass").read_text()
    assert "MMA" in fwd and "EXIT" in fwd  # tensor-core code for sm90, not an empty file
    assert len({r["sass"] for r in rows.values()}) == 4 and len({r["ptx"] for r in rows.values()}) == 4

    same = _run("--compare", str(out), str(out))
    assert same.returncode == 0 and same.stdout.count("ptx same, sass same") == 4
    changed = dict(rows)
    key = next(iter(changed))
    changed[key] = {**changed[key], "sass": "0" * 16}
    (tmp_path / "b.json").write_text(json.dumps(changed))
    diff = _run("--compare", str(out), str(tmp_path / "b.json"))
    assert diff.returncode == 1 and f"{key}: ptx same, SASS DIFFERS" in diff.stdout


def test_wgmma_serialization_is_told_from_sass_patterns():
    from diffattn.kernels.sass import wgmma_serialized

    mma, wait = "HGMMA.64x128x16.F32 R24, gdesc[UR4], R24, gsb0 ;\n", "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n"
    pipelined = "WARPGROUP.ARRIVE ;\n" + mma * 8 + wait  # one wait per dot of 8 k-steps
    serialized = ("WARPGROUP.ARRIVE ;\n" + mma + wait) * 8  # a wait after every k-step
    assert not wgmma_serialized(pipelined) and wgmma_serialized(serialized) and not wgmma_serialized("FFMA R1, R2 ;")


def test_neighborhood_kernels_keep_wgmma_pipelined_at_production_tiles(tmp_path):
    """ptxas serializes every wgmma of a kernel when one spot breaks its rules; the dQ kernel at the FLUX-4K and
    HunyuanVideo-GNA tiles did (an empty first key box re-zeroing the accumulator; see triton_bwd._dq_box)."""
    out = tmp_path / "tiles.json"
    r = _run(str(out), "_tiles")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {k.split(":")[1] for k in rows} >= {"_na_fwd_kernel", "_na_bwd_dq_kernel", "_na_bwd_dkv_kernel"}
    assert sum(k.startswith("na3d_hunyuan_gna_tiles#") for k in rows) == 4
    assert [k for k, row in rows.items() if row["wgmma_serialized"]] == []


def test_block_sparse_forward_with_text_keeps_wgmma_pipelined(tmp_path):
    """The Hopper config (128x64 tiles, 4 warps, TMA) with text keys and a key tail: a software-pipelined text loop
    ran the kernel out of registers and ptxas serialized every wgmma (C7512); the text loop now runs unpipelined."""
    out = tmp_path / "bs.json"
    r = _run(str(out), "bs_tma_extra")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [k.split(":")[1] for k in rows] == ["_bsa_fwd_kernel", "_bwd_delta_kernel", "_bsa_bwd_fused_kernel"]
    assert [k for k, row in rows.items() if row["wgmma_serialized"]] == []


def test_block_sparse_atomic_backward_is_pipelined_and_reduces_16_bytes_at_a_time(tmp_path):
    """`DIFFATTN_BSA_BWD=atomic` at the Hopper config: one dK/dV kernel, no dQ kernel, the wgmma pipelined, and
    dQ's float32 adds issued as 16-byte vector reductions (a scalar RED per element would quadruple them)."""
    out, sass_dir = tmp_path / "atomic.json", tmp_path / "sass"
    r = _run(str(out), "bs_atomic", env={"DIFFATTN_SASS_DIR": str(sass_dir)})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [k.split(":")[1] for k in rows] == ["_bsa_fwd_kernel", "_bwd_delta_kernel", "_bsa_bwd_dkdv_kernel"]
    assert [k for k, row in rows.items() if row["wgmma_serialized"]] == []
    sass = (sass_dir / "bs_atomic-2.sass").read_text()
    reds = [ln for ln in sass.splitlines() if "REDG" in ln or "ATOMG" in ln]
    assert reds and all("F32x4" in ln for ln in reds)

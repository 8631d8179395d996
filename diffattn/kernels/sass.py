"""Machine-code fingerprints of the project's Triton kernels, made on a machine without a GPU.

Why: a refactor of `@triton.jit` code (helpers shared between kernels, renamed values) should leave the generated
code alone, and a CPU-only session cannot time it. Triton compiles for sm90 without a device (ptxas and nvdisasm
ship with it), so this module drives the real host functions with CPU tensors, turns every `kernel[grid](...)`
into a compile-only warm-up for `GPUTarget("cuda", 90, 32)`, and hashes two things per compiled specialization:
- the PTX instruction stream (line info, debug sections and debug-range labels removed): equal hashes mean the
  compiler front end produced the same program;
- the SASS (nvdisasm, addresses and comments removed): what the GPU runs. ptxas can schedule the same PTX
  differently when only the debug-range labels differ (inlined helpers add them), so compare both.

Run it in its own process (it swaps Triton's active driver):
`python -m diffattn.kernels.sass OUT.json [name-filter]`, once per tree, and compare the two files with
`python -m diffattn.kernels.sass --compare A.json B.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import torch

TARGET = ("cuda", 90, 32)


class _CompileOnlyDriver:
    """Just enough of a CUDA driver for `JITFunction.run(warmup=True)`: device 0, stream 0, an sm90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*TARGET)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only() -> Iterator[list]:
    """Within the block, `kernel[grid](*args)` compiles for sm90 and launches nothing; yields the list that
    collects `(kernel name, CompiledKernel)` in call order."""
    import triton
    from triton.runtime.jit import JITFunction

    compiled: list = []
    original = JITFunction.__getitem__
    previous = triton.runtime.driver._active  # None until something asked for a driver (none exists without a GPU)

    def getitem(self, grid):
        def call(*args, **kwargs):
            k = self.run(*args, grid=grid, warmup=True, **kwargs)
            compiled.append((self.fn.__name__, k))
            return k

        return call

    triton.runtime.driver.set_active(_CompileOnlyDriver())
    JITFunction.__getitem__ = getitem
    try:
        yield compiled
    finally:
        JITFunction.__getitem__ = original
        triton.runtime.driver._active = previous


def sass_text(kernel) -> str:
    """The kernel's SASS, one instruction per line, without addresses, encodings or comments."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        txt = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = []
    for ln in txt.splitlines():
        ln = re.sub(r"/\*[0-9a-f]{4,}\*/", "", ln).strip()
        if ln and not ln.startswith(("//", ".section", ".text")):
            lines.append(ln)
    return "\n".join(lines)


def ptx_instructions(kernel) -> str:
    """The PTX without line info, debug sections and the `$L__tmpN` labels that only delimit debug ranges."""
    txt = re.split(r"\.section\s+\.debug", kernel.asm["ptx"])[0]
    out = []
    for ln in txt.splitlines():
        t = ln.strip()
        if t.startswith((".loc", ".file", "//")) or re.fullmatch(r"\$L__tmp\d+:", t):
            continue
        out.append(re.sub(r"\$L__tmp\d+", "TMP", ln))
    return "\n".join(out)


def wgmma_serialized(sass: str) -> bool:
    """Whether ptxas serialized the kernel's wgmma: every `HGMMA` waits for the one before it
    (`WARPGROUP.DEPBAR` per instruction instead of one per dot). ptxas does this silently for the whole kernel when
    one spot breaks its pipeline rules (its C7515 / C7512 notes: registers of an accumulator written by other
    instructions inside an open pipeline stage, or too few registers); the tensor cores then idle between k-steps."""
    mma = sass.count("HGMMA")
    return mma > 0 and sass.count("WARPGROUP.DEPBAR") >= mma


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


# ---- the specializations: each drives a host function, so its kernels compile as a real call would --------------
def _na(shape, ks, dil, qt, kt, n_text, layout="spatial", tma=False, d=128, bwd=False,
        q_split: int | None = None) -> Callable[[], None]:
    def run() -> None:
        from .neighborhood import triton_bwd, triton_fwd
        from .neighborhood.tiling import make_plan, permute_tokens

        nd = len(shape)
        plan = make_plan(shape, ks, (1,) * nd, dil, (False,) * nd, qt, kt)
        x = torch.randn(2, *shape, 4, d, dtype=torch.bfloat16)
        q, k = (permute_tokens(x, qt, dil), permute_tokens(x, kt, dil)) if layout == "permuted" else (x, x)
        ek = torch.randn(2, n_text, 4, d, dtype=torch.bfloat16) if n_text else None
        out, lse = triton_fwd.na_forward(q, k, k, plan, 0.1, ek, ek, True, layout, tma=tma)
        if bwd:
            triton_bwd.na_backward(x, x, x, ek, ek, out, lse, out, None, plan, 0.1, q_split=q_split)
    return run


def _bs(S, n_text, d=128, bs=128, tma=True, ws=True, rect=False, mode="fused", dtype=torch.bfloat16):
    """Block-sparse forward + backward with the Hopper bf16 configs (`interpret=True` only lets TMA and warp
    specialization be chosen without a device; the configs are given explicitly)."""
    def run() -> None:
        from .block_sparse import triton_bwd, triton_fwd
        from .block_sparse.index import get_block_index

        q = torch.randn(1, 2, S, d, dtype=dtype)
        nk = -(-S // bs)
        g = torch.Generator().manual_seed(0)
        idx = get_block_index(torch.rand(1, 2, nk, nk, generator=g) < 0.5)
        ek = torch.randn(1, 2, n_text, d, dtype=dtype) if n_text else None
        osc = torch.rand(1, 2, nk) if rect else None
        obi = torch.rand(1, 2, nk, d) if rect else None
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, tma=tma, warp_specialize=ws)
        out, lse = triton_fwd.forward(q, q, q, idx.kv_idx, idx.kv_cnt, bs, 0.1, ek, ek, interpret=True, config=cfg,
                                      out_scale=osc, out_bias=obi)
        bcfg = dict(dkdv=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3, tma=tma),
                    dq=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, tma=tma), mode=mode)
        triton_bwd.backward(out, q, q, q, out, lse, None, idx.kv_idx, idx.kv_cnt, idx.q_idx, idx.q_cnt, bs, 0.1, ek, ek,
                            interpret=True, config=bcfg, out_scale=osc, out_bias=obi)
    return run


CASES: dict[str, Callable[[], None]] = {
    "na1d": _na((100,), (17,), (1,), (64,), (64,), 0, bwd=True),
    "na2d_extra": _na((20, 24), (7, 9), (1, 1), (8, 16), (8, 8), 10, bwd=True),
    "na3d": _na((6, 10, 12), (3, 5, 5), (1, 1, 1), (2, 4, 16), (2, 4, 8), 0, bwd=True),
    "na3d_dil_extra": _na((6, 10, 12), (3, 3, 5), (1, 2, 1), (2, 4, 8), (2, 4, 8), 7, bwd=True),
    "na2d_tma": _na((32, 32), (9, 9), (1, 1), (8, 16), (8, 16), 0, tma=True),
    "na3d_tma_extra": _na((8, 16, 16), (3, 5, 5), (1, 1, 1), (2, 4, 16), (2, 4, 16), 5, tma=True),
    "na2d_perm_d80": _na((20, 24), (7, 9), (1, 1), (8, 16), (8, 8), 0, layout="permuted", d=80),
    # the production tiles (what `choose_tiles` picks for HunyuanVideo NA / GNA and FLUX-4K NA / GNA), on small
    # grids: the code depends on the tiles, not on the grid or the stride; the backward's default (2 row slices)
    # and whole query tiles
    "na3d_hunyuan_tiles": _na((12, 16, 16), (5, 9, 9), (1, 1, 1), (8, 4, 4), (4, 8, 4), 0, bwd=True),
    "na3d_hunyuan_tiles_whole": _na((12, 16, 16), (5, 9, 9), (1, 1, 1), (8, 4, 4), (4, 8, 4), 0, bwd=True,
                                    q_split=1),
    "na3d_hunyuan_gna_tiles": _na((12, 16, 16), (5, 9, 9), (1, 1, 1), (2, 8, 8), (2, 8, 8), 0, bwd=True),
    "na2d_flux_tiles": _na((32, 48), (9, 9), (1, 1), (8, 16), (8, 16), 0, bwd=True),
    "na2d_flux_na_tiles": _na((32, 48), (9, 9), (1, 1), (8, 16), (16, 8), 0, bwd=True),
    "na2d_flux_tiles_whole": _na((32, 48), (9, 9), (1, 1), (8, 16), (8, 16), 0, bwd=True, q_split=1),
    "bs_tma_extra": _bs(1000, 17),
    "bs_even_notma": _bs(1024, 0, tma=False, ws=False),
    "bs_rect": _bs(1000, 0, rect=True),
    "bs_split": _bs(1000, 17, mode="split"),
    "bs_atomic": _bs(1000, 17, mode="atomic"),
    "bs_fp32_d64": _bs(300, 5, d=64, tma=False, ws=False, dtype=torch.float32),
}


def fingerprints(name_filter: str = "", sass_dir: str | None = None) -> dict[str, dict]:
    """`{"case#i:kernel": {"ptx", "sass", "sass_lines", "spill_stores"}}` for every kernel the cases compile."""
    rows: dict[str, dict] = {}
    for name, run in CASES.items():
        if name_filter not in name:
            continue
        with compile_only() as compiled:
            run()
        for i, (kname, k) in enumerate(compiled):
            sass = sass_text(k)
            if sass_dir:
                os.makedirs(sass_dir, exist_ok=True)
                with open(os.path.join(sass_dir, f"{name}-{i}.sass"), "w") as f:
                    f.write(sass)
            rows[f"{name}#{i}:{kname}"] = dict(ptx=_sha(ptx_instructions(k)), sass=_sha(sass),
                                               sass_lines=sass.count("\n") + 1, spill_stores=sass.count("STL"),
                                               wgmma_serialized=wgmma_serialized(sass))
    return rows


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """One line per specialization: whether its PTX and SASS are the same in both runs."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            lines.append(f"{key}: only in {'the first' if key in a else 'the second'}")
            continue
        x, y = a[key], b[key]
        ptx = "ptx same" if x["ptx"] == y["ptx"] else "PTX DIFFERS"
        sass = ("sass same" if x["sass"] == y["sass"] else
                f"SASS DIFFERS ({x['sass_lines']} -> {y['sass_lines']} lines, "
                f"{x['spill_stores']} -> {y['spill_stores']} spill stores)")
        lines.append(f"{key}: {ptx}, {sass}")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compare"] and len(argv) == 3:
        with open(argv[1]) as fa, open(argv[2]) as fb:
            lines = compare(json.load(fa), json.load(fb))
        sys.stdout.write("\n".join(lines) + "\n")
        return 0 if all("DIFFERS" not in ln and "only in" not in ln for ln in lines) else 1
    if len(argv) not in (1, 2) or argv[0].startswith("-"):
        sys.stderr.write(__doc__)
        return 2
    rows = fingerprints(argv[1] if len(argv) == 2 else "", os.environ.get("DIFFATTN_SASS_DIR"))
    with open(argv[0], "w") as f:
        json.dump(rows, f, indent=1)
    sys.stdout.write(f"{len(rows)} kernels fingerprinted -> {argv[0]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""GNA simulator: what a neighborhood-attention configuration costs our kernel, and which stride makes it free of masks.

NATTEN's analytical simulator (NATTEN-Sim) is unreleased; this one counts the work our Triton kernel
(`diffattn.kernels.neighborhood`) really does, from the very tables the kernel reads, so its numbers are exact
for the kernel rather than a model of it:

- key tiles visited per query tile (the box of key tiles around each query tile's windows),
- how many visited (query tile, key tile) pairs need a per-element mask,
- FLOP density (useful scores / dense scores) and the speed-ups they bound.

`propose_stride` searches tile shapes and per-axis strides for the smallest stride that makes a setting perfectly
block-sparse (every visited tile pair fully inside every window: no masking, no wasted FLOPs).

Pure Python/torch; no Diffusers import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .checks import normalize_params
from .tiling import MASK_COST, axis_plan, make_plan, pow2_shapes, resolve_tiles

__all__ = ["GNASimulation", "StrideProposal", "simulate", "propose_stride", "natten_fully_block_sparse"]


@dataclass(frozen=True)
class GNASimulation:
    """Work counts for one configuration (per batch element and head; they scale linearly with both)."""

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    q_tiles: int  # query tiles with at least one real token, over all dilation groups
    kv_tiles_per_q_tile: float  # mean key tiles visited per query tile
    max_kv_tiles_per_q_tile: int
    visited_pairs: int
    masked_pairs: int
    flop_density: float  # useful scores / N^2 (the window volume fraction)
    visited_density: float  # computed scores (visited pairs x tile area) / N^2
    perfectly_block_sparse: bool  # no visited pair needs a mask (and nothing is causal)
    natten_block_sparse: bool  # NATTEN's own closed-form test (is_fully_block_sparse), for comparison

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def flop_bound_speedup(self) -> float:
        """Dense FLOPs over useful FLOPs: the best any kernel could do."""
        return 1.0 / self.flop_density

    @property
    def upper_bound_speedup(self) -> float:
        """Dense FLOPs over the FLOPs our kernel computes (visited tile pairs), assuming equal per-FLOP speed."""
        return 1.0 / self.visited_density

    @property
    def expected_speedup(self) -> float:
        """Like `upper_bound_speedup`, with masked pairs costed at MASK_COST x an unmasked pair."""
        unmasked = self.visited_pairs - self.masked_pairs
        work = (unmasked + MASK_COST * self.masked_pairs) * math.prod(self.q_tile) * math.prod(self.kv_tile)
        return self.tokens ** 2 / work

    def __str__(self) -> str:
        def fmt(t):
            return "x".join(str(int(v)) for v in t)

        causal = "" if not any(self.is_causal) else f", causal {tuple(self.is_causal)}"
        return "\n".join([
            f"GNA {fmt(self.shape)} kernel {fmt(self.kernel_size)} stride {fmt(self.stride)} "
            f"dilation {fmt(self.dilation)}{causal}",
            f"  tiles: Q {fmt(self.q_tile)} ({math.prod(self.q_tile)}), KV {fmt(self.kv_tile)} "
            f"({math.prod(self.kv_tile)}); {self.q_tiles} query tiles",
            f"  KV tiles per Q tile: {self.kv_tiles_per_q_tile:.1f} mean, {self.max_kv_tiles_per_q_tile} max; "
            f"masked pairs {self.masked_pairs}/{self.visited_pairs} ({self.masked_pairs / max(self.visited_pairs, 1):.0%})",
            f"  FLOP density {self.flop_density:.4f} (bound {self.flop_bound_speedup:.1f}x); computed density "
            f"{self.visited_density:.4f} (upper bound {self.upper_bound_speedup:.1f}x, expected {self.expected_speedup:.1f}x)",
            f"  perfectly block-sparse: {'yes' if self.perfectly_block_sparse else 'no'} "
            f"(NATTEN's test: {'yes' if self.natten_block_sparse else 'no'})",
        ])


def _natten_axis(L: int, K: int, s: int, Tq: int, Tkv: int) -> bool:
    """NATTEN's `is_fully_block_sparse_int` for one axis (fna_fusion.hpp), as documented."""
    if L == K:
        return True
    wl = K // 2
    last_leader = min((L - 1) // s * s + s // 2, L - 1)
    last_start = min(max(last_leader - wl, 0), L - K)
    return (
        s % Tq == 0
        and K % Tkv == 0
        and (L % s == 0 or last_start % Tkv == 0)
        and ((wl - s // 2) % Tkv == 0 or (L % Tkv == 0 and -(-L // s) == 2 and s + s // 2 >= L - K))
    )


def natten_fully_block_sparse(shape, kernel_size, stride, dilation, is_causal, q_tile, kv_tile) -> bool:
    """NATTEN's closed-form test over all axes (on the per-dilation-group length; uneven groups: False)."""
    p = normalize_params(shape, kernel_size, stride, dilation, is_causal)
    if any(p.is_causal):
        return False
    for i in range(p.ndim):
        if p.shape[i] % p.dilation[i]:
            return False
        if not _natten_axis(p.shape[i] // p.dilation[i], p.kernel_size[i], p.stride[i], q_tile[i], kv_tile[i]):
            return False
    return True


def simulate(
    shape: Sequence[int],
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
) -> GNASimulation:
    """Count the work of one neighborhood-attention configuration in our kernel.

    shape: the spatial token grid (1-3 axes); kernel_size/stride/dilation/is_causal as in `neighborhood_attention`.
    q_tile/kv_tile: tile shapes (default: what the kernel would choose).
    """
    p = normalize_params(shape, kernel_size, stride, dilation, is_causal)
    q_tile, kv_tile = resolve_tiles(p, q_tile, kv_tile)
    plan = make_plan(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, q_tile, kv_tile)
    c = plan.counts()
    n = math.prod(p.shape)
    max_box = 1
    for a in plan.axes:
        max_box *= max(hi - lo for tab in a.q_tab for lo, hi, _, _ in tab)
    return GNASimulation(
        shape=p.shape, kernel_size=p.kernel_size, stride=p.stride, dilation=p.dilation, is_causal=p.is_causal,
        q_tile=q_tile, kv_tile=kv_tile, q_tiles=c["q_tiles"],
        kv_tiles_per_q_tile=c["visited"] / max(c["q_tiles"], 1), max_kv_tiles_per_q_tile=max_box,
        visited_pairs=c["visited"], masked_pairs=c["masked"],
        flop_density=c["window_sum"] / n ** 2,
        visited_density=c["visited"] * plan.block_m * plan.block_n / n ** 2,
        perfectly_block_sparse=c["masked"] == 0 and not any(p.is_causal),
        natten_block_sparse=natten_fully_block_sparse(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                                      q_tile, kv_tile),
    )


@dataclass(frozen=True)
class StrideProposal:
    """The smallest stride (per axis) that is perfectly block-sparse with the given tile shapes."""

    stride: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    simulation: GNASimulation

    def __str__(self) -> str:
        return (f"stride {self.stride} with Q tile {self.q_tile}, KV tile {self.kv_tile}\n"
                + str(self.simulation))


def _axis_perfect(L: int, K: int, s: int, d: int, Tq: int, Tkv: int) -> bool:
    a = axis_plan(L, K, s, d, False, Tq, Tkv)
    return a.visited() == a.inner()


def _smallest_axis_stride(L: int, K: int, d: int, Tq: int, Tkv: int) -> int | None:
    # Long axes: only strides that are multiples of the query tile (a query tile spanning two stride groups is
    # almost never block-aligned) and K itself; short axes: every stride.
    if -(-L // d) <= 4096:
        cands = range(1, K + 1)
    else:
        cands = sorted(set(range(Tq, K + 1, Tq)) | {K})
    for s in cands:
        if _axis_perfect(L, K, s, d, Tq, Tkv):
            return s
    return None


def propose_stride(
    shape: Sequence[int],
    kernel_size,
    dilation=1,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
    block_m: int = 128,
    block_n: int = 128,
) -> StrideProposal | None:
    """Smallest per-axis stride (and a tile shape) making the setting perfectly block-sparse; None if none exists.

    Without q_tile/kv_tile, every power-of-two tile shape with block_m (query) and block_n (key) tokens is tried;
    the proposal minimises the product of the strides (closest to plain neighborhood attention), then the work.
    Causal settings are never block-sparse, so they are not accepted here.
    """
    p = normalize_params(shape, kernel_size, 1, dilation, False)
    nd = p.ndim
    if q_tile is not None and kv_tile is not None:
        pairs = [(tuple(q_tile), tuple(kv_tile))]
    else:
        qs = [tuple(q_tile)] if q_tile is not None else pow2_shapes(nd, block_m.bit_length() - 1)
        ks = [tuple(kv_tile)] if kv_tile is not None else pow2_shapes(nd, block_n.bit_length() - 1)
        pairs = [(a, b) for a in qs for b in ks]
    best: tuple[float, float, StrideProposal] | None = None
    for qt, kt in pairs:
        strides = []
        for i in range(nd):
            s = _smallest_axis_stride(p.shape[i], p.kernel_size[i], p.dilation[i], qt[i], kt[i])
            if s is None:
                break
            strides.append(s)
        else:
            sim = simulate(p.shape, p.kernel_size, tuple(strides), p.dilation, False, qt, kt)
            key = (math.prod(strides), sim.visited_density)
            if best is None or key < best[:2]:
                best = (*key, StrideProposal(tuple(strides), qt, kt, sim))
    return None if best is None else best[2]

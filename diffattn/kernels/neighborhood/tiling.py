"""Multi-dimensional tiling for neighborhood attention: window tables, tile ranges, tile choice, token permutation.

The kernel never evaluates NATTEN's window formulas itself; it reads small per-axis integer tables built here
(per query row: window start and length; per query tile: the box of key tiles it visits and the inner sub-box that
needs no masking; per key tile: the inverse, for the backward). The simulator (`simulator.py`) counts work from
the same tables, so what it predicts is exactly what the kernel does.

Coordinates are group-local: dilation d splits an axis of length L into d interleaved groups; group j holds
coordinates j, j+d, ... and has length Lg = ceil((L - j) / d). Tiles are laid over group-local coordinates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch


@functools.lru_cache(maxsize=1024)
def window_bounds(group_len: int, kernel_size: int, stride: int, causal: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per group-local query x in [0, group_len): (start, length) of its key window (NATTEN semantics)."""
    starts, lengths = [], []
    K, s, L = kernel_size, stride, group_len
    for x in range(L):
        if causal:
            g = min(x // s * s + s - 1, L - 1)
            st = max(g - K + 1, 0)
            ln = x - st + 1
        else:
            g = min(x // s * s + s // 2, L - 1)
            st = min(max(g - K // 2, 0), L - K)
            ln = K
        starts.append(st)
        lengths.append(ln)
    return tuple(starts), tuple(lengths)


@dataclass(frozen=True)
class AxisPlan:
    """Tile ranges along one axis, for every dilation group.

    q_tab[g][qt] = (kv_lo, kv_hi, in_lo, in_hi): key tiles [kv_lo, kv_hi) are visited by query tile qt, and
    [in_lo, in_hi) (a sub-range) need no mask along this axis. kv_tab[g][kt] = (q_lo, q_hi, iq_lo, iq_hi): the same
    relation seen from key tile kt (for the backward). rows[g][x] = (start, length) per query row (padded rows 0, 0).
    """

    length: int
    kernel_size: int
    stride: int
    dilation: int
    causal: bool
    q_tile: int
    kv_tile: int
    group_lens: tuple[int, ...]
    n_q_tiles: int  # per group (max over groups)
    n_kv_tiles: int
    rows: tuple[tuple[tuple[int, int], ...], ...]
    q_tab: tuple[tuple[tuple[int, int, int, int], ...], ...]
    kv_tab: tuple[tuple[tuple[int, int, int, int], ...], ...]

    @property
    def key(self) -> tuple:
        """The small integers this plan is a function of (cheap to hash, unlike the tables)."""
        return (self.length, self.kernel_size, self.stride, self.dilation, self.causal, self.q_tile, self.kv_tile)

    def visited(self) -> int:
        """Sum over (group, query tile) of key tiles visited along this axis."""
        return sum(hi - lo for tab in self.q_tab for lo, hi, _, _ in tab)

    def inner(self) -> int:
        return sum(ihi - ilo for tab in self.q_tab for _, _, ilo, ihi in tab)

    def window_sum(self) -> int:
        """Sum over all query coordinates of the window length (useful key count along this axis)."""
        return sum(ln for r in self.rows for _, ln in r)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=512)
def axis_plan(length: int, kernel_size: int, stride: int, dilation: int, causal: bool, q_tile: int, kv_tile: int) -> AxisPlan:
    """Build the tables for one axis (cached: they depend only on small integers)."""
    group_lens = tuple(_ceil_div(length - j, dilation) for j in range(dilation))
    gmax = group_lens[0]
    nq = _ceil_div(gmax, q_tile)
    nkv = _ceil_div(gmax, kv_tile)
    rows, q_tabs, kv_tabs = [], [], []
    for lg in group_lens:
        st, ln = window_bounds(lg, kernel_size, stride, causal)
        rows.append(tuple(zip(st, ln)) + ((0, 0),) * (nq * q_tile - lg))
        qt_rows = []
        for qt in range(nq):
            x_lo = qt * q_tile
            if x_lo >= lg:
                qt_rows.append((0, 0, 0, 0))
                continue
            x_hi = min(x_lo + q_tile, lg) - 1
            # windows start and end monotonically in x, so the tile's union is [st(x_lo), end(x_hi)) and the
            # keys every row of the tile sees are [st(x_hi), end(x_lo)).
            lo = st[x_lo] // kv_tile
            hi = _ceil_div(st[x_hi] + ln[x_hi], kv_tile)
            ilo = min(max(_ceil_div(st[x_hi], kv_tile), lo), hi)
            ihi = min(max((st[x_lo] + ln[x_lo]) // kv_tile, ilo), hi)
            qt_rows.append((lo, hi, ilo, ihi))
        q_tabs.append(tuple(qt_rows))
        kv_rows = []
        for kt in range(nkv):
            box = [qt for qt, (lo, hi, _, _) in enumerate(qt_rows) if lo <= kt < hi]
            full = [qt for qt, (_, _, ilo, ihi) in enumerate(qt_rows) if ilo <= kt < ihi]
            q_lo, q_hi = (box[0], box[-1] + 1) if box else (0, 0)
            if full and full[-1] + 1 - full[0] == len(full):
                iq_lo, iq_hi = full[0], full[-1] + 1
            else:  # empty (or, defensively, not an interval): mask everything, which is always correct
                iq_lo = iq_hi = q_lo
            # every query tile in the hull [q_lo, q_hi) is processed; one outside `box` is fully masked (safe).
            kv_rows.append((q_lo, q_hi, iq_lo, iq_hi))
        kv_tabs.append(tuple(kv_rows))
    return AxisPlan(length, kernel_size, stride, dilation, causal, q_tile, kv_tile, group_lens, nq, nkv,
                    tuple(rows), tuple(q_tabs), tuple(kv_tabs))


@dataclass(frozen=True)
class Plan:
    """All axes of one problem plus the tile shapes."""

    axes: tuple[AxisPlan, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def block_m(self) -> int:
        return math.prod(self.q_tile)

    @property
    def block_n(self) -> int:
        return math.prod(self.kv_tile)

    @property
    def groups(self) -> int:
        return math.prod(a.dilation for a in self.axes)

    def counts(self) -> dict[str, int]:
        """Exact work counts: (query tile, key tile) pairs visited and how many of them need no mask.

        The visited set is a product of per-axis ranges, so the totals factor per axis.
        """
        visited = math.prod(a.visited() for a in self.axes)
        inner = math.prod(a.inner() for a in self.axes)
        q_tiles = math.prod(sum(1 for tab in a.q_tab for t in tab if t[1] > t[0]) for a in self.axes)
        return {"visited": visited, "unmasked": inner, "masked": visited - inner, "q_tiles": q_tiles,
                "window_sum": math.prod(a.window_sum() for a in self.axes)}

    def tables(self, device: torch.device | str) -> list[torch.Tensor]:
        """Per axis (rows [G, X, 2], q_tab [G, nq, 4], kv_tab [G, nkv, 4]) as int32 tensors on `device`."""
        key = (tuple(a.key for a in self.axes), str(device))
        tabs = _TABLES.get(key)
        if tabs is None:
            tabs = []
            for a in self.axes:
                for tab in (a.rows, a.q_tab, a.kv_tab):
                    tabs.append(torch.tensor(tab, dtype=torch.int32).contiguous().to(device))
            if len(_TABLES) > 256:
                _TABLES.clear()
            _TABLES[key] = tabs
        return tabs


_TABLES: dict[tuple, list[torch.Tensor]] = {}


def make_plan(shape: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
              is_causal: Sequence[bool], q_tile: Sequence[int], kv_tile: Sequence[int]) -> Plan:
    axes = tuple(axis_plan(shape[i], kernel_size[i], stride[i], dilation[i], bool(is_causal[i]), q_tile[i], kv_tile[i])
                 for i in range(len(shape)))
    return Plan(axes, tuple(q_tile), tuple(kv_tile))


def check_tiles(ndim: int, q_tile: Sequence[int], kv_tile: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The tile rule of the Triton kernel, shared by the front door and the simulator: `ndim` entries per tile,
    each a power of two, with a product >= 16. Why: a tile's tokens are one `tl.arange` block (a power of two
    long) and one operand of `tl.dot` (at least 16 rows). Returns the tiles as int tuples."""
    out = []
    for name, tile in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        t = tuple(int(x) for x in tile)
        if len(t) != ndim or any(x < 1 or x & (x - 1) for x in t) or math.prod(t) < 16:
            raise ValueError(f"{name} must be {ndim} powers of two with a product >= 16, got {tuple(tile)}")
        out.append(t)
    return out[0], out[1]


def resolve_tiles(params, q_tile: Sequence[int] | None, kv_tile: Sequence[int] | None):
    """The tiles a plan uses (the front door and the simulator alike): those given, the others chosen by
    `choose_tiles` for the normalized `params` (`checks.NAParams`), all checked by `check_tiles`."""
    p = params
    if q_tile is None or kv_tile is None:
        cq, ck = choose_tiles(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
        q_tile = cq if q_tile is None else q_tile
        kv_tile = ck if kv_tile is None else kv_tile
    return check_tiles(p.ndim, q_tile, kv_tile)


def pow2_shapes(ndim: int, total_log2: int) -> list[tuple[int, ...]]:
    """Every shape of `ndim` powers of two whose product is 2**total_log2."""
    if ndim == 1:
        return [(1 << total_log2,)]
    out = []
    for a in range(total_log2 + 1):
        for rest in pow2_shapes(ndim - 1, total_log2 - a):
            out.append((1 << a,) + rest)
    return out


MASK_COST = 1.35  # relative cost of a masked tile pair vs an unmasked one (per-element window test)


def tile_cost(plan: Plan) -> float:
    c = plan.counts()
    return (c["unmasked"] + MASK_COST * c["masked"]) * plan.block_m * plan.block_n


@functools.lru_cache(maxsize=256)
def choose_tiles(shape: tuple[int, ...], kernel_size: tuple[int, ...], stride: tuple[int, ...],
                 dilation: tuple[int, ...], is_causal: tuple[bool, ...], block_m: int = 128,
                 block_n: int = 128) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Pick power-of-two tile shapes (products block_m and block_n) that minimise the simulated work.

    Q and KV tiles are searched independently-shaped but the cost couples them, so all pairs are tried (at most
    36 x 36 for 3-D, each evaluated from cached per-axis tables).
    """
    ndim = len(shape)
    qs = pow2_shapes(ndim, block_m.bit_length() - 1)
    ks = pow2_shapes(ndim, block_n.bit_length() - 1)
    best, best_cost = None, math.inf
    for qt in qs:
        # do not let a tile be wildly longer than its axis (pure padding)
        if any(qt[i] > 2 * _ceil_div(shape[i], dilation[i]) and qt[i] > 1 for i in range(ndim)):
            continue
        for kt in ks:
            if any(kt[i] > 2 * _ceil_div(shape[i], dilation[i]) and kt[i] > 1 for i in range(ndim)):
                continue
            cost = tile_cost(make_plan(shape, kernel_size, stride, dilation, is_causal, qt, kt))
            # prefer equal Q/KV tiles on ties (one permutation serves both)
            cost *= 1.0 if qt == kt else 1.0 + 1e-9
            if cost < best_cost:
                best, best_cost = (qt, kt), cost
    if best is None:  # tiny axes: fall back to the most balanced shape
        best = (qs[len(qs) // 2], ks[len(ks) // 2])
    return best


# ----------------------------------------------------------------------------------------------------------------
# Token permutation (optional: the kernel addresses tiles in place through strides; permuting first makes every
# tile one contiguous run of rows, as NATTEN's Hopper/Blackwell kernels need for TMA).


def tile_pads(shape: Sequence[int], tile: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Zero rows appended per axis so that each dilation group's length is a whole number of tiles."""
    return [_ceil_div(_ceil_div(shape[i], dilation[i]), tile[i]) * tile[i] * dilation[i] - shape[i]
            for i in range(len(shape))]


def tile_view(x: torch.Tensor, tile: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """`[B, *spatial, H, D]` zero-padded (`tile_pads`) and viewed as `[B, (r, t, d) per axis..., H, D]`: axis i's tile
    grid index r, in-tile index t and dilation group d at dims 1+3i, 2+3i, 3+3i. Both token orders (below and the
    block-sparse lowering's) are permutations of this view."""
    b, h, dd = x.shape[0], x.shape[-2], x.shape[-1]
    spatial = x.shape[1:-2]
    nd = len(spatial)
    pads = tile_pads(spatial, tile, dilation)
    if any(pads):
        pad_arg = [0, 0, 0, 0]
        for i in reversed(range(nd)):
            pad_arg += [0, pads[i]]
        x = torch.nn.functional.pad(x, pad_arg)
    view = [b]
    for i in range(nd):
        view += [(spatial[i] + pads[i]) // (tile[i] * dilation[i]), tile[i], dilation[i]]
    return x.reshape(view + [h, dd])


def permute_tokens(x: torch.Tensor, tile: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """`[B, *spatial, H, D]` -> `[B, G, H, N_pad, D]`, rows ordered tile-grid-major then intra-tile, zero-padded.

    G = prod(dilation) (dilation groups become batch); N_pad = prod over axes of ceil(ceil(L/d)/T)*T.
    """
    b, h, dd = x.shape[0], x.shape[-2], x.shape[-1]
    nd = x.dim() - 3
    x = tile_view(x, tile, dilation)
    order = [0] + [3 + 3 * i for i in range(nd)] + [1 + 3 * nd] + [1 + 3 * i for i in range(nd)] + \
            [2 + 3 * i for i in range(nd)] + [2 + 3 * nd]
    x = x.permute(order)
    g = math.prod(dilation)
    return x.reshape(b, g, h, -1, dd)


def unpermute_tokens(y: torch.Tensor, shape: Sequence[int], tile: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """Inverse of `permute_tokens` (crops the padding): `[B, G, H, N_pad, *rest]` -> `[B, *shape, H, *rest]`."""
    b, h = y.shape[0], y.shape[2]
    rest = list(y.shape[4:])
    nd = len(shape)
    rs, padded = [], []
    for i in range(nd):
        gl = _ceil_div(shape[i], dilation[i])
        r = _ceil_div(gl, tile[i])
        rs.append(r)
        padded.append(r * tile[i] * dilation[i])
    view = [b] + list(dilation) + [h] + rs + list(tile) + rest
    y = y.reshape(view)
    # dims: 0 b, 1..nd dil, nd+1 h, nd+2.. r, 2nd+2.. t, 3nd+2.. rest
    order = [0]
    for i in range(nd):
        order += [nd + 2 + i, 2 * nd + 2 + i, 1 + i]
    order += [nd + 1] + list(range(3 * nd + 2, 3 * nd + 2 + len(rest)))
    y = y.permute(order).reshape([b] + padded + [h] + rest)
    sl = [slice(None)] + [slice(0, shape[i]) for i in range(nd)]
    return y[tuple(sl)]

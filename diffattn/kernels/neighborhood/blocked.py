"""Neighborhood attention in plain PyTorch, one query tile at a time: the CPU fast path.

The reference (reference.py) builds the whole `[N, N]` token mask and `[B, H, N, N]` score matrix: the ground
truth, but on a CPU slower than dense attention (the demo video model, 5,120 tokens, window (3,17,17): 12.6 s a step
against 2.4 s dense). Here the queries are cut into tiles; a tile is a box of one dilation group (group-local
coordinates, as in `tiling.py`), so the keys its queries can see form a box too: per axis from the window start of
its first query to the window end of its last (windows start and end monotonically along an axis). That box is
gathered once per tile and attended with the exact per-token window mask, a `[tile, box]` AND of small per-axis
masks (as an additive 0/-inf bias), plus the extra (text) keys. Work and temporaries are tile-sized; the math is
the reference's (float32, or float64 for float64 inputs; lse in natural log), and it is differentiable by autograd
(gathers, SDPA/matmuls, cat).
Every query sees at least its own window, so no row is ever fully masked.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import normalize_params, spatial_shape
from .tiling import window_bounds

# Tile-choice cost model (seconds; fitted on a 2-core x86 CPU, one thread, fp32, D=64, torch 2.13): SDPA costs
# ~3 ns per query-key pair per batch*head at D=64, more for short tiles (x (1 + 8/tq)); gathering the key box costs
# ~1 ns per element; a tile has a fixed overhead. Only the ratios matter for the choice.
_PAIR_S_PER_DIM = 3e-9 / 64
_SHORT_TILE_ROWS = 8
_GATHER_S = 1e-9
_TILE_OVERHEAD_S = 20e-6
_MAX_TILE_ELEMS = 1 << 24  # B*H*tq*tk score elements per tile (64 MB in float32): bounds the temporaries


@dataclass(frozen=True)
class _AxisTile:
    """One query tile along one axis: query and key coordinates (global), the [tq, tk] mask, and whether it is full."""

    q_idx: torch.Tensor
    k_idx: torch.Tensor
    mask: torch.Tensor
    full: bool


@functools.lru_cache(maxsize=512)
def _axis_tiles(length: int, kernel_size: int, stride: int, dilation: int, causal: bool,
                tile: int) -> tuple[_AxisTile, ...]:
    """Tiles of `tile` group-local query coordinates per dilation group, each with its key box and mask."""
    tiles = []
    for g in range(dilation):
        group_len = len(range(g, length, dilation))
        starts, lengths = window_bounds(group_len, kernel_size, stride, causal)
        for x0 in range(0, group_len, tile):
            x1 = min(x0 + tile, group_len)
            st = torch.tensor(starts[x0:x1])
            en = st + torch.tensor(lengths[x0:x1])
            lo, hi = int(st.min()), int(en.max())
            keys = torch.arange(lo, hi)
            mask = (keys[None, :] >= st[:, None]) & (keys[None, :] < en[:, None])
            tiles.append(_AxisTile(g + dilation * torch.arange(x0, x1), g + dilation * keys, mask, bool(mask.all())))
    return tuple(tiles)


def _axis_stats(length: int, kernel_size: int, stride: int, dilation: int, causal: bool,
                tile: int) -> tuple[int, int, int, int]:
    """(number of tiles, sum of tq*tk, sum of tk, max tq*tk) along one axis for a tile size."""
    tiles = _axis_tiles(length, kernel_size, stride, dilation, causal, tile)
    pairs = [t.mask.numel() for t in tiles]
    return len(tiles), sum(pairs), sum(t.k_idx.numel() for t in tiles), max(pairs)


def _candidates(group_len: int) -> list[int]:
    """Tile sizes worth trying along an axis: powers of two and even splits of the group."""
    c = {group_len}
    c.update(1 << i for i in range(group_len.bit_length()) if (1 << i) < group_len)
    c.update(-(-group_len // n) for n in range(2, 9))
    return sorted(c)


@functools.lru_cache(maxsize=256)
def choose_tile(shape: tuple[int, ...], kernel_size: tuple[int, ...], stride: tuple[int, ...],
                dilation: tuple[int, ...], is_causal: tuple[bool, ...], bh: int, head_dim: int) -> tuple[int, ...]:
    """Query tile (group-local sizes per axis) minimising pairs computed plus a per-tile overhead, for `bh` =
    batch*heads of head dim `head_dim`, with at most `_MAX_TILE_ELEMS` score elements per tile."""
    per_pair_s = _PAIR_S_PER_DIM * head_dim * bh
    per_key_s = _SHORT_TILE_ROWS * per_pair_s + 2 * _GATHER_S * head_dim * bh
    axes = []
    for i, n in enumerate(shape):
        group_len = -(-n // dilation[i])
        axes.append([(t, _axis_stats(n, kernel_size[i], stride[i], dilation[i], is_causal[i], t))
                     for t in _candidates(group_len)])
    best, best_cost = None, math.inf
    for combo in _product(axes):  # every per-N-D-tile sum factorises over the axes
        n_tiles, pairs, keys, biggest = (math.prod(s[j] for _, s in combo) for j in range(4))
        cost = pairs * per_pair_s + keys * per_key_s + n_tiles * _TILE_OVERHEAD_S
        if biggest * bh > _MAX_TILE_ELEMS:
            cost = math.inf  # kept only if nothing fits
        if best is None or cost < best_cost:
            best, best_cost = tuple(t for t, _ in combo), cost
    assert best is not None
    return best


def _product(axes: list[list]) -> list[tuple]:
    out: list[tuple] = [()]
    for options in axes:
        out = [c + (o,) for c in out for o in options]
    return out


@dataclass(frozen=True)
class _Tile:
    q_idx: torch.Tensor  # flat token indices of the tile's queries
    k_idx: torch.Tensor  # flat token indices of its key box
    axis_masks: tuple[torch.Tensor, ...]  # per-axis [tq_a, tk_a]; None-free
    full: bool


@dataclass(frozen=True)
class _BlockedPlan:
    tiles: tuple[_Tile, ...]
    inverse: torch.Tensor  # position of each token in the concatenation of the tiles' queries


def _flat(idx: tuple[torch.Tensor, ...], strides: tuple[int, ...]) -> torch.Tensor:
    n = len(idx)
    flat = torch.zeros((), dtype=torch.long)
    for a, (ix, s) in enumerate(zip(idx, strides)):
        flat = flat + (ix * s).reshape([-1 if b == a else 1 for b in range(n)])
    return flat.reshape(-1)


@functools.lru_cache(maxsize=32)
def _plan(shape: tuple[int, ...], kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
          is_causal: tuple[bool, ...], tile: tuple[int, ...]) -> _BlockedPlan:
    """Cartesian product of the per-axis tiles; indices only (the N-D masks are built per call, tile by tile)."""
    strides = tuple(math.prod(shape[a + 1:]) for a in range(len(shape)))
    axes = [_axis_tiles(shape[a], kernel_size[a], stride[a], dilation[a], is_causal[a], tile[a])
            for a in range(len(shape))]
    tiles = []
    for combo in _product(axes):
        tiles.append(_Tile(_flat(tuple(t.q_idx for t in combo), strides), _flat(tuple(t.k_idx for t in combo), strides),
                           tuple(t.mask for t in combo), all(t.full for t in combo)))
    order = torch.cat([t.q_idx for t in tiles])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return _BlockedPlan(tuple(tiles), inverse)


def _tile_bias(axis_masks: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tile's window mask as an additive `[tq, tk]` bias (0 where attended, -inf elsewhere) over the row-major
    flattened query and key boxes: the sum of per-axis biases. SDPA takes it as is; on CPU a float mask is ~20%
    faster than the same mask as bool (which SDPA converts per call)."""
    n = len(axis_masks)
    bias = None
    for a, am in enumerate(axis_masks):
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = am.shape
        part = torch.zeros(am.shape, dtype=dtype).masked_fill_(~am, float("-inf")).reshape(shape)
        bias = part if bias is None else bias + part
    assert bias is not None
    tq = math.prod(am.shape[0] for am in axis_masks)
    return bias.reshape(tq, -1)


def neighborhood_attention_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    *,
    scale: float | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    return_lse: bool = False,
    tile=None,
):
    """Same arguments, layouts and results as `neighborhood_attention_reference` (float64 accepted as there).

    Without `return_lse` each tile runs PyTorch's fused SDPA with its mask (none for tiles that see their
    whole box); with it, matmul + logsumexp. `tile`: query tile sizes per axis in group-local coordinates
    (default: chosen by a small cost model, `choose_tile`).
    """
    spatial = spatial_shape(q)
    p = normalize_params(spatial, kernel_size, stride, dilation, is_causal)
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d ** -0.5 if scale is None else float(scale)
    if tile is None:
        tile = choose_tile(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, b * h, d)
    else:
        tile = tuple(int(t) for t in tile)
        if len(tile) != p.ndim or any(t < 1 for t in tile):
            raise ValueError(f"tile must be {p.ndim} ints >= 1 (one per spatial axis), got {tile}")
    plan = _plan(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, tile)

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, -1, h, d).transpose(1, 2).to(cdt)

    qf, kf, vf = heads_first(q), heads_first(k), heads_first(v)
    has_extra = extra_k is not None and extra_v is not None and extra_k.shape[1] > 0
    ek = heads_first(extra_k) if has_extra else None
    ev = heads_first(extra_v) if has_extra else None
    n_extra = ek.shape[2] if ek is not None else 0
    dev = q.device
    outs, lses = [], []
    for t in plan.tiles:
        q_idx, k_idx = t.q_idx.to(dev), t.k_idx.to(dev)
        qt = qf.index_select(2, q_idx)
        kt, vt = kf.index_select(2, k_idx), vf.index_select(2, k_idx)
        if ek is not None:
            kt, vt = torch.cat([kt, ek], dim=2), torch.cat([vt, ev], dim=2)
        bias = None
        if not t.full:
            bias = _tile_bias(t.axis_masks, cdt)
            if n_extra:
                bias = torch.cat([bias, bias.new_zeros(bias.shape[0], n_extra)], dim=1)
            bias = bias.to(dev)
        if not return_lse:
            outs.append(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale))
            continue
        s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vt))
        lses.append(lse)
    inverse = plan.inverse.to(dev)
    out = torch.cat(outs, dim=2).index_select(2, inverse)  # [B, H, N, D] in token order
    out = out.transpose(1, 2).reshape(q.shape).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=2).index_select(2, inverse)
    return out, lse.transpose(1, 2).reshape(b, *spatial, h).float()

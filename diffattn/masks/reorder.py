"""Token orders that make each block of consecutive tokens a compact 3-D region, and the block geometry on top.

In raster order (frame, row, column) a block of 128 video tokens is a thin strip of one or two rows; a dynamic
block selection (Rectified SpaAttn, Jenga) works far better when a block is a small box. `token_order` returns a
permutation `perm` (new position -> raster index) so that `x[..., perm, :]` is the compact order and
`x[..., inverse(perm), :]` undoes it exactly:

- ``"tiles"``: boxes of `tile_shape(block_size, frames)` tokens (4x4x8 for 128 on video, 8x16 on images) visited in
  serpentine order of tiles (consecutive tiles touch), raster inside a tile; on video frame 0 comes first on its own (8x16 tiles), so the
  first-frame blocks hold frame 0 only. Grids that are not multiples of the tile get smaller edge tiles, so some
  blocks straddle two neighbouring tiles (still compact). Any grid works.
- ``"gilbert"``: a generalized Hilbert ("Gilbert") curve, which fills boxes of any size (not only powers of 2):
  consecutive tokens are neighbours (steps of one cell, rarely two on odd sizes), so any run of 128 tokens is a
  compact 3-D region; on video frame 0 is its own 2-D curve first (as with tiles), then frames 1.. as one 3-D curve.
  Upstream Rectified SpaAttn / Jenga use such a curve.
- ``"none"``: raster order (identity).

Pure functions of the geometry, cached; tensors are on the CPU (callers move and cache them per device).
"""

from __future__ import annotations

import functools
import math

import torch

ORDERS = ("tiles", "gilbert", "none")

__all__ = ["ORDERS", "first_frame_blocks", "gilbert_curve", "inverse", "neighbor_blocks", "tile_shape", "token_order"]


def tile_shape(block_size: int, frames: int) -> tuple[int, int, int]:
    """A (t, h, w) box of `block_size` tokens, as cubic as powers of two allow; t = 1 for images."""
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"tile_shape: block_size must be a power of two, got {block_size}")
    e = block_size.bit_length() - 1
    et = 0 if frames <= 1 else min(e // 3, max(frames - 1, 0).bit_length())
    rest = e - et
    eh = rest // 2
    return (1 << et, 1 << eh, 1 << (rest - eh))


def _check_grid(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(grid) != 3 or any((not isinstance(g, int)) or g < 1 for g in grid):
        raise ValueError(f"grid must be (frames, height, width) of positive ints, got {grid!r}")
    return tuple(grid)  # type: ignore[return-value]


def _tile_key(t: int, h: int, w: int, tile: tuple[int, int, int], t0: int) -> torch.Tensor:
    """Sort key of frames [t0, t0 + t) tiled by `tile`: (tile row-major, then raster inside the tile)."""
    tt, th, tw = tile
    nh, nw = math.ceil(h / th), math.ceil(w / tw)
    f = torch.arange(t).view(t, 1, 1)
    r = torch.arange(h).view(1, h, 1)
    c = torch.arange(w).view(1, 1, w)
    # serpentine over tiles (odd tile rows run right to left, odd slabs bottom to top), so consecutive tiles touch
    # and a block that straddles two tiles stays compact
    ft, rt, ct = f // tt, r // th, c // tw
    rt = torch.where(ft % 2 == 1, nh - 1 - rt, rt)
    ct = torch.where((ft * nh + rt) % 2 == 1, nw - 1 - ct, ct)
    tile_id = (ft * nh + rt) * nw + ct
    inner = ((f % tt) * th + r % th) * tw + c % tw
    return (tile_id * (tt * th * tw) + inner).flatten()


def _sgn(v):
    return (v > 0) - (v < 0)


def _vec_sgn(a):
    return tuple(_sgn(c) for c in a)


def _add(*vs):
    return tuple(sum(c) for c in zip(*vs))


def _neg(a):
    return tuple(-c for c in a)


def _half(a):
    return tuple(c // 2 for c in a)


def _length(a):
    return abs(sum(a))


def _curve(p, a, b, c, out):
    """Append the cells of the box at corner `p` spanned by the axis vectors a (major), b, c, in generalized
    Hilbert order: split the box in two (long box) or in three/five sub-boxes whose entry and exit corners touch,
    rounding the halves to even lengths where possible so that the sub-curves connect with unit steps."""
    w, h, d = _length(a), _length(b), _length(c)
    da, db, dc = _vec_sgn(a), _vec_sgn(b), _vec_sgn(c)
    if h == 1 and d == 1:
        for i in range(w):
            out.append(_add(p, tuple(i * x for x in da)))
        return
    if w == 1 and d == 1:
        for i in range(h):
            out.append(_add(p, tuple(i * x for x in db)))
        return
    if w == 1 and h == 1:
        for i in range(d):
            out.append(_add(p, tuple(i * x for x in dc)))
        return
    a2, b2, c2 = _half(a), _half(b), _half(c)
    if _length(a2) % 2 and w > 2:
        a2 = _add(a2, da)
    if _length(b2) % 2 and h > 2:
        b2 = _add(b2, db)
    if _length(c2) % 2 and d > 2:
        c2 = _add(c2, dc)
    am, bm, cm = _add(a, _neg(a2)), _add(b, _neg(b2)), _add(c, _neg(c2))  # remaining halves
    if 2 * w > 3 * h and 2 * w > 3 * d:  # long box: split the major axis only
        _curve(p, a2, b, c, out)
        _curve(_add(p, a2), am, b, c, out)
    elif 3 * h > 4 * d:  # flat in c: split a and b
        _curve(p, b2, c, a2, out)
        _curve(_add(p, b2), a, bm, c, out)
        _curve(_add(p, _add(a, _neg(da)), _add(b2, _neg(db))), _neg(b2), c, _neg(am), out)
    elif 3 * d > 4 * h:  # flat in b: split a and c
        _curve(p, c2, a2, b, out)
        _curve(_add(p, c2), a, b, cm, out)
        _curve(_add(p, _add(a, _neg(da)), _add(c2, _neg(dc))), _neg(c2), _neg(am), b, out)
    else:  # split all three
        _curve(p, b2, c2, a2, out)
        _curve(_add(p, b2), c, a2, bm, out)
        _curve(_add(p, _add(b2, _neg(db)), _add(c, _neg(dc))), a, _neg(b2), _neg(cm), out)
        _curve(_add(p, _add(a, _neg(da)), b2, _add(c, _neg(dc))), _neg(c), _neg(am), bm, out)
        _curve(_add(p, _add(a, _neg(da)), _add(b2, _neg(db))), _neg(b2), c2, _neg(am), out)



def gilbert_curve(w: int, h: int, d: int) -> list[tuple[int, int, int]]:
    """The (x, y, z) cells of a w x h x d box (x < w, y < h, z < d) in generalized Hilbert order, starting at the
    origin along the longest axis."""
    out: list[tuple[int, int, int]] = []
    if w >= h and w >= d:
        _curve((0, 0, 0), (w, 0, 0), (0, h, 0), (0, 0, d), out)
    elif h >= w and h >= d:
        _curve((0, 0, 0), (0, h, 0), (w, 0, 0), (0, 0, d), out)
    else:
        _curve((0, 0, 0), (0, 0, d), (w, 0, 0), (0, h, 0), out)
    return out


def _gilbert_order(t: int, h: int, w: int) -> torch.Tensor:
    """Raster indices in Gilbert order; on video frame 0 alone first (2-D), then frames 1.. (3-D), mirrored so that
    the 3-D curve starts at the cell of frame 1 next to where frame 0's curve ended (no jump across the frame)."""
    def raster(c, t0):
        return ((c[:, 2] + t0) * h + c[:, 1]) * w + c[:, 0]

    first = torch.tensor(gilbert_curve(w, h, 1), dtype=torch.long).view(-1, 3)
    if t == 1:
        return raster(first, 0)
    rest = torch.tensor(gilbert_curve(w, h, t - 1), dtype=torch.long).view(-1, 3)
    ex, ey = int(first[-1, 0]), int(first[-1, 1])
    if 2 * ex >= w:
        rest[:, 0] = w - 1 - rest[:, 0]
    if 2 * ey >= h:
        rest[:, 1] = h - 1 - rest[:, 1]
    return torch.cat([raster(first, 0), raster(rest, 1)])


@functools.lru_cache(maxsize=64)
def token_order(grid: tuple[int, int, int], order: str = "tiles", block_size: int = 128) -> torch.Tensor:
    """LongTensor `[T*H*W]`: position in the new order -> raster index (see the module docstring).

    Video ("tiles"): frame 0 alone first, in tiles of `tile_shape(block_size, 1)` (the first latent frame is the
    causal VAE's single-image frame and I2V's conditioning frame: its blocks stay frame-0 only), then the other
    frames in slabs of `tile_shape(block_size, frames)`. "gilbert" does not depend on `block_size`."""
    t, h, w = _check_grid(grid)
    n = t * h * w
    if order == "none":
        return torch.arange(n)
    if order == "gilbert":
        return _gilbert_order(t, h, w)
    if order != "tiles":
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if t == 1:
        key = _tile_key(1, h, w, tile_shape(block_size, 1), 0)
    else:
        k0 = _tile_key(1, h, w, tile_shape(block_size, 1), 0)
        rest = _tile_key(t - 1, h, w, tile_shape(block_size, t), 1)
        key = torch.cat([k0, rest + int(k0.max()) + 1])
    return torch.argsort(key, stable=True)


@functools.lru_cache(maxsize=64)
def inverse(perm_key: tuple[tuple[int, int, int], str, int]) -> torch.Tensor:
    """The inverse permutation of `token_order(*perm_key)` (raster index -> position in the new order)."""
    perm = token_order(*perm_key)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


@functools.lru_cache(maxsize=64)
def neighbor_blocks(grid: tuple[int, int, int], order: str = "tiles", block_size: int = 128) -> torch.Tensor:
    """Bool `[nb, nb]`: blocks (in `order`) that hold two tokens within one step of each other along every axis
    (the 26-neighbourhood in 3-D, 8 in 2-D), the diagonal included."""
    t, h, w = _check_grid(grid)
    pos = inverse((grid, order, block_size))  # raster index -> new position
    blk = (pos // block_size).view(t, h, w)
    nb = math.ceil(t * h * w / block_size)
    out = torch.zeros(nb * nb, dtype=torch.bool)
    for dt in (-1, 0, 1):
        for dh in (-1, 0, 1):
            for dw in (-1, 0, 1):
                a = blk[max(0, -dt):t - max(0, dt), max(0, -dh):h - max(0, dh), max(0, -dw):w - max(0, dw)]
                b = blk[max(0, dt):t + min(0, dt), max(0, dh):h + min(0, dh), max(0, dw):w + min(0, dw)]
                out[(a.flatten() * nb + b.flatten())] = True
    return out.view(nb, nb)


@functools.lru_cache(maxsize=64)
def first_frame_blocks(grid: tuple[int, int, int], order: str = "tiles", block_size: int = 128) -> torch.Tensor:
    """Bool `[nb, nb]`: the square of blocks holding frame-0 tokens (they attend each other); upstream's
    "first-frame square" `[0:F0, 0:F0]`, here exact for the order used."""
    t, h, w = _check_grid(grid)
    pos = inverse((grid, order, block_size))
    nb = math.ceil(t * h * w / block_size)
    has = torch.zeros(nb, dtype=torch.bool)
    has[pos[: h * w] // block_size] = True
    return has[:, None] & has[None, :]

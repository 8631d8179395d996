"""Radial Attention's static spatio-temporal block mask (Li, Li et al., NeurIPS 2025, arXiv 2506.19852).

The mask depends only on the geometry (frames ``f``, tokens per frame ``s``), the block size ``B``, the decay
factor and whether frame 0 is an attention sink. Tokens are in Diffusers' native frame-major order (t, h, w):
video token ``q = i * s + r`` is in-frame token ``r`` of frame ``i``.

**Token rule** (upstream ``radial_attn/attn_mask.py`` @72788d4, ``gen_log_mask_shrinked`` and helpers). For a
query in frame ``i`` (in-frame index ``r``) and a key in frame ``j`` (in-frame index ``c``), with ``d = |i - j|``
and ``bitlen(x) = x.bit_length()``:

1. sink: if ``sink`` and ``j == 0`` the pair is kept (every query sees all of frame 0; upstream's Wan mask;
   upstream's HunyuanVideo mask is ``sink=False``);
2. frame decimation: with ``L = 2**bitlen(s) / 2**bitlen(d)``, if ``L < 128`` the whole frame pair is dropped
   unless ``d % int(128 / L) == 0`` (the 128 is hard-coded upstream, also when ``B = 64``);
3. band: otherwise keep iff ``|c - r| <= w`` with ``w = s`` for ``d <= 1`` and
   ``w = max(2**bitlen(s) / 2**bitlen(d) * decay_factor, B)`` for ``d >= 2`` (compared in float32, as upstream).

**Block rule** (upstream ``shrinkMaskStrict``). A part of the token mask is *kept at block level* iff, among its
key columns that are kept by at least one of its query rows, *more than 60 %* are kept by *more than one third*
of its query rows (integer form: ``5 * high > 3 * nonzero`` with ``3 * count > rows``).

Upstream applies that test to each frame pair's part of a block (on a block-aligned canvas) and ORs the results
over frame pairs; it supports only ``s % B == 0`` (issue #21), where every block lies inside one frame pair.
Here the same structure is kept for every geometry: a block pair is cut at frame boundaries into *tiles* (the
part of the block pair inside one frame pair); each tile is tested on its own real rows and columns; the block
pair is kept iff any tile passes. When ``s % B == 0`` each block pair is a single tile and the mask is
bit-for-bit upstream's. When a frame boundary falls inside a block, the query rows of each frame get their own
vote, so a frame's last few rows never lose key blocks because the next frame's rows, which need other keys,
outvote them (the failure of applying the test to whole blocks: worst-row recall 0.53-0.72 vs 0.92-0.95 here,
see docs/radial_mask.md). Consequences that tests check: the diagonal block is always kept (its ``d = 0``
tiles are dense) and, with ``sink=True``, every key block holding a frame-0 token is kept.

Cost: tiles are solved in closed form (inside one frame pair, the kept-row count of a key column is a trapezoid
in its in-frame index), so no token mask is built: Wan-14B 720p (591 blocks) and HunyuanVideo 720p (929
blocks) take well under a second on two CPU cores.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

logger = logging.getLogger("diffattn")

__all__ = ["radial_mask", "radial_token_mask", "describe", "radial_token_density"]

# radial_token_mask builds an n x n bool tensor; refuse beyond this many elements (256 MiB).
_MAX_TOKEN_MASK_ELEMENTS = 1 << 28
# Upper bound on the elements of one intermediate tensor in the block reduction (bounds memory at any size).
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_args(
    num_frames: Any, tokens_per_frame: Any, block_size: Any, decay_factor: Any, sink: Any
) -> tuple[int, int, int, float, bool]:
    f = _check_int("num_frames", num_frames, 1)
    s = _check_int("tokens_per_frame", tokens_per_frame, 1)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be a positive int multiple of 16, got {type(block_size).__name__}")
    if block_size <= 0 or block_size % 16 != 0:
        raise ValueError(f"block_size must be a positive multiple of 16 (e.g. 64 or 128), got {block_size}")
    if isinstance(decay_factor, bool) or not isinstance(decay_factor, (int, float)):
        raise TypeError(f"decay_factor must be a float > 0, got {type(decay_factor).__name__}")
    df = float(decay_factor)
    if not (df > 0.0 and math.isfinite(df)):
        raise ValueError(f"decay_factor must be a finite float > 0 (lower is sparser; upstream uses 0.2-1), got {df}")
    if not isinstance(sink, bool):
        raise TypeError(f"sink must be a bool, got {type(sink).__name__}")
    return f, s, int(block_size), df, sink


# --------------------------------------------------------------------------------------------------------------
# frame-level tables: everything the token rule needs, per frame distance d
# --------------------------------------------------------------------------------------------------------------
def _float32(x: float) -> float:
    """Round to float32: upstream compares ``|c - r|`` (int64) with a Python float, which torch does in float32."""
    return float(torch.tensor(x, dtype=torch.float32).item())


def _frame_tables(f: int, s: int, block_size: int, decay_factor: float) -> tuple[list[bool], list[int]]:
    """Per frame distance ``d`` in ``[0, f)``: whether the frame pair survives decimation, and its band half-width.

    The half-width is an integer ``w`` meaning ``|c - r| <= w`` (so ``w >= s - 1`` keeps the whole frame pair).
    This is a loop over frame distances (at most a few hundred), never over tokens.
    """
    bs = s.bit_length()
    keep: list[bool] = []
    width: list[int] = []
    for d in range(f):
        g = d.bit_length()
        # L = 2**bs / 2**g is a power of two; L < 128  <=>  bs - g < 7, and then int(128 / L) = 2**(g - bs + 7).
        if bs - g >= 7:
            keep.append(True)
        else:
            keep.append(d % (1 << (g - bs + 7)) == 0)
        if d <= 1:
            width.append(s)
        else:
            try:
                decay_length = math.ldexp(decay_factor, bs - g)  # == 2**bs / 2**g * decay_factor, exactly
            except OverflowError:  # absurdly large decay factors: the band covers the frame pair
                decay_length = math.inf
            if decay_length >= s:
                width.append(s)
            else:
                w = decay_length if decay_length >= block_size else float(block_size)
                width.append(min(math.floor(_float32(w)), s))
    return keep, width


# --------------------------------------------------------------------------------------------------------------
# segments: the video sequence cut at block boundaries and at frame boundaries
# --------------------------------------------------------------------------------------------------------------
def _segments(n: int, s: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut ``[0, n)`` at every multiple of ``block_size`` and of ``s``: pieces inside one block and one frame.

    Returns ``(block, frame, lo, hi)`` per piece, ``lo``/``hi`` being its inclusive in-frame index range. There
    are at most ``nb + f - 1`` pieces, sorted by position (so by block).
    """
    cuts = torch.unique(
        torch.cat(
            [
                torch.arange(0, n, block_size, dtype=torch.int64),
                torch.arange(0, n, s, dtype=torch.int64),
                torch.tensor([n], dtype=torch.int64),
            ]
        )
    )
    start, stop = cuts[:-1], cuts[1:]
    return start // block_size, start // s, start % s, (stop - 1) % s


def _count_in_range(
    lo: torch.Tensor, hi: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor, w: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Number of key columns ``c in [lo, hi]`` whose kept-row count ``|[r0, r1] & [c - w, c + w]|`` exceeds ``t``.

    The count is a trapezoid in ``c`` (rises, plateau, falls), so ``{c : count(c) > t}`` is the interval
    ``[r0 - w + t, r1 + w - t]``, non-empty only when both the row range and the band are longer than ``t``.
    """
    a = torch.maximum(lo, r0 - w + t)
    b = torch.minimum(hi, r1 + w - t)
    n = (b - a + 1).clamp_min(0)
    ok = ((r1 - r0 + 1) > t) & ((2 * w + 1) > t)
    return torch.where(ok, n, torch.zeros_like(n))


def _build_block_mask(f: int, s: int, block_size: int, decay_factor: float, sink: bool) -> torch.Tensor:
    """Tile rule: a block pair is kept iff one of its frame-pair tiles passes the 60 % / one-third test.

    A tile is the part of a block pair inside one frame pair: query rows ``[r0, r1]`` of frame ``i`` (one piece
    of ``_segments``) and key columns ``[c0, c1]`` of frame ``j`` (another piece). Inside a tile the kept-row
    count of key column ``c`` is ``|[r0, r1] & [c - w, c + w]|`` (all rows for the sink, none for a decimated
    pair), a trapezoid in ``c``, so the two column counts the test needs are interval lengths
    (``_count_in_range``). All piece pairs are solved in closed form, chunked over query pieces, then OR-ed into
    their block pair.
    """
    n = f * s
    nb = -(-n // block_size)
    keep_l, width_l = _frame_tables(f, s, block_size, decay_factor)
    keep_t = torch.tensor(keep_l, dtype=torch.bool)
    width_t = torch.tensor(width_l, dtype=torch.int32)
    blk, frame, lo, hi = _segments(n, s, block_size)
    lo, hi = lo.to(torch.int32), hi.to(torch.int32)
    npiece = blk.numel()

    fj = frame.view(1, -1)
    c0, c1 = lo.view(1, -1), hi.view(1, -1)
    sink_col = (frame == 0).view(1, -1) if sink else None

    per_block = torch.zeros(nb, nb, dtype=torch.int32)  # passing tiles per block pair
    step = max(1, _CHUNK_ELEMENTS // npiece)
    for p0 in range(0, npiece, step):
        p1 = min(npiece, p0 + step)
        fi = frame[p0:p1].view(-1, 1)
        r0, r1 = lo[p0:p1].view(-1, 1), hi[p0:p1].view(-1, 1)
        rows = r1 - r0 + 1
        d = (fi - fj).abs()
        kept = keep_t[d]
        w = width_t[d]
        if sink_col is not None:
            kept = kept | sink_col
            w = torch.where(sink_col, s, w)
        nonzero = _count_in_range(c0, c1, r0, r1, w, torch.zeros_like(rows))
        high = _count_in_range(c0, c1, r0, r1, w, rows // 3)  # 3 * count > rows  <=>  count > rows // 3
        ok = kept & (5 * high > 3 * nonzero)
        by_key_block = torch.zeros(p1 - p0, nb, dtype=torch.int32).index_add_(1, blk, ok.to(torch.int32))
        per_block.index_add_(0, blk[p0:p1], by_key_block)
    return per_block > 0


@functools.lru_cache(maxsize=64)
def _cached_mask(f: int, s: int, block_size: int, decay_factor: float, sink: bool) -> torch.Tensor:
    mask = _build_block_mask(f, s, block_size, decay_factor, sink)
    if s % block_size:
        logger.debug(
            "radial mask: tokens_per_frame=%d is not a multiple of block_size=%d (upstream refuses this); "
            "blocks across frame boundaries are judged per frame-pair tile",
            s,
            block_size,
        )
    return mask


def radial_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    sink: bool = True,
) -> torch.Tensor:
    """Radial Attention's bool block mask ``[nb, nb]`` over the video tokens, ``nb = ceil(f * s / block_size)``.

    ``mask[a, b]`` is True when query block ``a`` attends key block ``b``. Equal to upstream's mask whenever
    ``tokens_per_frame % block_size == 0``; for other geometries (Wan 480p 21 x 1560, Wan 720p 21 x 3600,
    HunyuanVideo 33 x 3600) upstream's 60 % / one-third test is applied to each frame pair's part of a block
    separately and a block is kept if any part passes (see the module docstring and docs/radial_mask.md).

    Args:
        num_frames: latent frames ``f`` (>= 1).
        tokens_per_frame: tokens per latent frame ``s`` (>= 1), e.g. ``(H // 16) * (W // 16)`` for Wan.
        block_size: kernel block size (positive multiple of 16; upstream uses 128, or 64 for Wan2.2).
        decay_factor: band-width multiplier (> 0; lower is sparser; upstream: 0.2 Wan, 0.95 Hunyuan, 0.8 Wan2.2).
        sink: every query attends all of frame 0 (upstream Wan: True; upstream HunyuanVideo: False).

    Returns:
        A CPU bool tensor. The mask is computed once per geometry (``functools.lru_cache``) and every call returns
        a fresh copy of the cached one, so callers may move or modify it without affecting later calls.
    """
    f, s, block_size, df, sink = _check_args(num_frames, tokens_per_frame, block_size, decay_factor, sink)
    return _cached_mask(f, s, block_size, df, sink).clone()


# --------------------------------------------------------------------------------------------------------------
# token-level mask (small sizes: tests, visualisation, masked-SDPA references)
# --------------------------------------------------------------------------------------------------------------
def radial_token_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    sink: bool = True,
) -> torch.Tensor:
    """The token-level rule as a bool ``[n, n]`` tensor (``n = f * s``), before any block reduction.

    ``block_size`` matters because upstream floors the band half-width at the block size. Meant for small
    geometries (tests, pictures, a masked-SDPA reference); refuses more than 2**28 elements (n > 16384).
    """
    f, s, block_size, df, sink = _check_args(num_frames, tokens_per_frame, block_size, decay_factor, sink)
    n = f * s
    if n * n > _MAX_TOKEN_MASK_ELEMENTS:
        raise ValueError(
            f"radial_token_mask builds an n x n tensor; num_frames * tokens_per_frame = {n} is above 16384. "
            "Use radial_mask() for the block mask at production sizes."
        )
    keep_l, width_l = _frame_tables(f, s, block_size, df)
    # a frame pair's s x s mask depends only on its distance d (plus the sink): build one per distance, tile them
    r = torch.arange(s)
    gap = (r.view(1, -1) - r.view(-1, 1)).abs()
    per_distance = torch.stack([(gap <= width_l[d]) & keep_l[d] for d in range(f)])  # [f, s, s]
    idx = torch.arange(f)
    dist = (idx.view(-1, 1) - idx.view(1, -1)).abs()  # [f (query frame), f (key frame)]
    tiles = per_distance[dist]  # [f, f, s, s]
    if sink:
        tiles[:, 0] = True
    return tiles.permute(0, 2, 1, 3).reshape(n, n)


def radial_token_density(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    sink: bool = True,
) -> float:
    """Fraction of token pairs the token-level rule keeps (closed form, any size): what blocks approximate."""
    f, s, block_size, df, sink = _check_args(num_frames, tokens_per_frame, block_size, decay_factor, sink)
    keep_l, width_l = _frame_tables(f, s, block_size, df)
    total = 0
    for d in range(f):
        pairs = f if d == 0 else 2 * (f - d)  # ordered frame pairs at distance d
        w = width_l[d]
        band = s * s if w >= s - 1 else (2 * w + 1) * s - w * (w + 1)
        per_pair = band if keep_l[d] else 0
        if sink:
            # exactly one of the ordered pairs at distance d has key frame 0, (d, 0); the sink keeps it dense
            total += (pairs - 1) * per_pair + s * s
        else:
            total += pairs * per_pair
    return total / float(f * s) ** 2


def describe(num_frames: int, tokens_per_frame: int, **opts: Any) -> dict[str, Any]:
    """Numbers for ``diffattn mask radial``: geometry, kept blocks, density and the attention speed-up bound.

    ``opts`` are ``radial_mask``'s keyword options (``block_size``, ``decay_factor``, ``sink``). The speed-up
    bound ``1 / density`` is for the video-video attention only (no warm-up steps, dense layers or text).
    """
    unknown = set(opts) - {"block_size", "decay_factor", "sink"}
    if unknown:
        raise ValueError(f"unknown radial mask option(s) {sorted(unknown)}; accepted: block_size, decay_factor, sink")
    block_size = opts.get("block_size", 128)
    decay_factor = opts.get("decay_factor", 1.0)
    sink = opts.get("sink", True)
    mask = radial_mask(num_frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor, sink=sink)
    nb = mask.shape[0]
    kept = int(mask.sum())
    density = kept / float(nb * nb)
    n = num_frames * tokens_per_frame
    return {
        "num_frames": num_frames,
        "tokens_per_frame": tokens_per_frame,
        "num_tokens": n,
        "block_size": block_size,
        "decay_factor": float(decay_factor),
        "sink": sink,
        "num_blocks": nb,
        "aligned": tokens_per_frame % block_size == 0,
        "kept_blocks": kept,
        "density": density,
        "sparsity": 1.0 - density,
        "token_density": radial_token_density(
            num_frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor, sink=sink
        ),
        "speedup_upper_bound": 1.0 / density,
    }

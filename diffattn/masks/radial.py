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

**Block rule** (upstream ``shrinkMaskStrict``). A query block x key block pair is kept iff, among the key columns
of the block that are kept by at least one query row of the block, *more than 60 %* are kept by *more than one
third* of the block's query rows (integer form: ``5 * high > 3 * nonzero`` and ``3 * count > rows``).

Upstream evaluates this per frame pair on a block-aligned canvas and only supports ``s % B == 0`` (issue #21).
Here the same rule is applied to the whole video token mask, block by block, so blocks that straddle a frame
boundary are judged on all their token pairs together; ``rows`` is the number of real query rows of the block
(the last block may be partial). Two guarantees are added on top: diagonal blocks are always kept (every query
block must see at least itself; the token rule keeps all of ``d = 0``), and with ``sink=True`` every key block
that holds a frame-0 token is kept (the sink is a promise about tokens, not a majority vote). When
``s % B == 0`` every block lies inside one frame pair, both additions are already implied, and the result is
bit-for-bit upstream's mask (see ``docs/radial_mask.md``).

Cost: the block reduction is analytic (the kept count of a key column inside one frame pair is a trapezoid in
the in-frame index), so no token-level mask is ever built; Wan-14B 720p (591 blocks) or HunyuanVideo 720p
(929 blocks) take a few tens of milliseconds on one CPU core.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

logger = logging.getLogger("diffattn")

__all__ = ["radial_mask", "radial_token_mask", "describe", "radial_token_density"]

# Upstream's frame-decimation threshold (``get_diagonal_split_mask``): hard-coded to 128, independent of B.
_DECIMATION_THRESHOLD = 128
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
            decay_length = math.ldexp(decay_factor, bs - g)  # == 2**bs / 2**g * decay_factor, exactly
            w = decay_length if decay_length >= block_size else float(block_size)
            width.append(min(math.floor(_float32(w)), s))
    return keep, width


# --------------------------------------------------------------------------------------------------------------
# segments: the video sequence cut at block boundaries and at frame boundaries
# --------------------------------------------------------------------------------------------------------------
def _segments(n: int, s: int, block_size: int, nb: int) -> dict[str, torch.Tensor]:
    """Cut ``[0, n)`` at multiples of ``block_size`` and of ``s``; return per-block padded segment tables.

    Each block is split into at most ``R = ceil((B - 1) / s) + 1`` segments, each inside one frame. Tables are
    ``[nb, R]``: ``frame``, ``lo``/``hi`` (inclusive in-frame index range) and ``len`` (0 for padding slots).
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
    blk = start // block_size
    counts = torch.bincount(blk, minlength=nb)
    R = int(counts.max())
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(start.numel()) - first[blk]
    frame = torch.zeros(nb, R, dtype=torch.int64)
    lo = torch.zeros(nb, R, dtype=torch.int64)
    hi = torch.full((nb, R), -1, dtype=torch.int64)
    frame[blk, slot] = start // s
    lo[blk, slot] = start % s
    hi[blk, slot] = (stop - 1) % s
    length = hi - lo + 1
    return {"frame": frame, "lo": lo, "hi": hi, "len": length, "count": counts}


# --------------------------------------------------------------------------------------------------------------
# the block mask
# --------------------------------------------------------------------------------------------------------------
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


def _count_columns(
    a: torch.Tensor,
    b: torch.Tensor,
    frame: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    length: torch.Tensor,
    thr: torch.Tensor,
    keep_t: torch.Tensor,
    width_t: torch.Tensor,
    f: int,
    s: int,
    n: int,
    block_size: int,
    sink: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For block pairs ``(a[k], b[k])``: key columns with any kept row, and with more than ``thr[a]`` kept rows.

    Counts every key column of the block explicitly (sum over the query block's row segments); used only for
    query blocks that straddle a frame boundary and whose tiles are cut by a band edge.
    """
    R = frame.shape[1]
    out_nz, out_hg = [], []
    step = max(1, _CHUNK_ELEMENTS // max(1, block_size * R))
    x = torch.arange(block_size, dtype=torch.int64)
    for c0 in range(0, a.numel(), step):
        aa, bb = a[c0 : c0 + step], b[c0 : c0 + step]
        cols = bb.view(-1, 1) * block_size + x.view(1, -1)  # [P, B]
        cv = cols < n
        fj = (cols // s).clamp_max(f - 1).unsqueeze(-1)
        c = (cols % s).unsqueeze(-1)
        fi, r0, r1, ln = (t[aa].unsqueeze(1) for t in (frame, lo, hi, length))  # [P, 1, R]
        d = (fi - fj).abs()
        cnt = (torch.minimum(r1, c + width_t[d]) - torch.maximum(r0, c - width_t[d]) + 1).clamp_min(0)
        cnt = torch.where(keep_t[d] & (ln > 0), cnt, 0)
        if sink:
            cnt = torch.where(fj == 0, ln, cnt)
        cnt = cnt.sum(-1)  # [P, B]
        out_nz.append(((cnt > 0) & cv).sum(-1))
        out_hg.append(((cnt > thr[aa].view(-1, 1)) & cv).sum(-1))
    return torch.cat(out_nz), torch.cat(out_hg)


def _build_block_mask(f: int, s: int, block_size: int, decay_factor: float, sink: bool) -> torch.Tensor:
    n = f * s
    nb = -(-n // block_size)
    keep_l, width_l = _frame_tables(f, s, block_size, decay_factor)
    keep_t = torch.tensor(keep_l, dtype=torch.bool)
    width_t = torch.tensor(width_l, dtype=torch.int64)
    seg = _segments(n, s, block_size, nb)
    frame, lo, hi, length = seg["frame"], seg["lo"], seg["hi"], seg["len"]
    R = frame.shape[1]
    rows = length.sum(1)  # real query rows per block (the last block may be partial)
    thr = rows // 3  # 3 * count > rows  <=>  count > rows // 3
    single = seg["count"] == 1

    out = torch.zeros(nb, nb, dtype=torch.bool)
    high = torch.zeros(nb, nb, dtype=torch.int64)
    nonzero = torch.zeros(nb, nb, dtype=torch.int64)

    # --- query blocks inside one frame: each tile (this frame x one key segment) is a trapezoid, solved exactly.
    a_idx = torch.nonzero(single).flatten()
    step = max(1, _CHUNK_ELEMENTS // max(1, nb * R))
    for c0 in range(0, a_idx.numel(), step):
        a = a_idx[c0 : c0 + step]
        fi = frame[a, 0].view(-1, 1, 1)
        r0 = lo[a, 0].view(-1, 1, 1)
        r1 = hi[a, 0].view(-1, 1, 1)
        t = thr[a].view(-1, 1, 1)
        fj = frame.view(1, nb, R)
        d = (fi - fj).abs()
        kp = keep_t[d]
        w = width_t[d]
        if sink:
            is_sink = fj == 0
            kp = kp | is_sink
            w = torch.where(is_sink, torch.full_like(w, s), w)
        valid = (length.view(1, nb, R) > 0) & kp
        clo, chi = lo.view(1, nb, R), hi.view(1, nb, R)
        nz = torch.where(valid, _count_in_range(clo, chi, r0, r1, w, torch.zeros_like(t)), 0).sum(-1)
        hg = torch.where(valid, _count_in_range(clo, chi, r0, r1, w, t), 0).sum(-1)
        nonzero[a] = nz
        high[a] = hg

    # --- query blocks that straddle frame boundaries (several row segments). A tile (row segment x key segment)
    # whose kept-row count is the same for all its key columns is summed per key segment in closed form; only
    # block pairs with a tile cut by a band edge are counted column by column.
    m_idx = torch.nonzero(~single).flatten()
    step = max(1, _CHUNK_ELEMENTS // max(1, nb * R * R))
    for c0 in range(0, m_idx.numel(), step):
        a = m_idx[c0 : c0 + step]
        fi = frame[a].view(-1, 1, R, 1)
        r0 = lo[a].view(-1, 1, R, 1)
        r1 = hi[a].view(-1, 1, R, 1)
        ln = length[a].view(-1, 1, R, 1)
        fj = frame.view(1, nb, 1, R)
        clo, chi = lo.view(1, nb, 1, R), hi.view(1, nb, 1, R)
        d = (fi - fj).abs()
        kp = keep_t[d] & (ln > 0)
        w = width_t[d]
        if sink:
            is_sink = fj == 0
            kp = kp | (is_sink & (ln > 0))
            w = torch.where(is_sink, torch.full_like(w, s), w)
        full = kp & (r0 >= chi - w) & (r1 <= clo + w)
        empty = ~kp | (clo > r1 + w) | (chi < r0 - w)
        partial = ~(full | empty) & (length.view(1, nb, 1, R) > 0)
        cnt = torch.where(full, ln, 0).sum(2)  # [A, nb, R]: kept rows of every column of key segment q
        qlen = length.view(1, nb, R)
        nonzero[a] = torch.where(cnt > 0, qlen, 0).sum(-1)
        high[a] = torch.where(cnt > thr[a].view(-1, 1, 1), qlen, 0).sum(-1)
        pa, pb = torch.nonzero(partial.any(3).any(2), as_tuple=True)
        if pa.numel():
            nz, hg = _count_columns(a[pa], pb, frame, lo, hi, length, thr, keep_t, width_t, f, s, n, block_size, sink)
            nonzero[a[pa], pb] = nz
            high[a[pa], pb] = hg

    out = 5 * high > 3 * nonzero
    out.diagonal().fill_(True)
    if sink:
        out[:, : -(-s // block_size)] = True
    return out


@functools.lru_cache(maxsize=64)
def _cached_mask(f: int, s: int, block_size: int, decay_factor: float, sink: bool) -> torch.Tensor:
    mask = _build_block_mask(f, s, block_size, decay_factor, sink)
    if s % block_size:
        logger.debug(
            "radial mask: tokens_per_frame=%d is not a multiple of block_size=%d; using the token-level rule "
            "reduced per block (upstream supports only multiples)",
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
    HunyuanVideo 33 x 3600) the same 60 % / one-third block rule is applied to the whole token mask, so blocks
    across frame boundaries are judged on all their tokens (see the module docstring and docs/radial_mask.md).

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
    keep_t = torch.tensor(keep_l, dtype=torch.bool)
    width_t = torch.tensor(width_l, dtype=torch.int64)
    kf = torch.arange(n) // s
    kc = torch.arange(n) % s
    r = torch.arange(s).view(-1, 1)
    out = torch.empty(n, n, dtype=torch.bool)
    for i in range(f):  # loop over frames, vectorized over tokens
        d = (kf - i).abs()
        band = (kc.view(1, -1) - r).abs() <= width_t[d].view(1, -1)
        rows = band & keep_t[d].view(1, -1)
        if sink:
            rows |= (kf == 0).view(1, -1)
        out[i * s : (i + 1) * s] = rows
    return out


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

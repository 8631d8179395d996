"""Radial Attention block mask: parity with independent loop-based references, properties, drawing.

The references below are written from the rule in ``shared/methods/radial.md`` (upstream ``attn_mask.py``) and are
deliberately unlike ``diffattn.masks.radial``: they build the token mask frame pair by frame pair in numpy, find
powers of two with ``while`` loops, compare with float division, and reduce to blocks with explicit Python loops.
``diffattn`` never builds a token mask for ``radial_mask``: it solves each tile in closed form.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffattn.masks import (
    block_mask_density,
    draw_block_mask,
    radial,
    radial_mask,
    radial_token_density,
    radial_token_mask,
)


# ----------------------------------------------------------------------------------------------------------------
# independent references (small sizes only)
# ----------------------------------------------------------------------------------------------------------------
def _pow2_above(x: int) -> int:
    """Smallest power of two strictly greater than x (upstream's 2 ** x.bit_length())."""
    p = 1
    while p <= x:
        p *= 2
    return p


def _ref_frame_pair(i: int, j: int, s: int, B: int, df: float, sink: bool) -> np.ndarray:
    """The s x s token mask of query frame i and key frame j."""
    if sink and j == 0:
        return np.ones((s, s), dtype=bool)
    d = abs(i - j)
    length = _pow2_above(s) / _pow2_above(d)  # L = 2^bitlen(s) / 2^bitlen(d)
    if length < 128:
        split = int(128 / length)
        if d % split != 0:
            return np.zeros((s, s), dtype=bool)
    width = float(s) if d <= 1 else max(length * df, float(B))
    width = float(np.float32(width))  # upstream compares an int64 tensor with a Python float: float32
    r = np.arange(s).reshape(-1, 1)
    c = np.arange(s).reshape(1, -1)
    return np.abs(c - r).astype(np.float32) <= np.float32(width)


def _ref_token_mask(f: int, s: int, B: int, df: float, sink: bool) -> np.ndarray:
    out = np.zeros((f * s, f * s), dtype=bool)
    for i in range(f):
        for j in range(f):
            out[i * s : (i + 1) * s, j * s : (j + 1) * s] = _ref_frame_pair(i, j, s, B, df, sink)
    return out


def _passes(sub: np.ndarray) -> bool:
    """Upstream's shrink test on one part: > 60 % of touched key columns are kept by > 1/3 of its query rows."""
    counts = sub.sum(axis=0)
    touched = int((counts > 0).sum())
    if touched == 0:
        return False
    dense = int((counts / sub.shape[0] > 1 / 3).sum())
    return dense / touched > 0.6


def _ref_block_mask(f: int, s: int, B: int, df: float, sink: bool) -> np.ndarray:
    """Tile rule by brute force: cut each block pair at frame boundaries, test every part, OR."""
    tok = _ref_token_mask(f, s, B, df, sink)
    n = f * s
    nb = math.ceil(n / B)
    out = np.zeros((nb, nb), dtype=bool)
    for a in range(nb):
        q0, q1 = a * B, min(n, (a + 1) * B)
        row_parts = [(max(q0, i * s), min(q1, (i + 1) * s)) for i in range(q0 // s, (q1 - 1) // s + 1)]
        for b in range(nb):
            k0, k1 = b * B, min(n, (b + 1) * B)
            col_parts = [(max(k0, j * s), min(k1, (j + 1) * s)) for j in range(k0 // s, (k1 - 1) // s + 1)]
            out[a, b] = any(_passes(tok[r0:r1, c0:c1]) for r0, r1 in row_parts for c0, c1 in col_parts)
    return out


def _ref_upstream_canvas(f: int, s: int, B: int, df: float, sink: bool) -> np.ndarray:
    """Upstream's own structure (valid for s % B == 0): per frame pair, shrink on a B-aligned canvas, OR."""
    n = f * s
    out = np.zeros((n // B, n // B), dtype=bool)
    per = math.ceil(s / B)
    for i in range(f):
        for j in range(f):
            off_r, off_c = (i * s) % B, (j * s) % B
            canvas = np.zeros((off_r + per * B, off_c + per * B), dtype=bool)
            canvas[off_r : off_r + s, off_c : off_c + s] = _ref_frame_pair(i, j, s, B, df, sink)
            nblk = canvas.shape[0] // B
            blocks = canvas[: nblk * B, : nblk * B].reshape(nblk, B, nblk, B)
            col_density = blocks.sum(axis=1) / B  # [nblk, nblk, B]
            touched = (col_density > 0).sum(-1)
            dense = (col_density > 1 / 3).sum(-1)
            shrunk = dense / (touched + 1e-9) > 0.6
            a0, b0 = (i * s) // B, (j * s) // B
            out[a0 : a0 + nblk, b0 : b0 + nblk] |= shrunk
    return out


# ----------------------------------------------------------------------------------------------------------------
# geometries: every frame count 1..24, block 64/128, decay 0.2/0.5/1.0, sink on/off, aligned and not
# ----------------------------------------------------------------------------------------------------------------
def _geometries(aligned: bool) -> list[tuple[int, int, int, float, bool]]:
    rng = random.Random(1234 if aligned else 4321)
    out = []
    for f in range(1, 25):
        for _ in range(3):
            B = rng.choice([64, 128])
            if aligned:
                s = B * rng.choice([1, 2])
            else:
                s = rng.choice([s for s in (1, 7, 16, 40, 100, 130, 200, 300) if s % B and f * s <= 4000])
            out.append((f, s, B, rng.choice([0.2, 0.5, 1.0]), rng.choice([True, False])))
    return out


ALIGNED = _geometries(True)
UNALIGNED = _geometries(False)
# frame sizes of real models (few frames, so the brute-force reference stays small)
PRODUCTION_FRAMES = [(3, 1560, 128, 1.0, True), (3, 1560, 64, 0.2, False), (2, 3600, 128, 0.5, True)]


def _ids(g: tuple) -> str:
    return "f{}-s{}-B{}-df{}-{}".format(*g[:4], "sink" if g[4] else "nosink")


def _mask(g: tuple) -> torch.Tensor:
    f, s, B, df, sink = g
    return radial_mask(f, s, block_size=B, decay_factor=df, sink=sink)


@pytest.mark.parametrize("g", ALIGNED, ids=_ids)
def test_aligned_matches_upstream_structure(g):
    got = _mask(g).numpy()
    assert np.array_equal(got, _ref_upstream_canvas(*g))
    assert np.array_equal(got, _ref_block_mask(*g))


@pytest.mark.parametrize("g", UNALIGNED + PRODUCTION_FRAMES, ids=_ids)
def test_unaligned_matches_tile_reference(g):
    assert np.array_equal(_mask(g).numpy(), _ref_block_mask(*g))


@pytest.mark.parametrize("g", ALIGNED[::4] + UNALIGNED[::4], ids=_ids)
def test_token_mask_matches_reference(g):
    f, s, B, df, sink = g
    tok = radial_token_mask(f, s, block_size=B, decay_factor=df, sink=sink)
    ref = _ref_token_mask(*g)
    assert tok.dtype == torch.bool and tok.shape == (f * s, f * s)
    assert np.array_equal(tok.numpy(), ref)
    assert radial_token_density(f, s, block_size=B, decay_factor=df, sink=sink) == pytest.approx(ref.mean(), abs=1e-12)


def test_hand_checked_masks():
    # f=4, s=128 (reference length 256): d=2 keeps (L=64 -> every 2nd frame, band floored to B = whole frame),
    # d=3 is decimated away; the sink keeps key frame 0 for query frame 3 but not key frame 3 for query frame 0.
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[0, 3] = False
    assert torch.equal(radial_mask(4, 128, block_size=128, decay_factor=1.0, sink=True), expected)
    expected[3, 0] = False
    assert torch.equal(radial_mask(4, 128, block_size=128, decay_factor=1.0, sink=False), expected)
    # s=96, B=64: blocks [0,64) [64,128) [128,192); block 1 straddles frames 0|1. Reference length 128, so d=1 has
    # L=64 < 128 and is decimated (upstream quirk for s < 128): only same-frame parts survive.
    assert radial_mask(2, 96, block_size=64, sink=False).tolist() == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    assert radial_mask(2, 96, block_size=64, sink=True).tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize(
    "f, s, df, sink, sparsity",
    [(18, 3840, 0.2, True, 71.3), (18, 3840, 1.0, True, 56.9), (30, 3840, 0.95, False, 72.5)],
)
def test_upstream_sparsity_figures(f, s, df, sink, sparsity):
    """Sparsities of the default scripts' masks, from the method notes (re-implementations of upstream, B=128)."""
    mask = radial_mask(f, s, block_size=128, decay_factor=df, sink=sink)
    assert mask.shape == (f * s // 128,) * 2
    assert round(100 * (1 - block_mask_density(mask)), 1) == sparsity


# ----------------------------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", ALIGNED + UNALIGNED, ids=_ids)
def test_shape_diagonal_and_sink(g):
    f, s, B, df, sink = g
    mask = _mask(g)
    nb = -(-(f * s) // B)
    assert mask.shape == (nb, nb) and mask.dtype == torch.bool and mask.device.type == "cpu"
    assert mask.diagonal().all()
    other = radial_mask(f, s, block_size=B, decay_factor=df, sink=not sink)
    with_sink, without = (mask, other) if sink else (other, mask)
    sink_blocks = -(-s // B)  # key blocks holding a frame-0 token
    assert with_sink[:, :sink_blocks].all()
    assert torch.equal(with_sink[:, sink_blocks:], without[:, sink_blocks:])  # the sink touches only those
    assert not (without & ~with_sink).any()


@pytest.mark.parametrize("g", [g for g in ALIGNED if not g[4]] + [(24, 128, 64, 0.5, False)], ids=_ids)
def test_symmetric_without_sink_when_aligned(g):
    mask = _mask(g)
    assert torch.equal(mask, mask.T)


def test_sink_is_key_side_only():
    # upstream's sink: every query sees frame 0; frame-0 queries do not see every frame
    mask = radial_mask(24, 128, block_size=128, decay_factor=0.2, sink=True)
    assert mask[:, 0].all()
    assert not mask[0].all()


@pytest.mark.parametrize(
    "f, s, B, sink, changes",
    [
        (24, 128, 64, True, False),  # bands are floored at B and already cover whole frame pairs in blocks
        (17, 300, 128, True, True),
        (21, 130, 64, False, True),
        (9, 1560, 128, True, True),
        (24, 1024, 128, False, True),
        (12, 768, 64, True, True),
    ],
)
def test_monotone_in_decay_factor(f, s, B, sink, changes):
    masks = [radial_mask(f, s, block_size=B, decay_factor=df, sink=sink) for df in (0.1, 0.2, 0.5, 0.95, 1.0, 2.0, 8.0)]
    dens = [block_mask_density(m) for m in masks]
    assert dens == sorted(dens)
    for lo, hi in zip(masks, masks[1:]):
        assert not (lo & ~hi).any()  # held blockwise on every geometry tried; density is what the docs promise
    assert (dens[0] < dens[-1]) == changes


def test_odd_totals_and_tiny_geometries():
    assert radial_mask(3, 7, block_size=16).shape == (2, 2)  # 21 tokens -> ceil(21/16) = 2
    assert radial_mask(1, 1, block_size=16).tolist() == [[True]]
    assert radial_mask(1, 1000, block_size=128).all()  # one frame: dense
    assert radial_mask(5, 129, block_size=128).shape == (6, 6)
    assert radial_mask(7, 33, block_size=48).shape == (5, 5)  # block size need not be a power of two
    # huge decay factors widen every band to the whole frame pair (only decimation is left); tiny ones floor at B
    wide = radial_mask(6, 256, block_size=64, decay_factor=1e308, sink=False)
    assert torch.equal(wide, radial_mask(6, 256, block_size=64, decay_factor=64.0, sink=False))
    assert torch.equal(radial_token_mask(6, 256, block_size=64, decay_factor=1e308, sink=False), torch.from_numpy(
        _ref_token_mask(6, 256, 64, 1e30, False)))
    assert torch.equal(radial_mask(6, 256, block_size=64, decay_factor=1e-300), radial_mask(6, 256, block_size=64, decay_factor=0.01))


def test_production_geometries():
    cases = {  # (f, s, B) -> blocks
        (21, 1560, 128): 256,
        (21, 3600, 128): 591,
        (33, 3600, 128): 929,
        (18, 3840, 128): 540,
        (21, 3600, 64): 1182,
    }
    for (f, s, B), nb in cases.items():
        mask = radial_mask(f, s, block_size=B, decay_factor=1.0)
        assert mask.shape == (nb, nb)
        assert mask.diagonal().all() and mask[:, : -(-s // B)].all()
        assert 0.2 < block_mask_density(mask) < 0.6


def test_cache_returns_private_copies():
    radial._cached_mask.cache_clear()
    a = radial_mask(9, 200, block_size=64, decay_factor=0.5)
    b = radial_mask(9, 200, block_size=64, decay_factor=0.5)
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert radial._cached_mask.cache_info().hits == 1
    a.fill_(False)
    assert torch.equal(radial_mask(9, 200, block_size=64, decay_factor=0.5), b)
    # an int decay factor and the default options share one entry
    radial_mask(9, 200, block_size=64, decay_factor=1)
    radial_mask(9, 200, block_size=64)
    info = radial._cached_mask.cache_info()
    assert (info.hits, info.misses) == (3, 2)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"num_frames": 0}, ValueError, "num_frames"),
        ({"num_frames": 2.0}, TypeError, "num_frames"),
        ({"num_frames": True}, TypeError, "num_frames"),
        ({"tokens_per_frame": 0}, ValueError, "tokens_per_frame"),
        ({"block_size": 100}, ValueError, "multiple of 16"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": 128.0}, TypeError, "block_size"),
        ({"decay_factor": 0.0}, ValueError, "decay_factor"),
        ({"decay_factor": -1.0}, ValueError, "decay_factor"),
        ({"decay_factor": float("nan")}, ValueError, "decay_factor"),
        ({"decay_factor": float("inf")}, ValueError, "decay_factor"),
        ({"decay_factor": "1"}, TypeError, "decay_factor"),
        ({"sink": 1}, TypeError, "sink"),
    ],
)
def test_argument_errors(kwargs, exc, words):
    args = {"num_frames": 4, "tokens_per_frame": 64, "block_size": 64, "decay_factor": 1.0, "sink": True}
    args.update(kwargs)
    f, s = args.pop("num_frames"), args.pop("tokens_per_frame")
    for fn in (radial_mask, radial_token_mask, radial_token_density):
        with pytest.raises(exc, match=words):
            fn(f, s, **args)


def test_token_mask_refuses_large_sizes():
    with pytest.raises(ValueError, match="radial_mask"):
        radial_token_mask(21, 3600)


def test_describe():
    info = radial.describe(21, 3600, decay_factor=0.2)
    mask = radial_mask(21, 3600, decay_factor=0.2)
    assert info["num_blocks"] == 591 and info["num_tokens"] == 75600 and info["aligned"] is False
    assert info["kept_blocks"] == int(mask.sum())
    assert info["density"] == pytest.approx(block_mask_density(mask))
    assert info["sparsity"] == pytest.approx(1 - info["density"])
    assert info["speedup_upper_bound"] == pytest.approx(1 / info["density"])
    assert 0 < info["token_density"] <= info["density"] + 0.05
    assert radial.describe(18, 3840, block_size=128)["aligned"] is True
    with pytest.raises(ValueError, match="unknown radial mask option"):
        radial.describe(4, 64, decay=0.2)


# ----------------------------------------------------------------------------------------------------------------
# density and drawing
# ----------------------------------------------------------------------------------------------------------------
def test_block_mask_density():
    m = torch.tensor([[True, False], [True, True]])
    assert block_mask_density(m) == 0.75
    assert block_mask_density(m.view(1, 1, 2, 2).expand(2, 3, 2, 2)) == 0.75
    assert block_mask_density(m.to(torch.int8)) == 0.75
    with pytest.raises(ValueError):
        block_mask_density(torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError):
        block_mask_density(torch.ones(2, 2))
    with pytest.raises(TypeError):
        block_mask_density([[True]])


def test_draw_block_mask(tmp_path):
    mask = radial_mask(5, 100, block_size=64, decay_factor=0.2)  # frame boundaries inside blocks
    nb = mask.shape[0]
    out = draw_block_mask(mask, tmp_path / "sub" / "m.png", title="test", tokens_per_frame=100, block_size=64, cell=10)
    img = Image.open(out).convert("RGB")
    assert img.width >= nb * 10 and img.height > nb * 10
    # find the mask body: the picture is centred horizontally below the caption
    x0 = (img.width - nb * 10) // 2
    y0 = img.height - 8 - nb * 10
    px = np.asarray(img)
    for a in range(nb):
        for b in range(nb):
            y, x = y0 + a * 10 + 3, x0 + b * 10 + 3  # a pixel away from frame lines (boundaries at 100/64*10k px)
            if any(abs(y - y0 - round(i * 100 / 64 * 10)) <= 1 for i in range(1, 6)):
                continue
            if any(abs(x - x0 - round(i * 100 / 64 * 10)) <= 1 for i in range(1, 6)):
                continue
            brightness = int(px[y, x].astype(int).sum())
            assert (brightness > 600) == bool(mask[a, b]), (a, b, px[y, x])
    # a frame boundary line is red
    line_y = y0 + round(100 / 64 * 10)
    assert tuple(px[line_y, x0 + 2]) == (215, 70, 60)
    # batched [1, 1, nb, nb] masks and default cell work; the picture stays small
    out2 = draw_block_mask(radial_mask(21, 3600).view(1, 1, 591, 591), tmp_path / "big.png")
    assert out2.stat().st_size < 200_000
    with pytest.raises(ValueError):
        draw_block_mask(torch.ones(2, 3, 4, dtype=torch.bool), tmp_path / "bad.png")
    with pytest.raises(ValueError):
        draw_block_mask(mask, tmp_path / "bad.png", cell=0)

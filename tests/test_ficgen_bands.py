"""FFT band split: identity, the square mask's bins (facts file §3.4), the Gaussian option, the reference."""

from __future__ import annotations

import math

import pytest
import torch

from diffattn.frequency import band_split, band_split_reference, low_pass_mask, square_band_indices


@pytest.mark.parametrize("band", ["square", "gaussian"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 5, 16, 16), (3, 7, 9), (2, 6, 11)])
def test_low_plus_high_is_identity_and_matches_reference(band, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    low, high = band_split(x, 0.35, band)
    assert torch.equal(low + high, x) or torch.allclose(low + high, x, atol=1e-15, rtol=0)
    ref_low, ref_high = band_split_reference(x, 0.35, band)
    torch.testing.assert_close(low, ref_low, atol=1e-10, rtol=0)
    torch.testing.assert_close(high, ref_high, atol=1e-10, rtol=0)
    x32 = x.float()
    low32, high32 = band_split(x32, 0.35, band)
    assert low32.dtype == torch.float32
    torch.testing.assert_close(low32 + high32, x32, atol=1e-6, rtol=0)
    torch.testing.assert_close(low32.double(), ref_low, atol=1e-5, rtol=0)


def test_square_mask_bins_as_in_facts():
    assert square_band_indices(8, 0.35) == (1, 7)  # bins 1..6
    assert square_band_indices(16, 0.35) == (2, 14)  # bins 2..13
    m8 = low_pass_mask(8, 8, 0.35, "square")
    assert m8[1:7, 1:7].eq(1).all() and m8.sum() == 36
    assert m8[0].eq(0).all() and m8[7].eq(0).all() and m8[:, 0].eq(0).all() and m8[:, 7].eq(0).all()
    m16 = low_pass_mask(16, 16, 0.35, "square")
    assert m16.sum() == 144 and m16[2:14, 2:14].eq(1).all()


def test_band_content():
    # A constant is all low band; the Nyquist checkerboard is all high band (its bin 0 after fftshift is cut).
    const = torch.full((1, 8, 8), 3.0, dtype=torch.float64)
    low, high = band_split(const, 0.35)
    torch.testing.assert_close(low, const)
    assert high.abs().max() < 1e-12
    i = torch.arange(8)
    checker = ((-1.0) ** (i[:, None] + i[None, :])).double()[None]
    low, high = band_split(checker, 0.35)
    assert low.abs().max() < 1e-12
    torch.testing.assert_close(high, checker)


def test_gaussian_mask():
    m = low_pass_mask(16, 16, 0.25, "gaussian")
    assert m[8, 8] == 1.0  # DC
    f = 4 / 16  # bin 4 away from DC is frequency 0.25 = rho
    assert math.isclose(float(m[8, 12]), math.exp(-0.5), rel_tol=1e-12)
    assert math.isclose(float(m[12, 12]), math.exp(-1.0), rel_tol=1e-12)
    assert (m > 0).all() and (m <= 1).all() and f == 0.25


@pytest.mark.parametrize("bad", [dict(rho=0.0), dict(rho=0.6), dict(rho=float("nan")), dict(band="box")])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="rho|band"):
        band_split(torch.randn(4, 4), **bad)
    with pytest.raises(ValueError, match="at least 2 dims"):
        band_split(torch.randn(4))

"""The core's consistency check of a reader's arms (``Arm.validate``): bad input pixels are
masked with flux and ivar zeroed, and a clean arm is left exactly as it came."""

from __future__ import annotations

import numpy as np

from stxcli.spectra import Arm


def _arm(flux, ivar, mask=None):
    flux, ivar = np.asarray(flux, np.float32), np.asarray(ivar, np.float32)
    mask = np.zeros(flux.shape, bool) if mask is None else np.asarray(mask, bool)
    return Arm("b", np.arange(flux.shape[1], dtype=np.float64) + 4000.0, flux, ivar, mask)


def test_a_clean_arm_is_left_as_it_came():
    arm = _arm([[1.0, 2.0, 3.0]], [[1.0, 0.0, 4.0]], mask=[[False, True, False]])
    flux, ivar, mask = arm.flux, arm.ivar, arm.mask
    arm.validate()
    assert arm.flux is flux and arm.ivar is ivar and arm.mask is mask
    np.testing.assert_array_equal(arm.mask, [[False, True, False]])
    np.testing.assert_array_equal(arm.flux, [[1.0, 2.0, 3.0]])
    # finite values whose float32 sum overflows are not bad pixels
    big = _arm([[3e38, 3e38, 1.0]], [[1.0, 1.0, 1.0]])
    big.validate()
    assert not big.mask.any() and big.flux[0, 0] == np.float32(3e38)


def test_bad_pixels_are_masked_and_zeroed():
    nan, inf = np.nan, np.inf
    arm = _arm([[nan, 2.0, 3.0, 4.0, inf], [1.0, 1.0, 1.0, 1.0, 1.0]],
               [[1.0, -1.0, inf, nan, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    arm.validate()
    np.testing.assert_array_equal(arm.mask, [[True, True, True, True, True], [False] * 5])
    np.testing.assert_array_equal(arm.flux, [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(arm.ivar, [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    empty = _arm(np.zeros((0, 3)), np.zeros((0, 3)))
    empty.validate()
    assert empty.mask.shape == (0, 3)

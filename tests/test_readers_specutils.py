"""The DESI reader against specutils' own DESI loaders on the same real files.

Skipped when specutils is not installed (it is a test extra). specutils returns one Spectrum per
arm holding all spectra, with ``mask = MASK != 0``; ours also masks ``ivar == 0`` and zeroes the
flux of masked pixels, so flux and ivar are compared on the pixels both call good.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from stx_builtin.readers.desi import DesiReader

specutils = pytest.importorskip("specutils")

CASES = [
    ("coadd-sv3-dark-26065.fits", "DESI coadd"),
    ("coadd-5-169-thru20210419.fits", "DESI coadd"),
    ("spectra-sv3-dark-26065.fits", "DESI spectra"),
]


@pytest.mark.parametrize("name, fmt", CASES)
def test_same_arrays_as_specutils(shared, name, fmt):
    path = shared / "desi-edr" / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # specutils warns about HDUs it does not know
        sl = specutils.SpectrumList.read(str(path), format=fmt)
    (ours,) = DesiReader().read(path)
    assert [s.meta["band"] for s in sl] == [a.name for a in ours.arms] == ["b", "r", "z"]
    for spec, arm in zip(sl, ours.arms):
        np.testing.assert_array_equal(arm.wave, spec.spectral_axis.to_value("Angstrom"))
        their_flux = np.asarray(spec.flux.value)
        their_ivar = np.asarray(spec.uncertainty.array)
        their_bad = np.asarray(spec.mask)
        assert their_flux.shape == arm.flux.shape
        np.testing.assert_array_equal(arm.mask, their_bad | (their_ivar == 0))
        good = ~arm.mask
        np.testing.assert_array_equal(arm.flux[good], their_flux[good])
        np.testing.assert_array_equal(arm.ivar[good], their_ivar[good])
    fm = sl[0].meta["fibermap"]
    np.testing.assert_array_equal(ours.meta.extra["targetid"], np.asarray(fm["TARGETID"]))

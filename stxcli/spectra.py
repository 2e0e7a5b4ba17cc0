"""The spectrum data model: what every reader yields and every featurizer consumes.

A :class:`SpectrumBatch` holds ``n`` spectra as numpy arrays, one :class:`Arm` per
spectrograph arm (LAMOST has one, DESI has three: ``b``, ``r``, ``z``). Nothing on the hot path
is a per-spectrum Python object.

Conventions
-----------
* Wavelengths are vacuum Angstrom. Readers convert air wavelengths (:func:`air_to_vacuum`).
* ``flux``, ``ivar`` are float32 ``(n, npix)``; ``mask`` is bool ``(n, npix)``, True = bad.
  A bad pixel always also has ``ivar == 0``; :meth:`Arm.validate` enforces that.
* ``wave`` is float64 ``(npix,)`` when shared by the batch, or ``(n, npix)`` when each spectrum
  has its own grid.
* ``resolving_power`` is the arm's R = lambda / FWHM, a scalar or a ``(npix,)`` array, when known.
  ``resolution`` is DESI's band matrix ``(n, ndiag, npix)``, loaded only when asked for.
* Per-spectrum metadata live in :class:`SpectrumMeta`: numpy arrays of length ``n``. Unknown
  floats are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

C_KMS = 299_792.458


@dataclass
class Arm:
    """One spectrograph arm of a batch of spectra."""

    name: str
    wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    resolving_power: float | np.ndarray | None = None
    resolution: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.flux.shape[0])

    def wave_of(self, i: int) -> np.ndarray:
        """The wavelength grid of spectrum ``i``."""
        return self.wave if self.wave.ndim == 1 else self.wave[i]

    def validate(self) -> None:
        """Check shapes and dtypes; force ``ivar = 0`` where masked or non-finite."""
        if self.flux.ndim != 2:
            raise ValueError(f"arm {self.name}: flux must be 2-D (n, npix), got {self.flux.shape}")
        if self.ivar.shape != self.flux.shape or self.mask.shape != self.flux.shape:
            raise ValueError(f"arm {self.name}: flux, ivar and mask shapes differ")
        if self.wave.shape[-1] != self.flux.shape[1]:
            raise ValueError(f"arm {self.name}: wave has {self.wave.shape[-1]} pixels, flux {self.flux.shape[1]}")
        self.flux = np.asarray(self.flux, dtype=np.float32)
        self.ivar = np.asarray(self.ivar, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # three reductions say nothing is wrong
            clean = (self.ivar.size == 0 or self.ivar.min() >= 0) and bool(np.isfinite(self.flux.sum())) \
                and bool(np.isfinite(self.ivar.sum()))
        if clean:
            return
        bad = self.mask | ~np.isfinite(self.flux) | ~np.isfinite(self.ivar) | (self.ivar < 0)
        self.mask = bad
        if bad.any():  # in place: the reader's arrays are the batch's own
            if not (self.flux.flags.writeable and self.ivar.flags.writeable):
                self.flux, self.ivar = self.flux.copy(), self.ivar.copy()
            self.flux[bad] = 0.0
            self.ivar[bad] = 0.0


@dataclass
class SpectrumMeta:
    """Per-spectrum metadata, numpy arrays of length ``n``.

    ``snr`` maps a band name (``"g"``, ``"r"``, ``"b"``...) to an array; ``extra`` holds
    survey-specific columns (TARGETID, OBSID, ...) that should travel to the output catalog.
    """

    ids: np.ndarray
    survey: str
    source_file: np.ndarray
    source_row: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    rv_kms: np.ndarray
    snr: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int, survey: str, source_file: str, first_row: int = 0) -> "SpectrumMeta":
        nan = np.full(n, np.nan)
        return cls(
            ids=np.array([f"{source_file}:{first_row + i}" for i in range(n)]),
            survey=survey,
            source_file=np.full(n, source_file, dtype=object).astype(str),
            source_row=np.arange(first_row, first_row + n, dtype=np.int64),
            ra=nan.copy(),
            dec=nan.copy(),
            rv_kms=nan.copy(),
        )


@dataclass
class SpectrumBatch:
    """``n`` spectra with their arms and metadata."""

    arms: list[Arm]
    meta: SpectrumMeta

    @property
    def n(self) -> int:
        return self.arms[0].n if self.arms else 0

    def validate(self) -> "SpectrumBatch":
        for arm in self.arms:
            arm.validate()
            if arm.n != self.n:
                raise ValueError("arms hold different numbers of spectra")
        if len(self.meta.ids) != self.n:
            raise ValueError("metadata length differs from the number of spectra")
        return self


def air_to_vacuum(wave_air: np.ndarray) -> np.ndarray:
    """Air to vacuum wavelength (Angstrom), the IAU standard of Morton (2000) / Ciddor (1996).

    The refractive index is evaluated at the air wavelength, which is accurate to ~1e-4 A in
    the optical.
    """
    wave_air = np.asarray(wave_air, dtype=np.float64)
    s2 = (1e4 / wave_air) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return wave_air * n


def vacuum_to_air(wave_vac: np.ndarray) -> np.ndarray:
    """Vacuum to air wavelength (Angstrom), Morton (2000)."""
    wave_vac = np.asarray(wave_vac, dtype=np.float64)
    s2 = (1e4 / wave_vac) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return wave_vac / n

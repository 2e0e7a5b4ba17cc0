"""The small typed protocols every plugin kind implements.

A plugin registers *objects* through a hook (see :mod:`stxcli.hookspecs`); each object has a
unique ``name`` within its kind and a ``version`` string. The core only ever talks to these
protocols, never to a concrete survey or model.

* :class:`Reader` instances are registered as they are (they are stateless).
* :class:`FeaturizerFactory`, :class:`HeadFactory` and :class:`AdapterFactory` are registered as
  classes (or any callable with ``name``/``version`` attributes) and instantiated with a config.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .spectra import SpectrumBatch, SpectrumMeta

# --------------------------------------------------------------------------------------- readers

#: Priority of a reader that knows one survey's layout; outranks generic readers.
PRIORITY_SURVEY = 100
#: Priority of a generic reader (e.g. any 1-D FITS spectrum).
PRIORITY_GENERIC = 10


@dataclass(frozen=True)
class HduInfo:
    """What the core learned about one HDU without reading its data."""

    index: int
    name: str  # EXTNAME upper-cased, "PRIMARY" for HDU 0 without one
    kind: str  # "primary", "image", "bintable", "table", "compimage", "other"
    header: Any  # astropy.io.fits.Header
    columns: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class FileProbe:
    """A cheap summary of one input file, built once and shown to every reader's ``identify``."""

    path: Path
    suffix: str  # lower-case, compression suffix stripped: ".fits"
    compressed: bool
    hdus: tuple[HduInfo, ...] = ()

    def hdu(self, name: str) -> HduInfo | None:
        for h in self.hdus:
            if h.name == name.upper():
                return h
        return None

    @property
    def primary_header(self) -> Any:
        return self.hdus[0].header if self.hdus else None


@runtime_checkable
class Reader(Protocol):
    """Reads one survey's files into :class:`~stxcli.spectra.SpectrumBatch` chunks."""

    name: str
    version: str
    priority: int
    extensions: tuple[str, ...]
    description: str

    def identify(self, probe: FileProbe) -> bool:
        """True when this reader can read the probed file. Cheap and pure: headers only."""

    def read(
        self, path: Path, *, chunk_size: int = 1024, with_resolution: bool = False
    ) -> Iterator[SpectrumBatch]:
        """Yield batches of at most ``chunk_size`` spectra, with flat memory."""


# ----------------------------------------------------------------------------------- featurizers


@dataclass
class FeatureBatch:
    """Features of ``n`` spectra. No NaN or inf: a missing feature has ``ivar == 0``.

    ``quality`` holds per-spectrum arrays: at least ``snr`` (float32), ``masked_frac`` (float32)
    and ``flags`` (int32 bitmask, see :mod:`stxcli.flags`); featurizers may add more (``rv_kms``).
    """

    features: np.ndarray  # (n, d) float32
    ivar: np.ndarray  # (n, d) float32
    quality: dict[str, np.ndarray]
    meta: SpectrumMeta
    # Human-readable provenance a featurizer wants to report (e.g. "rv estimated for 12 spectra").
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Featurizer(Protocol):
    """Turns a batch from any survey into one float32 vector per star."""

    name: str
    version: str
    #: True when this featurizer uses DESI-style resolution matrices (readers then load them).
    needs_resolution: bool

    @property
    def dim(self) -> int: ...

    def config(self) -> dict[str, Any]:
        """The full configuration: ``factory(**config())`` rebuilds an identical featurizer."""

    def transform(self, batch: SpectrumBatch) -> FeatureBatch: ...

    def axis(self) -> np.ndarray | None:
        """The feature axis (e.g. the wavelength grid of the raw featurizer), or None."""


class FeaturizerFactory(Protocol):
    name: str
    version: str
    description: str

    def __call__(self, **config: Any) -> Featurizer: ...


# ------------------------------------------------------------------------------ heads, adapters


class HeadFactory(Protocol):
    """Builds a regression head. See the models guide in docs/ for the full contract."""

    name: str
    version: str
    description: str

    def __call__(self, **config: Any) -> Any: ...


class AdapterFactory(Protocol):
    """Builds a fine-tuning adapter. See the models guide in docs/ for the full contract."""

    name: str
    version: str
    description: str

    def __call__(self, **config: Any) -> Any: ...


KINDS = ("reader", "featurizer", "head", "adapter")

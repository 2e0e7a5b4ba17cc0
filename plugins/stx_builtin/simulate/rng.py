"""Random numbers that depend only on (seed, stream, star index): never on chunking or workers.

* :func:`uniform` / :func:`normal`: counter-based (a SplitMix64 hash of the four integers),
  vectorised over star indices; used for labels and observation parameters. Star ``i`` of a run
  gets the same values whatever ``--n``, ``--workers`` or chunk size, so the first 100 stars of a
  1,000-star run equal a 100-star run with the same seed.
* :func:`star_generator`: a numpy ``Generator`` seeded by ``SeedSequence([seed, stream, i])``, for
  the long per-pixel draws (noise, masked pixels) of one star.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_K_STREAM = np.uint64(0xD1B54A32D192ED03)
_K_INDEX = np.uint64(0x8CB92BA72F3D8DD7)
_K_DRAW = np.uint64(0xABC98388FB8FAC03)

# Streams (fixed numbers: changing one changes every simulated file)
LABELS = 1
MIX = 2
OBS = 3
NOISE = 4
CATALOG = 5
LIBRARY = 6


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, stream: int, index: np.ndarray, k: int) -> np.ndarray:
    """``(len(index), k)`` uniform draws in (0, 1), a pure function of (seed, stream, index, j)."""
    idx = np.asarray(index, dtype=np.uint64).reshape(-1, 1)
    j = np.arange(k, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _M1 + np.uint64(stream) * _K_STREAM
        z = _mix(z + idx * _K_INDEX + j * _K_DRAW)
        z = _mix(z + _M1)
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    return np.clip(u, 1e-16, 1.0 - 1e-16)


def normal(seed: int, stream: int, index: np.ndarray, k: int) -> np.ndarray:
    """Standard normal draws with the same addressing as :func:`uniform`."""
    from scipy.special import ndtri

    return ndtri(uniform(seed, stream, index, k))


def star_generator(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, stream, int(index)]))

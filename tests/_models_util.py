"""Small synthetic data shared by the model tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

A_SEED = 42


def synth(n: int, d: int = 24, seed: int = 0, shift: float = 0.0, feh_offset: float = 0.0,
          noise: float = 0.01) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray]]:
    """Features that depend smoothly (non-linearly) on Teff, log g, [Fe/H]."""
    rng = np.random.default_rng(seed)
    teff = rng.uniform(4000, 7000, n)
    logg = rng.uniform(1, 5, n)
    feh = rng.uniform(-2.5, 0.5, n)
    z = np.stack([(np.log10(teff) - 3.74) / 0.07, logg - 3, feh + 1], 1)
    a = np.random.default_rng(A_SEED).normal(size=(3, d))
    f = 1 + 0.1 * np.tanh(z @ a / 2) + 0.02 * z[:, :1] ** 2 + shift + rng.normal(0, noise, (n, d))
    iv = np.full((n, d), 1 / noise**2, np.float32)
    labels = {"teff": teff, "logg": logg, "feh": feh + feh_offset}
    return f.astype(np.float32), iv, [f"s{seed}-{i}" for i in range(n)], labels


def write_synth(path: Path, n: int, *, config: dict | None = None, **kw) -> Path:
    from stxcli.store import write_store_arrays

    f, iv, ids, labels = synth(n, **kw)
    write_store_arrays(path, f, iv, ids, labels, featurizer_name="raw", featurizer_version="test",
                       featurizer_config=config or {"grid": "synthetic"},
                       quality={"snr": np.full(n, 50.0, np.float32), "flags": np.zeros(n, np.int32)},
                       meta={"ra": np.linspace(0, 10, n), "dec": np.linspace(-5, 5, n)})
    return path

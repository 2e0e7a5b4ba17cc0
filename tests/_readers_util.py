"""Helpers for the reader tests: build test files from the real ones (never committed binaries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tile_desi(src: Path, dst: Path, reps: int) -> Path:
    """Write ``dst``: the DESI file ``src`` with every per-spectrum HDU (FIBERMAP, SCORES and the
    arms' FLUX/IVAR/MASK/RESOLUTION) tiled ``reps`` times along the spectrum axis. TARGETIDs are
    made unique by adding ``10**12 * rep`` (a real coadd has one row per TARGETID)."""
    from astropy.io import fits

    with fits.open(src) as h:
        out = fits.HDUList()
        n0 = int(h["FIBERMAP"].header["NAXIS2"])
        for hdu in h:
            name = hdu.name
            if isinstance(hdu, fits.PrimaryHDU):
                out.append(fits.PrimaryHDU(header=hdu.header))
            elif isinstance(hdu, fits.BinTableHDU):
                if len(hdu.data) == n0 and name in ("FIBERMAP", "SCORES"):
                    t = fits.BinTableHDU.from_columns(hdu.columns, nrows=n0 * reps, name=name)
                    for c in hdu.columns.names:
                        col = np.asarray(hdu.data[c])
                        t.data[c] = np.tile(col, (reps,) + (1,) * (col.ndim - 1))
                    if "TARGETID" in hdu.columns.names:
                        t.data["TARGETID"] = np.tile(np.asarray(hdu.data["TARGETID"]), reps) + np.repeat(
                            np.arange(reps, dtype=np.int64) * 10**12, n0
                        )
                    out.append(t)
                else:
                    out.append(hdu.copy())
            elif name.endswith("_WAVELENGTH"):
                out.append(fits.ImageHDU(np.asarray(hdu.data), header=hdu.header, name=name))
            else:
                d = np.asarray(hdu.data)
                td = np.tile(d, (reps,) + (1,) * (d.ndim - 1))
                if name.endswith("_MASK"):
                    out.append(fits.ImageHDU(td.astype(np.uint32), name=name))
                else:
                    out.append(fits.ImageHDU(td, header=hdu.header, name=name))
        out.writeto(dst, overwrite=True)
    return dst


def truncate(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    """Copy the first ``fraction`` of the bytes of ``src`` to ``dst`` (a cut-off download)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return dst

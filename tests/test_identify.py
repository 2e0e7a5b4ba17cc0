"""Format identification over the real files: the core's probe + every reader's identify."""

from __future__ import annotations

from pathlib import Path

import pytest

from stxcli.errors import FormatError, UsageError
from stxcli.registry import get_registry, identify, probe_file

EXPECTED = {
    "lamost-dr1/spectra": ("lamost", "*.fits", 24),
    "lamost-later": ("lamost", "*.fits*", 2),
    "lamost-dr10/spectra": ("lamost", "*.fits.gz", 40),
    "desi-edr": ("desi", "*.fits", 3),
}


@pytest.fixture(scope="module")
def registry():
    get_registry.cache_clear()
    reg = get_registry()
    assert {"lamost", "desi", "fits1d"} <= set(reg.names("reader"))
    return reg


def _files(shared: Path, folder: str, pattern: str) -> list[Path]:
    return sorted(p for p in (shared / folder).glob(pattern) if p.name != "SOURCE.md")


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_every_real_survey_file_picks_its_reader(shared, registry, folder):
    name, pattern, count = EXPECTED[folder]
    files = _files(shared, folder, pattern)
    assert len(files) == count
    for f in files:
        assert identify(f, registry).name == name, f
        # and honestly: no other reader claims it (survey readers would outrank fits1d anyway)
        probe = probe_file(f)
        claims = sorted(r.name for r in registry.readers() if r.identify(probe))
        assert claims == [name], (f, claims)


def test_miles_files_pick_fits1d(shared, registry):
    files = _files(shared, "miles/spectra", "*.fits")
    assert len(files) == 748
    for f in files[:4] + files[-4:]:
        assert identify(f, registry).name == "fits1d"
        probe = probe_file(f)
        assert [r.name for r in registry.readers() if r.identify(probe)] == ["fits1d"]


def test_a_few_dr10_training_files(shared, registry):
    for f in _files(shared, "lamost-dr10-train/spectra", "*.fits.gz")[:5]:
        assert identify(f, registry).name == "lamost"


def test_format_override_and_unknown_format(shared, registry, tmp_path):
    miles = shared / "miles" / "spectra" / "MILES_res2.50_star_m0001V.fits"
    assert identify(miles, registry, format="fits1d").name == "fits1d"
    assert identify(miles, registry, format="lamost").name == "lamost"  # --format is trusted
    with pytest.raises(UsageError, match="unknown format 'sdss'"):
        identify(miles, registry, format="sdss")
    text = tmp_path / "notes.txt"
    text.write_text("not a spectrum\n")
    with pytest.raises(FormatError, match="unknown format; no reader recognises it"):
        identify(text, registry)


def test_forced_wrong_reader_fails_with_a_clear_error(shared, registry):
    miles = shared / "miles" / "spectra" / "MILES_res2.50_star_m0001V.fits"
    with pytest.raises(FormatError, match="not a LAMOST LRS layout"):
        list(registry.get("reader", "lamost").read(miles))
    with pytest.raises(FormatError, match="HDU 'FIBERMAP' is missing"):
        list(registry.get("reader", "desi").read(miles))


def test_scanned_probe_equals_astropy_probe_on_real_files(shared, monkeypatch):
    """The probe scans header blocks itself (names, kinds, columns and shapes from its own parse
    of the cards) and has astropy parse a header only when asked for it: the same HDUs (every
    header card included) as opening the file with astropy, or None (astropy then probes) for
    what it leaves to astropy, e.g. tile-compressed HDUs."""
    import stxcli.registry as R

    files = sorted((shared / "desi-edr").glob("*.fits*"))
    for sub in ("lamost-dr1", "lamost-later", "lamost-dr10"):
        files += sorted((shared / sub).rglob("*.fits*"))[:8]
    files += sorted((shared / "miles" / "spectra").glob("*.fits"))[:8]
    scanned = {f: R._probe_scanned(f) for f in files}
    assert sum(v is not None for v in scanned.values()) >= len(files) - 2
    monkeypatch.setattr(R, "_probe_scanned", lambda path: None)
    for f, fast in scanned.items():
        if fast is None:
            continue
        ref = R.probe_file(f).hdus
        assert len(fast) == len(ref), f
        for a, b in zip(fast, ref):
            assert (a.index, a.name, a.kind, a.columns, a.shape) == (b.index, b.name, b.kind, b.columns, b.shape), f
            assert a._header is None  # not parsed until asked for
            for key in dict.fromkeys(b.header.keys()):  # the scan's keywords: astropy's values
                if key not in ("COMMENT", "HISTORY", ""):
                    assert a.cards[key] == b.header[key], (f, a.name, key)
            assert a._header is None  # cards did not parse it
            assert list(a.header.items()) == list(b.header.items()), (f, a.name)
            assert b.cards is b.header  # astropy's probe: cards are its header
            assert a.header is a.header  # parsed once


def test_scanned_probe_leaves_broken_files_to_astropy(shared, tmp_path):
    import stxcli.registry as R
    from _readers_util import truncate

    src = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits*"))[0]
    cut = truncate(src, tmp_path / src.name)
    assert R._probe_scanned(cut) is None
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"SIMPLE  =" + b"x" * 100)
    assert R._probe_scanned(junk) is None


def test_large_gzip_files_are_probed_by_astropy_streaming(shared, tmp_path, monkeypatch):
    import stxcli.registry as R

    src = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[0]
    assert R._probe_scanned(src) is not None
    monkeypatch.setattr(R, "GZIP_SCAN_MAX_BYTES", src.stat().st_size - 1)
    assert R._probe_scanned(src) is None  # not decompressed whole into memory
    assert R.probe_file(src).hdu("COADD") is not None


def test_identify_reads_keywords_without_astropy_parsing_a_header(shared, registry):
    """LAMOST and 1-D FITS identify on the probe's scanned keywords (HduInfo.cards): parsing the
    primary header with astropy cost 1.4 ms a file, a sixth of predicting from LAMOST files."""
    files = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:3]
    files += sorted((shared / "miles" / "spectra").glob("*.fits"))[:3]
    for f in files:
        probe = probe_file(f)
        assert probe.hdus[0]._cards is not None, f
        picked = [r.name for r in registry.readers() if r.identify(probe)]
        assert picked and picked[0] in ("lamost", "fits1d"), (f, picked)
        assert all(h._header is None for h in probe.hdus), f


def test_probe_and_reader_share_one_decompression_and_one_scan(shared, monkeypatch):
    """A .fits.gz is decompressed and its headers scanned once for the probe and the reader that
    follows it; another file's bytes are never served from that cache."""
    import stxcli.fitsio as fitsio

    a, b = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:2]
    scans: list = []
    real_scan = fitsio._scan
    monkeypatch.setattr(fitsio, "_scan", lambda *args: scans.append(args[2]) or real_scan(*args))
    monkeypatch.setattr(fitsio, "_last", [None])
    data = fitsio.read_file_bytes(a)
    first = fitsio.scan_buffer(data, a)
    assert fitsio.read_file_bytes(a) is data
    again = fitsio.scan_buffer(fitsio.read_file_bytes(a), a)
    assert len(scans) == 1
    assert [(h.name, h.data_offset, h.header) for h in again] == [(h.name, h.data_offset, h.header) for h in first]
    other = fitsio.read_file_bytes(b)
    assert other is not data and other != data
    fitsio.scan_buffer(other, b)
    assert len(scans) == 2
    assert fitsio.scan_buffer(bytes(data), a) is not None and len(scans) == 3  # equal bytes, not the kept ones


@pytest.mark.parametrize("backend", ["installed", "gzip module"])
def test_gzip_files_decompress_alike_and_broken_ones_fail_clearly(shared, tmp_path, monkeypatch, backend):
    """.fits.gz bytes come from python-isal where it is installed, else the gzip module: the same
    bytes either way, and a cut-off or corrupt stream is one FormatError naming the file."""
    import gzip

    import stxcli.fitsio as fitsio

    if backend == "gzip module":
        monkeypatch.setattr(fitsio, "_gunzip", lambda: (gzip.decompress, ()))
    monkeypatch.setattr(fitsio, "_last", [None])
    src = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:3]
    for f in src:
        assert fitsio.read_file_bytes(f) == gzip.decompress(f.read_bytes())
    raw = src[0].read_bytes()
    for name, data in (("cut.fits.gz", raw[: len(raw) // 2]), ("bad.fits.gz", raw[:100] + b"x" * 300 + raw[400:])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match=f"{name}: truncated or corrupt compressed file"):
            fitsio.read_file_bytes(tmp_path / name)
    with pytest.raises(FormatError, match="is a directory"):
        fitsio.read_file_bytes(tmp_path)
    with pytest.raises(FormatError, match="nothere.fits.gz: no such file"):
        fitsio.read_file_bytes(tmp_path / "nothere.fits.gz")

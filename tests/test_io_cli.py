"""Atomic outputs and the CLI's error boundary (one line, exit codes)."""

from __future__ import annotations

import pytest

from stxcli.io import atomic_dir, atomic_file

from conftest import run_cli


def test_atomic_file_success_and_failure(tmp_path):
    target = tmp_path / "out.fits"
    with atomic_file(target) as tmp:
        assert tmp.name.endswith(".fits") and tmp.parent == tmp_path
        tmp.write_text("ok")
        assert not target.exists()
    assert target.read_text() == "ok"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fits"]


def test_atomic_dir_replaces(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with atomic_dir(target) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with pytest.raises(ValueError):
        with atomic_dir(target) as d:
            (d / "c").write_text("3")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_missing_input_is_one_line_exit_1(tmp_path, capsys):
    code, out, err = run_cli(["featurize", tmp_path / "nope.fits", "-o", tmp_path / "f.h5"], capsys)
    assert code == 1
    assert err.strip().startswith("error:") and "nope.fits" in err and len(err.strip().splitlines()) == 1
    assert out == ""
    assert list(tmp_path.iterdir()) == []


def test_usage_error_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["featurize", "x.fits"], capsys)  # missing -o
    assert code == 2
    code, _, err = run_cli(["featurize", tmp_path, "-o", tmp_path / "f.h5", "--match-by", "nonsense",
                            "--labels", tmp_path / "c.csv"], capsys)
    assert code in (1, 2)


def test_unknown_format_lists_candidates(tmp_path, capsys):
    p = tmp_path / "junk.fits"
    p.write_bytes(b"this is not fits at all" * 10)
    code, _, err = run_cli(["featurize", p, "-o", tmp_path / "f.h5"], capsys)
    assert code == 1 and "unknown format" in err and "desi" in err


def test_truncated_fits_is_one_line(tmp_path, capsys, shared):
    src = (shared / "desi-edr" / "coadd-sv3-dark-26065.fits").read_bytes()
    p = tmp_path / "trunc.fits"
    p.write_bytes(src[: len(src) // 3])
    code, _, err = run_cli(["featurize", p, "-o", tmp_path / "f.h5"], capsys)
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.h5").exists()


def test_debug_shows_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STX_DEBUG", "1")
    code, _, err = run_cli(["featurize", tmp_path / "nope.fits", "-o", tmp_path / "f.h5"], capsys)
    assert code == 1 and "Traceback" in err


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("stx ")

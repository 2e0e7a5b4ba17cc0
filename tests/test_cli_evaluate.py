"""``stx evaluate`` end to end: a small FITS prediction catalog + CSV truth made in tmp_path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from stxcli.cli.main import main
from stxcli.metrics import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 300
LABELS = ("teff", "logg", "feh")
BASE_ID = 39627000000000000  # DESI-like 17-digit TARGETIDs: beyond float64's exact integers


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = {"teff": rng.uniform(4000, 7000, N), "logg": rng.uniform(1, 5, N), "feh": rng.uniform(-2.5, 0.5, N)}
    snr = rng.uniform(3, 150, N)
    d = {"id": BASE_ID + np.arange(N, dtype=np.int64) * 7, "snr": snr}
    for lab, s in zip(LABELS, (150.0, 0.3, 0.15)):
        err = s * 20 / snr
        d[f"true_{lab}"] = true[lab]
        d[f"crb_{lab}"] = err / 2
        d[lab] = true[lab] + err * rng.normal(size=N)
        d[f"{lab}_err"] = err
    return d


def write_pred(path: Path, d: dict[str, np.ndarray], extname: str | None = "PREDICTIONS",
               decoy_first: bool = False) -> None:
    cols = [fits.Column(name="id", format="K", array=d["id"]),
            fits.Column(name="survey", format="4A", array=np.full(N, "desi"))]
    for lab in LABELS:
        cols.append(fits.Column(name=lab, format="D", array=d[lab]))
        cols.append(fits.Column(name=f"{lab}_err", format="D", array=d[f"{lab}_err"]))
    cols.append(fits.Column(name="snr", format="D", array=d["snr"]))
    cols.append(fits.Column(name="flags", format="J", array=(np.arange(N) % 10 == 0).astype(np.int32)))
    hdus = [fits.PrimaryHDU()]
    if decoy_first:  # a table HDU before the catalogue: must be skipped when PREDICTIONS exists
        hdus.append(fits.BinTableHDU.from_columns([fits.Column(name="x", format="D", array=np.zeros(2))], name="OTHER"))
    hdus.append(fits.BinTableHDU.from_columns(cols, name=extname))
    fits.HDUList(hdus).writeto(path)


def write_truth_csv(path: Path, d: dict[str, np.ndarray], rows: np.ndarray, *, crb: bool = True,
                    labels=LABELS, id_name: str = "id", extra_rows: list[list[str]] = ()) -> None:
    header = [id_name] + list(labels) + ([f"{lab}_crb" for lab in labels] if crb else [])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i in rows:
            w.writerow([f" {d['id'][i]} "] + [repr(float(d[f"true_{lab}"][i])) for lab in labels]
                       + ([repr(float(d[f"crb_{lab}"][i])) for lab in labels] if crb else []))
        for r in extra_rows:
            w.writerow(r)


@pytest.fixture
def setup(tmp_path):
    d = _data()
    pred = tmp_path / "pred.fits"
    write_pred(pred, d, decoy_first=True)
    # the truth lacks the first 20 stars, is shuffled, and has 5 stars that were not predicted
    rows = np.random.default_rng(1).permutation(np.arange(20, N))
    extra = [[str(BASE_ID + 10**6 + k), "5000", "4", "0", "1", "1", "1"] for k in range(5)]
    truth = tmp_path / "truth.csv"
    write_truth_csv(truth, d, rows, extra_rows=extra)
    return d, pred, truth, tmp_path


def _expected(d, rows=slice(20, N), labels=LABELS, crb=True, snr=True):
    pred = {k: d[k][rows] for k in labels}
    pred.update({f"{k}_err": d[f"{k}_err"][rows] for k in labels})
    truth = {k: d[f"true_{k}"][rows] for k in labels}
    if crb:
        truth.update({f"{k}_crb": d[f"crb_{k}"][rows] for k in labels})
    return summarize(pred, truth, list(labels), d["snr"][rows] if snr else None)


def is_png(path: Path) -> bool:
    import matplotlib.image

    if path.read_bytes()[:8] != PNG_MAGIC:
        return False
    img = matplotlib.image.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_end_to_end_json(setup, capsys):
    d, pred, truth, tmp = setup
    out = tmp / "report"
    assert main(["evaluate", str(pred), str(truth), "-o", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed == report
    inp = report["inputs"]
    assert inp["n_predictions"] == N and inp["n_truth"] == N - 20 + 5
    assert inp["n_matched"] == N - 20 and inp["n_predictions_unmatched"] == 20
    assert inp["predictions_table"] == "HDU PREDICTIONS"
    assert inp["n_flagged"] == sum(1 for i in range(20, N) if i % 10 == 0)
    exp = _expected(d)
    for key in ("labels", "units", "n_stars", "overall", "feh_split", "snr_bins", "snr_edges"):
        assert report[key] == exp[key], key
    # the numbers are sane: calibrated errors, scatter twice the bound
    assert 0.6 < report["overall"]["feh"]["frac_1sigma"] < 0.77
    assert 1.6 < report["overall"]["teff"]["scatter_over_crb"] < 2.4
    assert report["units"] == {"teff": "K", "logg": "dex", "feh": "dex"}
    assert sorted(report["plots"]) == ["kiel.png", "one_to_one.png", "residual_vs_snr.png", "residual_vs_truth.png"]
    for name in report["plots"]:
        assert is_png(out / name), name
    assert sorted(p.name for p in out.iterdir()) == sorted(report["plots"] + ["report.json"])


def test_table_output_and_rerun_replaces_report(setup, capsys):
    d, pred, truth, tmp = setup
    out = tmp / "report"
    assert main(["evaluate", str(pred), str(truth), "-o", str(out), "--labels", "teff,feh",
                 "--snr-bins", "0,50,inf"]) == 0
    cap = capsys.readouterr()
    assert f"{N - 20} matched stars" in cap.out and "Teff K" in cap.out and "[Fe/H] dex" in cap.out
    assert "snr 50-inf" in cap.out and "log g" not in cap.out
    assert "report written to" in cap.err and "report written" not in cap.out
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == ["teff", "feh"] and [b["name"] for b in report["snr_bins"]] == ["0-50", "50-inf"]
    # a second run over the same report directory replaces it
    assert main(["evaluate", str(pred), str(truth), "-o", str(out), "--json"]) == 0
    assert json.loads((out / "report.json").read_text())["labels"] == list(LABELS)
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_fits_truth_first_table_hdu_and_other_id_column(tmp_path, capsys):
    d = _data(5)
    pred = tmp_path / "p.fits"
    write_pred(pred, d, extname=None)  # no PREDICTIONS extname: the first table HDU is used
    cols = [fits.Column(name="TARGETID", format="K", array=d["id"]),
            fits.Column(name="TEFF", format="D", array=d["true_teff"]),
            fits.Column(name="LOGG", format="D", array=d["true_logg"])]
    truth = tmp_path / "t.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(truth)
    out = tmp_path / "r"
    assert main(["evaluate", str(pred), str(truth), "--id-column", "TARGETID", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labels"] == ["teff", "logg"]          # the labels both tables have
    assert report["feh_split"] is None and any("no feh" in n for n in report["notes"])
    assert report["overall"]["teff"]["scatter_over_crb"] is None
    assert report["inputs"]["n_matched"] == N
    exp = _expected(d, slice(None), ("teff", "logg"), crb=False)
    assert report["overall"] == exp["overall"] and report["snr_bins"] == exp["snr_bins"]
    assert "kiel.png" in report["plots"]                  # pred has teff and logg


def test_without_snr(tmp_path, capsys):
    d = _data(2)
    cols = [fits.Column(name="id", format="K", array=d["id"]),
            fits.Column(name="feh", format="D", array=d["feh"]),
            fits.Column(name="feh_err", format="D", array=d["feh_err"])]
    pred = tmp_path / "p.fits"
    fits.BinTableHDU.from_columns(cols, name="PREDICTIONS").writeto(pred)
    truth = tmp_path / "t.csv"
    write_truth_csv(truth, d, np.arange(N), crb=False, labels=("feh",))
    out = tmp_path / "r"
    assert main(["evaluate", str(pred), str(truth), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["snr_bins"] is None
    assert report["plots"] == ["one_to_one.png", "residual_vs_truth.png"]
    assert report["feh_split"]["feh<-1"]["feh"]["n"] == int((d["true_feh"] < -1).sum())


def test_nan_predictions_are_left_out_and_counted(tmp_path, capsys):
    """Stars predict writes NaN for (spectra without data, NO_OVERLAP) are left out of every
    statistic, and the report says how many."""
    d = _data(3)
    dead = np.arange(0, N, 25)  # 12 stars
    for lab in LABELS:
        d[lab][dead] = np.nan
        d[f"{lab}_err"][dead] = np.nan
    write_pred(tmp_path / "p.fits", d)
    write_truth_csv(tmp_path / "t.csv", d, np.arange(N))
    assert main(["evaluate", str(tmp_path / "p.fits"), str(tmp_path / "t.csv"), "-o", str(tmp_path / "r"),
                 "--json", "--no-plots"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "12 matched star(s) have no prediction (NaN: a spectrum without data, flagged NO_OVERLAP), " \
           "left out of the statistics" in report["notes"]
    keep = np.setdiff1d(np.arange(N), dead)
    exp = _expected(d, rows=keep)
    for lab in LABELS:
        assert report["overall"][lab]["n"] == N - 12
        assert report["overall"][lab]["mae"] == pytest.approx(exp["overall"][lab]["mae"], rel=1e-9)


def _fails(argv, out: Path, capsys, code: int = 1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert not out.exists(), "nothing may be written on error"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err


def test_failure_truth_without_id_column(setup, capsys):
    d, pred, truth, tmp = setup
    out = tmp / "r"
    err = _fails(["evaluate", str(pred), str(truth), "--id-column", "obsid", "-o", str(out)], out, capsys)
    assert err.startswith("error:") and "obsid" in err and "\n" not in err


def test_failure_no_common_ids(setup, capsys):
    d, pred, _, tmp = setup
    d2 = dict(d, id=d["id"] + 1)
    truth = tmp / "other.csv"
    write_truth_csv(truth, d2, np.arange(N))
    out = tmp / "r"
    err = _fails(["evaluate", str(pred), str(truth), "-o", str(out)], out, capsys)
    assert "no common ids" in err and "\n" not in err


def test_failure_label_absent(setup, capsys):
    d, pred, truth, tmp = setup
    out = tmp / "r"
    err = _fails(["evaluate", str(pred), str(truth), "-o", str(out), "--labels", "teff,alpha_fe"], out, capsys)
    assert "alpha_fe" in err and "neither" in err and "\n" not in err
    t2 = tmp / "t2.csv"
    write_truth_csv(t2, d, np.arange(N), labels=("teff", "logg"))
    err = _fails(["evaluate", str(pred), str(t2), "-o", str(out), "--labels", "feh"], out, capsys)
    assert "'feh'" in err and "truth" in err


def test_failure_label_all_nan(setup, capsys):
    d, pred, _, tmp = setup
    d2 = dict(d, true_feh=np.full(N, np.nan))
    truth = tmp / "nan.csv"
    write_truth_csv(truth, d2, np.arange(N))
    out = tmp / "r"
    err = _fails(["evaluate", str(pred), str(truth), "-o", str(out)], out, capsys)
    assert "feh" in err and "all NaN" in err and "\n" not in err


def test_failure_duplicate_truth_ids(setup, capsys):
    d, pred, _, tmp = setup
    truth = tmp / "dup.csv"
    write_truth_csv(truth, d, np.r_[np.arange(N), [7]])
    out = tmp / "r"
    err = _fails(["evaluate", str(pred), str(truth), "-o", str(out)], out, capsys)
    assert "duplicate" in err and str(d["id"][7]) in err


def test_failure_bad_options_and_output(setup, capsys):
    d, pred, truth, tmp = setup
    out = tmp / "r"
    err = _fails(["evaluate", str(pred), str(truth), "-o", str(out), "--snr-bins", "10,5"], out, capsys, code=2)
    assert "--snr-bins" in err
    err = _fails(["evaluate", str(pred), str(tmp / "missing.csv"), "-o", str(out)], out, capsys)
    assert "no such file" in err
    busy = tmp / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep")
    assert main(["evaluate", str(pred), str(truth), "-o", str(busy)]) == 1
    assert "not an stx evaluate report" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["precious.txt"]


def test_real_lamost_catalog_as_truth(shared, tmp_path, capsys):
    """The real LAMOST DR10 label catalog (text columns, 9-digit obsids, no metal-poor star) as TRUTH."""
    cat = shared / "lamost-dr10-train" / "labels.csv"
    with open(cat, newline="") as fh:
        rows = list(csv.DictReader(fh))
    n = len(rows)
    teff = np.array([float(r["teff"]) for r in rows])
    feh = np.array([float(r["feh"]) for r in rows])
    cols = [fits.Column(name="id", format="12A", array=np.array([r["obsid"] for r in rows])),
            fits.Column(name="teff", format="D", array=teff + 50.0),                # +50 K for every star
            fits.Column(name="teff_err", format="D", array=np.full(n, 75.0)),        # inside 1 sigma
            fits.Column(name="feh", format="D", array=feh - 0.075 * (np.arange(n) % 2)),  # 0 / -0.075 dex
            fits.Column(name="feh_err", format="D", array=np.full(n, 0.05))]        # 0 and 1.5 sigma
    pred = tmp_path / "pred.fits"
    fits.BinTableHDU.from_columns(cols, name="PREDICTIONS").writeto(pred)
    out = tmp_path / "r"
    assert main(["evaluate", str(pred), str(cat), "--id-column", "obsid", "--snr-column", "snrg",
                 "--snr-bins", "0,40,inf", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["inputs"]["n_matched"] == n == 1037
    t = rep["overall"]["teff"]
    assert t["mae"] == pytest.approx(50.0) and t["bias"] == pytest.approx(50.0) and t["scatter"] == pytest.approx(0.0, abs=1e-9)
    assert t["frac_1sigma"] == 1.0 and t["frac_2sigma"] == 1.0
    f = rep["overall"]["feh"]
    assert f["mae"] == pytest.approx(0.075 * (n // 2) / n)
    assert f["bias"] == pytest.approx(0.0)  # 519 zeros, 518 x -0.075: the median is 0
    # |residual| = 0 for the even rows (within 1 sigma), 1.5 sigma for the odd rows (within 2 only)
    assert f["frac_1sigma"] == pytest.approx((n - n // 2) / n) and f["frac_2sigma"] == 1.0
    # this catalogue has no star below [Fe/H] = -1: the metal-poor subset is empty, not an error
    assert rep["feh_split"]["feh<-1"]["teff"]["n"] == 0 and rep["feh_split"]["feh<-1"]["teff"]["mae"] is None
    assert rep["feh_split"]["feh>=-1"]["teff"]["n"] == n
    snrg = np.array([float(r["snrg"]) for r in rows])
    assert [b["n"] for b in rep["snr_bins"]] == [int((snrg < 40).sum()), int((snrg >= 40).sum())]
    assert rep["inputs"]["snr_source"] == "truth column 'snrg'"


def test_no_plots_writes_report_only(setup, capsys):
    d, pred, truth, tmp = setup
    out = tmp / "rep"
    assert main(["evaluate", str(pred), str(truth), "-o", str(out), "--no-plots", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert printed["plots"] == [] and printed["overall"] == json.loads((out / "report.json").read_text())["overall"]

"""The accuracy benchmarks' helpers (benchmarks/_acc.py) and the committed result files.

The benchmarks themselves are opt-in (minutes to tens of minutes); here: the metric extraction,
the MAE ratios and the k-fold catalog stacking by hand, and that every committed result JSON has
the form the scripts write, with ratios that follow from its own MAEs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _acc  # noqa: E402


def _report(mae: float, feh_mp: float | None = None) -> dict:
    m = {"n": 10, "mae": mae, "bias": 0.0, "scatter": mae, "frac_1sigma": 0.7, "frac_2sigma": 0.95}
    split = {"feh<-1": {lab: ({**m, "mae": feh_mp} if feh_mp else {"n": 0}) for lab in _acc.LABELS},
             "feh>=-1": {lab: m for lab in _acc.LABELS}}
    return {"n_stars": 10, "overall": {lab: m for lab in _acc.LABELS}, "feh_split": split,
            "snr_bins": [{"name": "0-10", "lo": 0, "hi": 10, "n": 10, "metrics": {lab: m for lab in _acc.LABELS}}]}


def test_metrics_picks_subsets_and_drops_empty() -> None:
    out = _acc.metrics(_report(2.0))
    assert out["teff"]["all"]["mae"] == 2.0
    assert out["teff"]["feh<-1"] is None  # n = 0: no metrics, not zeros
    assert out["feh"]["snr_bins"]["0-10"]["frac_1sigma"] == 0.7
    assert "median_crb" not in out["logg"]["all"]  # absent keys are not invented


def test_ratios_to_zero_shot_and_ridge_by_hand() -> None:
    rows = [{"n_ft": 0, "strategy": "zero-shot", "metrics": _acc.metrics(_report(4.0, 8.0))},
            {"n_ft": 100, "strategy": "ridge", "metrics": _acc.metrics(_report(2.0, 5.0))},
            {"n_ft": 100, "strategy": "lora", "metrics": _acc.metrics(_report(1.0, 2.0))}]
    _acc.add_ratios(rows, ["n_ft"])
    lora = rows[2]["mae_ratio"]
    assert lora["to_zero-shot"]["teff"]["all"] == 0.25
    assert lora["to_zero-shot"]["feh"]["feh<-1"] == 0.25
    assert lora["to_ridge"]["logg"]["all"] == 0.5
    assert lora["to_ridge"]["logg"]["feh<-1"] == 0.4
    assert "to_ridge" not in rows[1]["mae_ratio"]  # no ratio of a baseline to itself


def test_stack_catalogs_keeps_every_row(tmp_path: Path) -> None:
    from astropy.io import fits
    from astropy.table import Table

    paths = []
    for k in range(3):
        t = Table({"id": np.arange(4) + 10 * k, "teff": np.full(4, 5000.0 + k), "teff_err": np.ones(4)})
        p = tmp_path / f"p{k}.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(t, name="PREDICTIONS")]).writeto(p)
        paths.append(p)
    out = _acc.stack_catalogs(paths, tmp_path / "all.fits")
    t = Table.read(out, hdu="PREDICTIONS")
    assert list(t["id"]) == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    assert t["teff"][-1] == 5002.0


RESULTS = sorted(p for p in (BENCH / "results").glob("*.json")
                 if p.name.split("-quick")[0].removesuffix(".json") in ("accuracy", "real"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_have_the_written_form(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == path.stem and doc["machine"]["cores"] >= 1 and doc["command"]
    strategies = {r["strategy"] for r in doc["rows"]}
    assert {"zero-shot", "ridge", "scratch-mlp"} <= strategies
    for r in doc["rows"]:
        for lab in _acc.LABELS:
            a = r["metrics"][lab]["all"]
            assert a["n"] > 0 and a["mae"] > 0 and 0 <= a["frac_1sigma"] <= a["frac_2sigma"] <= 1
        # every ratio follows from the MAEs in the same file
        for ref_key, ratios in r.get("mae_ratio", {}).items():
            ref = ref_key.removeprefix("to_")
            cands = [x for x in doc["rows"] if x["strategy"] == ref and (
                x.get("base") == r.get("base") if ref == "zero-shot" else x["n_ft"] == r["n_ft"])]
            if ref == "zero-shot" and "base" not in r:
                cands = [x for x in doc["rows"] if x["strategy"] == ref]
            for lab in _acc.LABELS:
                want = _acc.mae(r, lab) / _acc.mae(cands[0], lab)
                assert ratios[lab]["all"] == pytest.approx(want, abs=1e-3)
    if path.stem.startswith("accuracy"):
        assert doc["checks"]["n_target_for_check"] in doc["sizes"]["n_finetune"]
    else:
        assert set(doc["sim_to_real_source"]["metrics"]) >= set(_acc.LABELS)


def test_results_page_is_rendered_from_the_committed_jsons() -> None:
    """docs/results.md's tables are what benchmarks/render_results.py makes of the committed
    result JSONs: a JSON rerun without re-rendering the page fails here."""
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "render_results.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr

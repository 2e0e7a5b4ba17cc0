"""stxcli.metrics against values computed by hand, and calibration on large Gaussian samples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stxcli import metrics
from stxcli.metrics import (label_metrics, mae, bias, parse_snr_edges, robust_scatter, summarize,
                            within_sigma)


def test_hand_computed_residuals():
    res = np.array([1.0, -2.0, 3.0, 0.0, 10.0])
    assert mae(res) == pytest.approx(3.2)          # (1+2+3+0+10)/5
    assert bias(res) == pytest.approx(1.0)         # median of -2,0,1,3,10
    # |r - 1| = 0,3,2,1,9 -> median 2 -> 1.4826 * 2
    assert robust_scatter(res) == pytest.approx(2.9652)
    truth = np.array([5.0, 5.0, 5.0, 5.0, 5.0])
    m = label_metrics(truth + res, truth)
    assert m["n"] == 5 and m["mae"] == pytest.approx(3.2) and m["bias"] == pytest.approx(1.0)
    assert m["scatter"] == pytest.approx(2.9652)
    assert m["frac_1sigma"] is None and m["n_sigma"] == 0 and m["scatter_over_crb"] is None


def test_even_count_median_and_nan_rows_dropped():
    # residuals 4, -1, 2, 1 (the NaN rows do not count): median (1+2)/2 = 1.5; |r-1.5| = 2.5,2.5,0.5,0.5
    pred = np.array([4.0, -1.0, np.nan, 2.0, 1.0, 3.0])
    true = np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.nan])
    m = label_metrics(pred, true)
    assert m["n"] == 4
    assert m["mae"] == pytest.approx(2.0)
    assert m["bias"] == pytest.approx(1.5)
    assert m["scatter"] == pytest.approx(1.4826 * 1.5)


def test_within_sigma_by_hand():
    res = np.array([0.5, -1.5, 2.5, 0.0, 1.0])
    sig = np.array([1.0, 1.0, 1.0, np.nan, 1.0])   # the NaN-sigma row does not count
    assert within_sigma(res, sig, 1.0) == pytest.approx(1 / 4)   # 0.5 only; |1.0| < 1 is false
    assert within_sigma(res, sig, 2.0) == pytest.approx(3 / 4)   # 0.5, -1.5, 1.0
    assert math.isnan(within_sigma(res, np.zeros(5), 1.0))      # sigma <= 0 never counts
    m = label_metrics(res, np.zeros(5), err=sig)
    assert m["n_sigma"] == 4 and m["frac_1sigma"] == pytest.approx(0.25) and m["frac_2sigma"] == pytest.approx(0.75)


def test_empty_subset_gives_none():
    m = label_metrics(np.array([np.nan]), np.array([1.0]), err=np.array([1.0]), crb=np.array([1.0]))
    assert m == {"n": 0, "mae": None, "bias": None, "scatter": None, "n_sigma": 0, "frac_1sigma": None,
                 "frac_2sigma": None, "median_crb": None, "scatter_over_crb": None}


def test_calibration_on_large_gaussian_sample():
    rng = np.random.default_rng(42)
    n = 200_000
    sigma = rng.uniform(0.5, 3.0, n)                  # heteroscedastic: per-star sigma
    res = rng.normal(0.0, 1.0, n) * sigma
    m = label_metrics(res, np.zeros(n), err=sigma)
    # binomial standard error ~0.001: 4 sigma tolerance
    assert m["frac_1sigma"] == pytest.approx(0.6827, abs=0.004)
    assert m["frac_2sigma"] == pytest.approx(0.9545, abs=0.003)
    # claimed errors twice too small: P(|z| < 0.5) = 0.3829, P(|z| < 1) = 0.6827
    m2 = label_metrics(res, np.zeros(n), err=sigma / 2)
    assert m2["frac_1sigma"] == pytest.approx(0.3829, abs=0.004)
    assert m2["frac_2sigma"] == pytest.approx(0.6827, abs=0.004)
    # robust scatter of a homoscedastic Gaussian is its sigma
    assert robust_scatter(rng.normal(0.3, 2.0, n)) == pytest.approx(2.0, rel=0.01)


def test_crb_ratio():
    rng = np.random.default_rng(3)
    n = 100_000
    crb = rng.uniform(0.05, 0.5, n)
    res = 2.0 * crb * rng.normal(size=n)              # twice the bound, star by star
    m = label_metrics(res, np.zeros(n), crb=crb)
    assert m["scatter_over_crb"] == pytest.approx(2.0, rel=0.02)
    assert m["median_crb"] == pytest.approx(np.median(crb))
    m = label_metrics(np.array([1.0, 2.0, 3.0]), np.zeros(3), crb=np.array([1.0, np.nan, 3.0]))
    assert m["median_crb"] == pytest.approx(2.0)      # bad bounds are skipped
    assert m["scatter_over_crb"] == pytest.approx(0.0)  # residual/crb = 1, 1


def _toy():
    # four stars; the split must use the TRUE [Fe/H]: predictions all say 0
    truth = {"teff": np.array([5000.0, 5000.0, 5000.0, 5000.0]),
             "feh": np.array([-2.0, -1.5, -1.0, 0.0])}
    pred = {"teff": np.array([5100.0, 4900.0, 5030.0, 5010.0]), "teff_err": np.array([50.0, 150.0, 40.0, 5.0]),
            "feh": np.zeros(4), "feh_err": np.full(4, 0.1)}
    return pred, truth


def test_summarize_feh_split_uses_truth():
    pred, truth = _toy()
    s = summarize(pred, truth, ["teff", "feh"])
    assert s["n_stars"] == 4 and s["units"] == {"teff": "K", "feh": "dex"}
    poor, rich = s["feh_split"]["feh<-1"], s["feh_split"]["feh>=-1"]
    assert poor["teff"]["n"] == 2 and rich["teff"]["n"] == 2       # -1.0 goes to the >= -1 side
    assert poor["teff"]["mae"] == pytest.approx(100.0)               # +100, -100
    assert poor["teff"]["bias"] == pytest.approx(0.0)
    assert rich["teff"]["mae"] == pytest.approx(20.0)                # +30, +10
    assert rich["teff"]["frac_1sigma"] == pytest.approx(0.5)         # 30 < 40; 10 > 5
    assert poor["feh"]["bias"] == pytest.approx(1.75)                # residuals 2.0, 1.5
    assert s["overall"]["teff"]["mae"] == pytest.approx(60.0)
    assert s["snr_bins"] is None and any("SNR" in n for n in s["notes"])
    json.dumps(s, allow_nan=False)  # JSON-safe as is


def test_summarize_without_feh_truth_reports_overall_only():
    pred, truth = _toy()
    del truth["feh"]
    s = summarize(pred, truth, ["teff"])
    assert s["feh_split"] is None
    assert any("no feh" in n for n in s["notes"])
    assert s["overall"]["teff"]["n"] == 4


def test_summarize_snr_bins():
    pred, truth = _toy()
    snr = np.array([5.0, 10.0, 100.0, np.nan])       # 10 belongs to [10, 20)
    s = summarize(pred, truth, ["teff"], snr)
    assert [b["name"] for b in s["snr_bins"]] == ["0-10", "10-20", "20-40", "40-80", "80-inf"]
    assert [b["n"] for b in s["snr_bins"]] == [1, 1, 0, 0, 1]
    assert s["snr_bins"][0]["metrics"]["teff"]["bias"] == pytest.approx(100.0)
    assert s["snr_bins"][1]["metrics"]["teff"]["bias"] == pytest.approx(-100.0)
    assert s["snr_bins"][2]["metrics"]["teff"]["mae"] is None
    assert s["snr_bins"][-1]["hi"] is None and s["snr_edges"][-1] is None
    assert any("1 stars have an SNR outside" in n for n in s["notes"])
    s = summarize(pred, truth, ["teff"], snr, snr_edges=(0, 50, 200))
    assert [b["n"] for b in s["snr_bins"]] == [2, 1]
    json.dumps(s, allow_nan=False)


def test_summarize_rejects_bad_input():
    pred, truth = _toy()
    with pytest.raises(KeyError):
        summarize(pred, truth, ["logg"])
    with pytest.raises(ValueError):
        summarize({"teff": np.zeros(3)}, truth, ["teff"])
    with pytest.raises(ValueError):
        summarize(pred, truth, ["teff"], snr_edges=(10, 5))


def test_parse_snr_edges():
    assert parse_snr_edges("0,10, 20,inf") == (0.0, 10.0, 20.0, math.inf)
    for bad in ("10,5", "5", "a,b", "0,nan,3"):
        with pytest.raises(ValueError):
            parse_snr_edges(bad)


def test_units_and_names():
    assert metrics.unit("teff") == "K" and metrics.unit("alpha_fe") == ""
    assert metrics.display_name("feh") == "[Fe/H]" and metrics.display_name("alpha_fe") == "alpha_fe"

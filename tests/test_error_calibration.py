"""Calibrated uncertainties: each label's errors are scaled on the validation stars so that
68.27 % of their residuals fall within 1 sigma; the factor is stored and applied by predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from _models_util import write_synth

torch.set_num_threads(1)


def _specs():
    from stxcli.model import LabelSpec

    return [LabelSpec("logg", "dex", "identity", 0.0, 1.0, -1, 6),
            LabelSpec("teff", "K", "log10", 3.7, 0.1, 3000, 9000)]


def test_factor_is_the_68th_percentile_of_normalised_residuals_by_hand():
    from stxcli.train import ONE_SIGMA, PredStats, error_calibration

    n = 101
    ratio = np.linspace(0.0, 3.0, n)  # |residual| / error, exactly these values
    var = np.full((n, 2), 0.04)  # sigma 0.2 in standardised units
    y = np.zeros((n, 2))
    mean = np.stack([ratio * 0.2 * np.where(np.arange(n) % 2, 1, -1), np.zeros(n)], 1)
    y[:, 1] = np.nan  # no truth for teff
    y[:5, 1] = 0.0
    cal = error_calibration(_specs(), PredStats(0.0, mean, var, y))
    g = cal["labels"]["logg"]
    want = np.quantile(ratio, ONE_SIGMA)  # linear interpolation: 3 * 0.682689... = 2.048
    assert g["factor"] == pytest.approx(want, rel=1e-9) and want == pytest.approx(3 * ONE_SIGMA, rel=1e-9)
    assert g["n"] == n and g["frac_1sigma_before"] == pytest.approx(34 / 101)  # ratios 0, 0.03, ..., 0.99
    assert g["frac_1sigma_after"] == pytest.approx(69 / 101)
    t = cal["labels"]["teff"]  # 5 stars with truth: too few, left alone and said so
    assert t["factor"] == 1.0 and t["n"] == 5 and "not calibrated" in t["note"]
    off = error_calibration(_specs(), PredStats(0.0, mean, var, y), enabled=False)
    assert off["labels"]["logg"]["factor"] == 1.0 and off["method"] == "off"


def test_pretrain_and_finetune_store_factors_and_predict_applies_them(tmp_path, capsys):
    from stxcli.model import load_model
    from stxcli.store import FeatureStore

    write_synth(tmp_path / "src.h5", 400, noise=0.05)
    write_synth(tmp_path / "tgt.h5", 200, seed=4, shift=0.01, feh_offset=0.3, noise=0.05)
    write_synth(tmp_path / "test.h5", 600, seed=9, shift=0.01, feh_offset=0.3, noise=0.05)
    for args in (["pretrain", tmp_path / "src.h5", "-o", tmp_path / "base"],
                 ["pretrain", tmp_path / "src.h5", "-o", tmp_path / "raw", "--no-calibrate-errors"]):
        code, out, err = run_cli([*args, "--set", "hidden=16,16", "--epochs", "40", "--threads", "1", "--json"],
                                 capsys)
        assert code == 0, err
    man = json.loads((tmp_path / "base" / "manifest.json").read_text())
    cal = man["error_calibration"]["labels"]
    assert set(cal) == {"teff", "logg", "feh"} and all(c["n"] == 80 for c in cal.values())
    raw = json.loads((tmp_path / "raw" / "manifest.json").read_text())["error_calibration"]
    assert raw["method"] == "off" and all(c["factor"] == 1.0 for c in raw["labels"].values())
    # same seed, same network: the calibrated model's errors are the raw ones times the factors
    with FeatureStore.open(tmp_path / "test.h5") as st:
        x = st.read()["features"]
    a, b = load_model(tmp_path / "base").predict(x), load_model(tmp_path / "raw").predict(x)
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-6)
    factors = np.array([cal[k]["factor"] for k in ("teff", "logg", "feh")])
    np.testing.assert_allclose(a["err"], b["err"] * factors, rtol=1e-6)
    # fine-tuned: factors from the adapter's own validation stars, applied the same way
    code, out, err = run_cli(["finetune", tmp_path / "base", tmp_path / "tgt.h5", "--adapter", "auto",
                              "-o", tmp_path / "ft", "--epochs", "30", "--threads", "1", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    fman = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    fcal = fman["error_calibration"]["labels"]
    choice = fman["adapter"]["selection"]
    assert summary["error_factors"] == {k: round(v["factor"], 4) for k, v in fcal.items()}
    for lab, entry in fcal.items():  # each label calibrated on the candidate that predicts it
        assert entry["n"] == 40
        cand = fman["validation"][f"candidate:{choice[lab]}"]["labels"][lab]
        assert cand["n"] == 40
    ft = load_model(tmp_path / "ft")
    np.testing.assert_allclose(ft.err_scale, [fcal[k]["factor"] for k in ("teff", "logg", "feh")])

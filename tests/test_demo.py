"""`stx demo --quick`: the README's third command, end to end (CI runs it)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from stx_builtin.demo import LABELS, STRATEGIES


def test_quick_demo(tmp_path):
    work = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "stxcli", "demo", "--quick", "--workdir", str(work)],
                         capture_output=True, text=True, env={**__import__("os").environ, "STX_LOAD_PLUGINS": "stx"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "desi-sim: teff" in res.stdout and "miles-desi: feh" in res.stdout
    result = json.loads((work / "demo.json").read_text())
    assert (work / "demo_mae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = result["rows"]
    for block in ("desi-sim", "miles-desi"):
        for feat in ("raw", "transformer"):
            got = [r["strategy"] for r in rows if r["block"] == block and r["features"] == feat]
            assert got == list(STRATEGIES)
    for r in rows:
        if r["strategy"] == "zero-shot":
            assert r["n_target"] == 0 and r["trainable"] == 0
        else:
            assert r["n_target"] > 0 and r["trainable"] > 0
        for lab in LABELS:
            m = r["metrics"][lab]["all"]
            assert m["n"] > 0 and np.isfinite(m["mae"]) and np.isfinite(m["scatter"])
    # the pre-trained raw MLP has learnt something: zero-shot Teff well inside the prior's spread
    zs = next(r for r in rows if r["block"] == "desi-sim" and r["features"] == "raw" and r["strategy"] == "zero-shot")
    assert zs["metrics"]["teff"]["all"]["mae"] < 600
    # the zero-shot and auto reports carry plots, the others report.json only
    assert (work / "models" / "desi-sim" / "raw" / "report-auto" / "report.json").exists()
    assert any((work / "models" / "desi-sim" / "raw" / "report-auto").glob("*.png"))

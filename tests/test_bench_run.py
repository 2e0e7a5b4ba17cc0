"""benchmarks/run.py: one failing benchmark does not stop the others, and the rendered page's
figure tables say what the JSON says (the benchmarks themselves are opt-in and never run here)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import _common  # noqa: E402
import run as bench_run  # noqa: E402


def _script(folder, name, body):
    (folder / f"bench_{name}.py").write_text(body)


def test_a_failing_benchmark_is_reported_and_the_rest_still_run(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    _script(scripts, "a_crash", "raise RuntimeError('boom')\n")
    _script(scripts, "b_exit3", "import sys; sys.exit(3)\n")
    _script(scripts, "c_ok", "import sys, pathlib; pathlib.Path('ran.txt').write_text(' '.join(sys.argv[1:]))\n")
    _script(scripts, "d_slow", "import time; time.sleep(30)\n")
    todo = bench_run.scripts(scripts)
    assert list(todo) == ["a_crash", "b_exit3", "c_ok", "d_slow"]
    lines: list[str] = []
    out = bench_run.run_all(todo, quick=True, workdir=tmp_path / "work", timeout=3, out=lines.append)
    assert out["a_crash"]["exit"] == 1 and out["b_exit3"]["exit"] == 3
    assert out["c_ok"]["exit"] == 0 and "error" not in out["c_ok"]
    assert out["d_slow"]["exit"] is None and "timed out" in out["d_slow"]["error"]
    # the benchmark after two failures ran, in the work directory, with --quick
    assert (tmp_path / "work" / "ran.txt").read_text() == "--quick"
    assert any("b_exit3: FAILED (exit status 3)" in ln for ln in lines)


def test_main_exits_nonzero_when_one_benchmark_fails(tmp_path, monkeypatch):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    _script(scripts, "bad", "import sys; sys.exit(2)\n")
    _script(scripts, "good", "pass\n")
    monkeypatch.setattr(bench_run, "HERE", scripts)
    rendered = []
    monkeypatch.setattr(bench_run, "render", lambda *a, **k: rendered.append(True))
    assert bench_run.main(["--only", "bad,good", "--workdir", str(tmp_path / "w")]) == 1
    assert bench_run.main(["--only", "good", "--workdir", str(tmp_path / "w")]) == 0
    assert rendered == [True, True]
    with pytest.raises(SystemExit):
        bench_run.main(["--only", "nosuch", "--workdir", str(tmp_path / "w")])


def test_quick_runs_write_quick_result_names():
    assert _common.quick_name("encoder", ["--quick"]) == "encoder-quick"
    assert _common.quick_name("accuracy-quick", ["--quick"]) == "accuracy-quick"
    assert _common.quick_name("encoder", ["--n", "5"]) == "encoder"


FEATURIZE = {
    "benchmark": "featurize", "machine": {"cpu": "Test CPU", "cores": 2, "date": "2026-01-02"},
    "n_spectra_read": 500,
    "read": {"specutils_s": 0.3, "stx_s": 0.1, "speedup": 3.0, "target": 2.5},
    "read_and_featurize": {"stx_s": 0.6, "ratio_to_specutils_read": 2.0, "target": "< 1"},
    "peak_memory_mb": {"specutils_read": 600.0, "stx_featurize": 240.0, "imports_only_baseline": 60.0,
                       "ratio": 0.4, "target": "< 0.5"},
}


def _memory_json():
    def run(n, peaks):
        return {"n_spectra": n, "data_mb": {"coadd_files": n * 0.45, "features_and_ivar_float32": n * 0.028},
                **{c: {"peak_mb": p} for c, p in zip(("featurize", "predict_store", "predict_files"), peaks)}}
    lo, hi = run(10000, (300.0, 400.0, 800.0)), run(100000, (330.0, 410.0, 1200.0))
    flat = {c: {"ratio_largest_over_smallest": hi[c]["peak_mb"] / lo[c]["peak_mb"], "target_max_ratio": 1.25}
            for c in ("featurize", "predict_store", "predict_files")}
    return {"benchmark": "memory", "machine": {"cpu": "Test CPU", "cores": 2, "date": "2026-01-03"},
            "runs": [lo, hi], "flat": flat}


def test_rendered_tables_follow_the_json(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "featurize.json").write_text(json.dumps(FEATURIZE))
    (res / "memory.json").write_text(json.dumps(_memory_json()))
    (res / "featurize-quick.json").write_text(json.dumps({**FEATURIZE, "benchmark": "featurize-quick",
                                                          "read": {**FEATURIZE["read"], "speedup": 1.5}}))
    doc = bench_run.render(res, tmp_path / "benchmarks.md", tmp_path / "img")
    text = doc.read_text()
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.startswith("| read a 500-spectrum DESI coadd"))
    assert "3.00x faster" in row and row.endswith("| yes |")
    row = next(ln for ln in lines if ln.startswith("| read + raw featurize"))
    assert "2.00x the time" in row and row.endswith("| **no** |")
    row = next(ln for ln in lines if ln.startswith("| peak memory, stx predict from the coadd files"))
    assert "1200 MB at 100,000 spectra" in row and "1.50x" in row and row.endswith("| **no** |")
    row = next(ln for ln in lines if ln.startswith("| peak memory, stx featurize"))
    assert "1.10x" in row and row.endswith("| yes |")
    # the glance table takes the full run, not the quick one, when both exist
    glance = text.split("## Targets at a glance")[1].split("\n## ")[0]
    assert "3.00x faster" in glance and "1.50x faster" not in glance
    assert "1.50x faster" in text.split("## featurize-quick")[1]
    assert "Test CPU, 2 cores, 2026-01-02" in text
    assert text.index("## featurize\n") < text.index("## featurize-quick") < text.index("## memory")
    assert (tmp_path / "img" / "bench_memory.png").stat().st_size > 1000
    assert "![peak memory at each input size](img/bench_memory.png)" in text
    assert "| read.speedup | 3 |" in text  # the full dump is kept


def test_accuracy_rows_pick_the_best_finetuned_model():
    def row(n, strategy, maes):
        return {"n_ft": n, "strategy": strategy,
                "metrics": {lab: {"all": {"mae": v}} for lab, v in maes.items()}}
    data = {"checks": {"n_target_for_check": 300, "all_finetuned_beat_zero_shot": False},
            "rows": [row(0, "zero-shot", {"teff": 200.0}), row(100, "lora", {"teff": 150.0}),
                     row(300, "lora", {"teff": 120.0}), row(300, "full", {"teff": 100.0}),
                     row(300, "ridge", {"teff": 90.0}), row(300, "scratch-mlp", {"teff": 80.0})]}
    rows = bench_run.rows_accuracy(data)
    assert rows[0].met is False
    teff = rows[1]
    assert teff.figure == "teff MAE, best fine-tuned (full), 300 stars"
    assert teff.measured == "100" and "0.50x zero-shot" in teff.ratio and "1.11x ridge" in teff.ratio
    assert teff.met is False  # beats zero-shot but not ridge


def test_glance_adds_the_quick_runs_missing_figures_and_flags_a_loaded_machine(tmp_path):
    pre = {"stx_epoch_s": 1.2, "bare_epoch_s": 1.0, "ratio_stx_over_bare": 1.2, "target_max_ratio": 1.25}
    full = {"benchmark": "models", "machine": {"cores": 2}, "n_train": 80000, "dim": 3500, "pretrain": pre}
    ft = {"n_train": 1600, "trainable_params": 10, "stx_epoch_spectra_per_s": 900.0, "bare_spectra_per_s": 1000.0,
          "ratio_stx_epoch_over_bare": 1.111, "target_max_ratio": 1.25}
    quick = {"benchmark": "models-quick", "machine": {"cores": 2}, "n_train": 16000, "dim": 3500,
             "pretrain": {**pre, "ratio_stx_over_bare": 2.0}, "finetune": {"lora": ft}, "load_at_end": 5.04}
    rows = bench_run.glance({"models": full, "models-quick": quick})
    assert [(s, r.figure.split(",")[0]) for s, r, _ in rows] == [("models", "pretrain epoch"),
                                                                  ("models-quick", "fine-tune epoch")]
    assert rows[0][2] is None and rows[1][2] == 5.04
    res = tmp_path / "results"
    res.mkdir()
    (res / "models.json").write_text(json.dumps(full))
    (res / "models-quick.json").write_text(json.dumps(quick))
    text = bench_run.render(res, tmp_path / "b.md", tmp_path / "img").read_text()
    assert "1.11x the time | <= 1.25x (pretrain's) | yes (load 5.0) |" in text
    assert "load average reached 5.0 on 2 cores" in text.split("## models-quick")[1]


def test_committed_benchmark_page_is_the_rendering_of_the_results():
    """docs/benchmarks.md is generated: after a new result JSON, run
    ``python benchmarks/run.py --render-only``."""
    assert bench_run.main(["--check"]) == 0


def test_check_fails_when_a_result_changed(tmp_path):
    import shutil

    res = tmp_path / "results"
    shutil.copytree(bench_run.RESULTS, res)
    data = json.loads((res / "memory.json").read_text())
    data["flat"]["featurize"]["ratio_largest_over_smallest"] = 9.0
    (res / "memory.json").write_text(json.dumps(data))
    assert bench_run.main(["--check", "--results", str(res)]) == 1

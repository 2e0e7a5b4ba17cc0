"""Run the benchmark suite and render docs/benchmarks.md from the results.

    python benchmarks/run.py [--quick] [--only featurize,models,...] [--render-only]

Each benchmark is one script, benchmarks/bench_NAME.py, run in its own process; it measures its
baseline in the same run, prints ratios and writes benchmarks/results/NAME[-quick].json with the
machine it ran on. This script then writes docs/benchmarks.md from every JSON in
benchmarks/results/. Benchmarks are opt-in: the test suite never runs them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"
ORDER = ["featurize", "simulate", "models", "encoder", "distributed", "encoder_accuracy", "accuracy", "real"]


def scripts() -> dict[str, Path]:
    found = {p.stem[len("bench_"):]: p for p in sorted(HERE.glob("bench_*.py"))}
    return dict(sorted(found.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            if k in ("machine", "benchmark"):
                continue
            rows.extend(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, (int, float, str, type(None))) for x in d):
        rows.append((prefix.rstrip("."), ", ".join(map(_fmt, d))))
    elif isinstance(d, list):
        for i, v in enumerate(d[:40]):
            rows.extend(_flatten(v, f"{prefix}{i}."))
    else:
        rows.append((prefix.rstrip("."), _fmt(d)))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render() -> None:
    lines = ["# Benchmark results", "",
             "Measured by `python benchmarks/run.py` (each `benchmarks/bench_*.py` can also run alone);",
             "every figure is compared with a baseline measured in the same run. Raw JSON:",
             "`benchmarks/results/`. Machine and date are given per benchmark; the development machine",
             "has 2 CPU cores and was shared with other jobs while some of these ran, so absolute",
             "times are pessimistic: read the ratios. Accuracy results and what they mean:",
             "[results.md](results.md).", ""]
    for path in sorted((HERE / "results").glob("*.json")):
        data = json.loads(path.read_text())
        m = data.get("machine", {})
        lines += [f"## {path.stem}", "",
                  f"`{path.relative_to(HERE.parent)}`: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
                  f"{m.get('date', '?')}", "", "| figure | value |", "|---|---|"]
        for key, value in _flatten(data)[:120]:
            lines.append(f"| {key} | {value} |")
        lines.append("")
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs for every benchmark")
    ap.add_argument("--only", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--render-only", action="store_true", help="only rewrite docs/benchmarks.md")
    args = ap.parse_args()
    if not args.render_only:
        todo = scripts()
        if args.only:
            names = [n.strip() for n in args.only.split(",")]
            unknown = [n for n in names if n not in todo]
            if unknown:
                sys.exit(f"unknown benchmark(s): {', '.join(unknown)} (have: {', '.join(todo)})")
            todo = {n: todo[n] for n in names}
        failed = []
        for name, script in todo.items():
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, str(script), *(["--quick"] if args.quick else [])])
            print(f"== {name}: exit {res.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
            if res.returncode != 0:
                failed.append(name)
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
    render()


if __name__ == "__main__":
    main()

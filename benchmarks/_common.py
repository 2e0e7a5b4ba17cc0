"""Shared helpers for the opt-in benchmarks: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mb(code: str) -> float:
    """Peak resident memory (MB) of a fresh Python process running ``code``."""
    # VmHWM is this process's own high-water mark; ru_maxrss would carry over the parent's
    # (the benchmark's) peak across fork + exec on Linux.
    probe = (code + "\nfor line in open('/proc/self/status'):\n"
             "    if line.startswith('VmHWM'): print('PEAK', int(line.split()[1]) / 1024.0)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PEAK")][-1]
    return float(line.split()[1])


def write(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path

"""Render the tables of docs/results.md from benchmarks/results/accuracy.json and real.json.

    python benchmarks/render_results.py [--doc docs/results.md] [--accuracy JSON] [--real JSON] [--check]

docs/results.md holds hand-written prose and, between marker comments

    <!-- render:NAME -->
    ...generated...
    <!-- /render:NAME -->

blocks that this script regenerates from the result files (setup and machine, the metric tables,
MAE ratios, learning curves, checks, per-SNR tables, fold spread, timings). Everything outside the
blocks is left as it is. ``--check`` rewrites nothing and exits 1 when a block differs from what
the JSONs give (the page is stale).

The prose "Reading" sections quote numbers of one run. Each is announced by a comment

    <!-- reading:accuracy n_pretrain=5000 n_finetune=100,300,1000 n_test=2000 date=2026-11-25 -->

naming the run it was written for, and followed by a ``render:reading-accuracy`` block: empty
while the JSON is that run, a visible warning when the JSON comes from another run (so new tables
under an old reading are flagged on the page until someone re-reads them and updates the comment).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _acc  # noqa: E402
from _acc import LABELS  # noqa: E402

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "results.md"
BLOCK = re.compile(r"(<!-- render:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /render:(?P=name) -->)", re.S)
READING = re.compile(r"<!-- reading:(?P<bench>\w+) (?P<attrs>[^>]*?) -->")
UNITS = {"teff": "K", "logg": "dex", "feh": "dex"}


# ---------------------------------------------------------------------------------- helpers

def _machine(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    acc = doc.get("accelerator") or {}
    gpu = f", GPU {acc['gpu']} ({acc.get('gpu_memory_gib', '?')} GiB, CUDA {acc.get('cuda', '?')})" if acc.get("gpu") else ""
    torch_on = f"torch {acc.get('torch', '?')} on {acc.get('device', 'cpu')}" if acc else "torch on cpu"
    workers = f", {doc['workers']} simulate/featurize workers" if doc.get("workers") else ""
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} CPU cores{gpu}; {torch_on} with "
            f"{doc.get('threads', '?')} CPU thread(s){workers}; Python {m.get('python', '?')}, "
            f"{m.get('platform', '?')}, {m.get('date', '?')}")


def _num(v: float | None, lab: str) -> str:
    return _acc.fmt(v, lab)


def _sizes(doc: dict[str, Any]) -> list[int]:
    return [int(n) for n in doc["sizes"]["n_finetune"]]


def _row(doc: dict[str, Any], strategy: str, n: int) -> dict[str, Any] | None:
    return next((r for r in doc["rows"] if r["strategy"] == strategy and r["n_ft"] == n), None)


def _strategies(doc: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["strategy"] for r in doc["rows"] if r["strategy"] != "zero-shot"))


# ------------------------------------------------------------------------------- accuracy

def acc_setup(doc: dict[str, Any]) -> str:
    s = doc["sizes"]
    pre = doc.get("pretrain") or {}
    ep = doc.get("epochs") or {}
    scale = ("the issue's sizes" if doc.get("issue_sizes")
             else "reduced sizes (the issue's: 100,000 / 100-3,000 / 10,000)")
    train = pre.get("train_time_s")
    return "\n".join([
        f"**Machine.** {_machine(doc)}.",
        "",
        f"**Sizes** ({scale}): pre-training on **{s['n_pretrain']:,}** simulated LAMOST-like stars; "
        f"fine-tuning on nested subsets of **{', '.join(f'{n:,}' for n in _sizes(doc))}** DESI-like stars "
        f"(pool {s['n_pool']:,}); test on **{s['n_test']:,}** separate DESI-like stars. MLP "
        f"`hidden={doc.get('hidden')}` ({pre.get('trainable_params') or '?':,} weights), at most "
        f"{ep.get('pretrain')} pre-training / {ep.get('finetune')} fine-tuning epochs with early stopping on a "
        f"20 % validation split of the given stars"
        + (f"; the pre-training took {train:.0f} s" if train else "") + ".",
        "",
        f"Command: `{doc.get('command')}`",
    ])


def acc_table(doc: dict[str, Any]) -> str:
    return _acc.markdown_table(doc["rows"], ["n_ft"])


def acc_ratios(doc: dict[str, Any]) -> str:
    head = ["N", "strategy"] + [f"{lab} /zs" for lab in LABELS] + [f"{lab} /ridge" for lab in LABELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        if r["strategy"] == "zero-shot":
            continue
        rat = r.get("mae_ratio") or {}
        cells = [str(r["n_ft"]), r["strategy"]]
        for ref in ("to_zero-shot", "to_ridge"):
            for lab in LABELS:
                v = ((rat.get(ref) or {}).get(lab) or {}).get("all")
                cells.append("-" if v is None else f"{v:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acc_curves(doc: dict[str, Any]) -> str:
    sizes = _sizes(doc)
    curves = doc.get("learning_curves") or _acc.learning_curves(doc["rows"], sizes)
    gain = doc.get("pretraining_gain") or _acc.pretraining_gain(doc["rows"], sizes)
    out = []
    for lab in LABELS:
        head = ["strategy"] + [f"N={n:,}" for n in sizes]
        lines = [f"MAE of {lab} ({UNITS[lab]}) against the number of target stars:", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for strat, c in curves[lab].items():
            lines.append("| " + " | ".join([strat] + [_num(c.get(str(n)), lab) for n in sizes]) + " |")
        cells = ["**scratch / best fine-tuned**"]
        for n in sizes:
            g = (gain.get(str(n)) or {}).get(lab) or {}
            v = g.get("scratch_over_best")
            cells.append("-" if v is None else f"**{v:.2f}** ({g.get('best_finetuned')})")
        lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def acc_checks(doc: dict[str, Any]) -> str:
    c = doc["checks"]
    n = c["n_target_for_check"]
    lines = [f"- Every fine-tuned model beats zero-shot on every label with {n:,} target stars: "
             f"**{'yes' if c['all_finetuned_beat_zero_shot'] else 'no'}**"]
    for a, d in c["finetuned_beats_zero_shot"].items():
        lost = [lab for lab, ok in d.items() if not ok]
        if lost:
            lines.append(f"  - {a} does not beat zero-shot on {', '.join(lost)}")
    for who, name in (("best-finetuned", "the best fine-tuned MLP"), ("scratch-mlp", "the target-only MLP"),
                      ("zero-shot", "the zero-shot MLP (no target star)")):
        per = []
        for size, d in c["mlp_beats_ridge"].items():
            res = d.get(who)
            if res is None:
                continue
            won = [lab for lab, ok in res.items() if ok]
            per.append(f"N={int(size):,}: " + (", ".join(won) if won else "none"))
        if per:
            lines.append(f"- Labels on which {name} beats ridge trained on the same N target stars: " + "; ".join(per))
    return "\n".join(lines)


def acc_snr(doc: dict[str, Any]) -> str:
    n = doc["checks"]["n_target_for_check"]
    rows = [r for r in doc["rows"] if r["n_ft"] in (0, n)]
    return "\n\n".join(f"SNR bins, {lab} (MAE, σ/CRB), zero-shot and N={n:,}:\n\n" + _acc.snr_table(rows, ["n_ft"], lab)
                       for lab in LABELS)


def _timing(doc: dict[str, Any]) -> str:
    sec = dict(doc.get("seconds") or {})
    by = sec.pop("by_command", {}) or {}
    note = sec.pop("note", None)
    total = sec.pop("total", None)
    extra = {k: v for k, v in sec.items() if not isinstance(v, (int, float))}
    for k in extra:
        sec.pop(k)
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in sec.items() if isinstance(v, (int, float)))
    line = f"Wall time per stage: {parts}" + (f"; **total {total / 60:.1f} min**" if total else "") + "."
    if by:
        line += " By stx command: " + ", ".join(f"{k} {v:.0f} s" for k, v in by.items()) + "."
    if note:
        line += f" ({note})"
    return line


# ----------------------------------------------------------------------------------- real

def real_setup(doc: dict[str, Any]) -> str:
    src = doc.get("sources") or {}
    return "\n".join([
        f"**Machine.** {_machine(doc)}.",
        "",
        f"**Setup.** {doc.get('note', '')}. Bases: `sim` = {src.get('sim')}; `real` = {src.get('real')}; "
        f"`both` = {src.get('both')}. Target: {doc.get('target')}; {doc.get('n_target_stars')} stars, "
        f"{doc.get('folds')} folds of {', '.join(map(str, doc.get('fold_sizes') or []))}; adapters "
        f"{', '.join(doc.get('adapters') or [])}; target-only baselines {', '.join(doc.get('target_only') or [])}.",
        "",
        f"Command: `{doc.get('command')}`",
    ])


def real_table(doc: dict[str, Any], key: str = "metrics") -> str:
    return _acc.markdown_table(doc["rows"], ["base", "n_ft"], key=key)


def real_folds(doc: dict[str, Any]) -> str:
    rows = [r for r in doc["rows"] if r.get("fold_mae")]
    if not rows:
        return "_No per-fold MAE in this result file (it predates `fold_mae`)._"
    head = ["base", "n_ft", "strategy"] + [f"{lab} folds" for lab in LABELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["base"], str(r["n_ft"]), r["strategy"]]
        for lab in LABELS:
            v = [x for x in r["fold_mae"][lab] if x is not None]
            cells.append(" / ".join(_num(x, lab) for x in v) if v else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def real_source(doc: dict[str, Any]) -> str:
    s = doc["sim_to_real_source"]
    parts = []
    for lab in LABELS:
        a = s["metrics"][lab]["all"] or {}
        parts.append(f"{lab} MAE {_num(a.get('mae'), lab)} (bias {_num(a.get('bias'), lab)}, robust scatter "
                     f"{_num(a.get('scatter'), lab)}, {a.get('frac_1sigma', float('nan')):.0%} within 1σ)")
    return f"The {s['model']} applied zero-shot to {s['data']}: " + "; ".join(parts) + "."


# ------------------------------------------------------------------------------- staleness

def _run_id(bench: str, doc: dict[str, Any]) -> dict[str, str]:
    date = (doc.get("machine") or {}).get("date", "?")
    if bench == "accuracy":
        s = doc["sizes"]
        return {"n_pretrain": str(s["n_pretrain"]), "n_finetune": ",".join(map(str, s["n_finetune"])),
                "n_test": str(s["n_test"]), "date": date}
    return {"folds": str(doc.get("folds")), "sizes": ",".join(doc.get("sizes") or []),
            "adapters": ",".join(doc.get("adapters") or []), "date": date}


def reading_status(text: str, bench: str, doc: dict[str, Any]) -> str:
    m = next((m for m in READING.finditer(text) if m.group("bench") == bench), None)
    now = _run_id(bench, doc)
    if m is None:
        return ""
    said = dict(kv.split("=", 1) for kv in m.group("attrs").split() if "=" in kv)
    if all(said.get(k) == v for k, v in now.items()):
        return ""
    was = " ".join(f"{k}={said.get(k, '?')}" for k in now)
    new = " ".join(f"{k}={v}" for k, v in now.items())
    return (f"> **Not yet re-read.** The reading below was written for the run `{was}`; the tables above "
            f"are from the run `{new}`. Its numbers and conclusions may not hold for these tables.")


# ---------------------------------------------------------------------------------- render

def blocks(acc: dict[str, Any] | None, real: dict[str, Any] | None) -> dict[str, Callable[[str], str]]:
    out: dict[str, Callable[[str], str]] = {}
    if acc is not None:
        out.update({
            "acc-setup": lambda t: acc_setup(acc), "acc-table": lambda t: acc_table(acc),
            "acc-ratios": lambda t: acc_ratios(acc), "acc-curves": lambda t: acc_curves(acc),
            "acc-checks": lambda t: acc_checks(acc), "acc-snr": lambda t: acc_snr(acc),
            "acc-timing": lambda t: _timing(acc),
            "reading-accuracy": lambda t: reading_status(t, "accuracy", acc),
        })
    if real is not None:
        out.update({
            "real-setup": lambda t: real_setup(real), "real-table": lambda t: real_table(real),
            "real-domain": lambda t: real_table(real, "metrics_in_domain"),
            "real-folds": lambda t: real_folds(real), "real-source": lambda t: real_source(real),
            "real-timing": lambda t: _timing(real),
            "reading-real": lambda t: reading_status(t, "real", real),
        })
    return out


def render(text: str, acc: dict[str, Any] | None, real: dict[str, Any] | None) -> tuple[str, list[str]]:
    """The page with every known block regenerated, and the names of the blocks found."""
    makers = blocks(acc, real)
    found: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in makers:
            return m.group(0)
        found.append(name)
        body = makers[name](text).strip()
        return m.group(1) + (body + "\n" if body else "") + m.group(4)

    return BLOCK.sub(sub, text), found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--accuracy", type=Path, default=HERE / "results" / "accuracy.json")
    ap.add_argument("--real", type=Path, default=HERE / "results" / "real.json")
    ap.add_argument("--check", action="store_true", help="exit 1 if the page is not what the JSONs give")
    args = ap.parse_args()
    acc = json.loads(args.accuracy.read_text()) if args.accuracy.exists() else None
    real = json.loads(args.real.read_text()) if args.real.exists() else None
    text = args.doc.read_text()
    new, found = render(text, acc, real)
    missing = sorted(set(blocks(acc, real)) - set(found))
    if missing:
        print(f"note: {args.doc} has no block for: {', '.join(missing)}", file=sys.stderr)
    if args.check:
        if new != text:
            sys.exit(f"{args.doc} is stale: run python benchmarks/render_results.py")
        print(f"{args.doc}: up to date ({len(found)} blocks)")
        return
    tmp = args.doc.with_name(args.doc.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, args.doc)
    print(f"wrote {args.doc}: {len(found)} blocks from {args.accuracy.name if acc else '-'} and "
          f"{args.real.name if real else '-'}")


if __name__ == "__main__":
    main()

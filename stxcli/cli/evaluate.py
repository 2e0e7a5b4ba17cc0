"""``stx evaluate PRED.fits TRUTH -o REPORT/``: accuracy of a prediction catalog against true labels.

Everything that can go wrong with the inputs is checked before anything is written; the report
directory (report.json + PNG plots) then appears complete or not at all (``atomic_dir``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from .. import __version__, console
from ..errors import StxError, UsageError
from ..tables import Table, id_strings, join_ids, read_table
from ..metrics import DEFAULT_SNR_EDGES, display_name, parse_snr_edges, summarize, unit

PRED_HDU = "PREDICTIONS"


# ----------------------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    report: dict[str, Any]
    pred: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    labels: list[str]
    snr: np.ndarray | None


def _choose_labels(pred: Table, truth: Table, labels: list[str] | None) -> list[str]:
    if labels:
        for lab in labels:
            in_p, in_t = pred.numeric(lab) is not None, truth.numeric(lab) is not None
            if not in_p and not in_t:
                raise StxError(f"label {lab!r} is in neither the predictions ({pred.path}) nor the truth ({truth.path})")
            if not in_p:
                raise StxError(f"label {lab!r} is not a numeric column of the predictions {pred.path}")
            if not in_t:
                raise StxError(f"label {lab!r} is not a numeric column of the truth {truth.path}")
        return labels
    found = [c for c in pred.columns if pred.numeric(c) is not None and f"{c}_err" in pred.columns
             and truth.numeric(c) is not None]
    if not found:
        plab = [c for c in pred.columns if f"{c}_err" in pred.columns]
        raise StxError(f"no label in common: the predictions have {plab or 'no <label>/<label>_err pairs'}, "
                       f"the truth has columns {list(truth.columns)}")
    return found


def evaluate(pred_path: Path, truth_path: Path, *, id_column: str = "id", pred_id_column: str = "id",
             labels: list[str] | None = None, snr_column: str | None = None,
             snr_edges: tuple[float, ...] = DEFAULT_SNR_EDGES) -> Evaluation:
    """Read, join, check and summarise; raises StxError on any input problem (writes nothing)."""
    id_column, pred_id_column = id_column.strip().lower(), pred_id_column.strip().lower()
    labels = [lab.strip().lower() for lab in labels] if labels else None
    pred_t = read_table(pred_path, PRED_HDU)
    truth_t = read_table(truth_path)
    notes: list[str] = []

    t_ids = truth_t.ids(id_column, "the truth table")
    p_ids = pred_t.ids(pred_id_column, "the prediction catalog")
    empty = t_ids == ""
    if empty.any():
        notes.append(f"{int(empty.sum())} truth rows have an empty id and were ignored")
    t_keep = np.flatnonzero(~empty)
    uniq, counts = np.unique(t_ids[t_keep], return_counts=True)
    if (counts > 1).any():
        dups = uniq[counts > 1]
        raise StxError(f"{truth_path}: {dups.size} duplicate ids in column {id_column!r} (e.g. {dups[0]!r}); "
                       "ids must be unique in the truth")

    chosen = _choose_labels(pred_t, truth_t, labels)
    p_rows, t_sub = join_ids(p_ids, t_ids[t_keep])
    t_rows = t_keep[t_sub]
    if p_rows.size == 0:
        raise StxError(f"no common ids between the predictions ({pred_t.n_rows} rows, column {pred_id_column!r}, "
                       f"e.g. {p_ids[0] if p_ids.size else None!r}) and the truth ({truth_t.n_rows} rows, column "
                       f"{id_column!r}, e.g. {t_ids[0] if t_ids.size else None!r})")
    n_dup_pred = int(p_rows.size - np.unique(p_ids[p_rows]).size)
    if n_dup_pred:
        notes.append(f"{n_dup_pred} matched prediction rows repeat an id already matched (each is evaluated)")

    pred: dict[str, np.ndarray] = {}
    for c in pred_t.columns:
        v = pred_t.numeric(c)
        if v is not None:
            pred[c] = v[p_rows]
    truth: dict[str, np.ndarray] = {}
    for c in truth_t.columns:
        v = truth_t.numeric(c)
        if v is not None:
            truth[c] = v[t_rows]

    for lab in chosen:
        p_ok, t_ok = np.isfinite(pred[lab]), np.isfinite(truth[lab])
        if not p_ok.any():
            raise StxError(f"label {lab!r}: the predictions are all NaN for the {p_rows.size} matched stars")
        if not t_ok.any():
            raise StxError(f"label {lab!r}: the truth is all NaN for the {p_rows.size} matched stars")
        if not (p_ok & t_ok).any():
            raise StxError(f"label {lab!r}: no matched star has both a finite prediction and a finite true value")
        if f"{lab}_err" not in pred:
            notes.append(f"the predictions have no {lab}_err column: no calibration fractions for {lab}")
    no_pred = int((~np.stack([np.isfinite(pred[lab]) for lab in chosen])).all(axis=0).sum())
    if no_pred:
        notes.append(f"{no_pred} matched star(s) have no prediction (NaN: a spectrum without data, "
                     f"flagged NO_OVERLAP), left out of the statistics")

    snr, snr_source = None, None
    want = (snr_column or "snr").strip().lower()
    for src_name, src in (("predictions", pred), ("truth", truth)):
        if want in src:
            snr, snr_source = src[want], f"{src_name} column {want!r}"
            break
    if snr is None and snr_column:
        raise StxError(f"SNR column {want!r} is in neither the predictions nor the truth")

    summary = summarize(pred, truth, chosen, snr, snr_edges=snr_edges)
    notes = summary.pop("notes") + notes
    if snr_source and snr_source.startswith("truth"):
        notes.append(f"SNR bins use the {snr_source} (the predictions have none)")
    n_flagged = None
    if "flags" in pred_t.columns and pred_t.columns["flags"].dtype.kind in "iu":
        n_flagged = int(np.count_nonzero(pred_t.columns["flags"][p_rows]))

    report: dict[str, Any] = {
        "stx_version": __version__,
        "inputs": {
            "predictions": str(pred_path), "predictions_table": pred_t.source,
            "truth": str(truth_path), "truth_table": truth_t.source,
            "pred_id_column": pred_id_column, "id_column": id_column,
            "n_predictions": pred_t.n_rows, "n_truth": truth_t.n_rows,
            "n_matched": int(p_rows.size), "n_predictions_unmatched": int(pred_t.n_rows - p_rows.size),
            "snr_source": snr_source, "n_flagged": n_flagged,
        },
        **summary,
        "notes": notes,
        "plots": [],
    }
    return Evaluation(report, pred, truth, chosen, snr)


# ----------------------------------------------------------------------------- output

def _fmt(value: float | int | None, label: str, kind: str) -> str:
    if value is None:
        return "-"
    if kind in ("n", "n_sigma"):
        return str(value)
    if kind in ("frac_1sigma", "frac_2sigma"):
        return f"{value:.3f}"
    if kind == "scatter_over_crb":
        return f"{value:.2f}"
    if label == "teff":
        return f"{value:.1f}"
    if unit(label) == "dex":
        return f"{value:.3f}"
    return f"{value:.4g}"


def _table_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    subsets = [("all", report["overall"])]
    if report["feh_split"]:
        subsets += [("feh<-1", report["feh_split"]["feh<-1"]), ("feh>=-1", report["feh_split"]["feh>=-1"])]
    for b in report["snr_bins"] or []:
        subsets.append((f"snr {b['name']}", b["metrics"]))
    return subsets


def print_table(report: dict[str, Any]) -> None:
    from rich.table import Table as RichTable

    inp = report["inputs"]
    from rich import box

    table = RichTable(title=f"stx evaluate: {inp['n_matched']} matched stars", box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    has_crb = any(m["scatter_over_crb"] is not None for m in report["overall"].values())
    cols = ["subset", "label", "N", "MAE", "bias", "scatter", "<1σ", "<2σ"] + (["σ/CRB"] if has_crb else [])
    for c in cols:
        table.add_column(c, justify="left" if c in ("subset", "label") else "right", no_wrap=True)
    keys = ["n", "mae", "bias", "scatter", "frac_1sigma", "frac_2sigma"] + (["scatter_over_crb"] if has_crb else [])
    for name, metrics in _table_rows(report):
        for i, lab in enumerate(report["labels"]):
            m = metrics[lab]
            u = unit(lab)
            table.add_row(name if i == 0 else "", f"{display_name(lab)}" + (f" {u}" if u else ""),
                          *[_fmt(m[k], lab, k) for k in keys],
                          end_section=i == len(report["labels"]) - 1)
    console.out().print(table)


def _check_output(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise StxError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "report.json").is_file():
        raise StxError(f"{path}: exists, is not empty and is not an stx evaluate report; choose another -o")


def write_report(ev: Evaluation, out: Path, plots: bool = True) -> dict[str, Any]:
    import json

    from ..io import atomic_dir

    report = ev.report
    with atomic_dir(out) as tmp:
        report["plots"] = []
        if plots:
            from ..plots import write_plots

            report["plots"], notes = write_plots(tmp, ev.pred, ev.truth, ev.labels, ev.snr)
            report["notes"] = report["notes"] + notes
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        pred: Path = typer.Argument(..., metavar="PRED.fits", help="Prediction catalog from `stx predict` (FITS; HDU PREDICTIONS or the first table)."),
        truth: Path = typer.Argument(..., metavar="TRUTH", help="True labels: FITS or CSV table with an id column and label columns."),
        output: Path = typer.Option(..., "-o", "--output", metavar="REPORT/", help="Report directory (report.json + PNG plots); written atomically."),
        id_column: str = typer.Option("id", "--id-column", help="Id column of TRUTH."),
        pred_id_column: str = typer.Option("id", "--pred-id-column", help="Id column of PRED."),
        labels: str | None = typer.Option(None, "--labels", help="Comma-separated labels, e.g. teff,logg,feh "
                                          "[default: every PRED label with an _err column that TRUTH also has]."),
        snr_bins: str = typer.Option(",".join(f"{e:g}" for e in DEFAULT_SNR_EDGES), "--snr-bins",
                                     help="Comma-separated SNR bin edges (bins are lo <= snr < hi)."),
        snr_column: str | None = typer.Option(None, "--snr-column", help="SNR column, looked up in PRED then "
                                              "TRUTH [default: snr, bins skipped when absent]."),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
        no_plots: bool = typer.Option(False, "--no-plots", help="Write report.json only (no PNG plots; faster)."),
    ) -> None:
        """Compare predictions with true labels: MAE, bias, robust scatter, 1/2-sigma calibration,
        overall, for [Fe/H] < -1 and >= -1 and per SNR bin; scatter / Cramer-Rao bound when TRUTH has
        <label>_crb columns. Writes REPORT/report.json and PNG plots.

        Example: stx evaluate catalog.fits truth.csv --id-column obsid -o report/
        """
        try:
            edges = parse_snr_edges(snr_bins)
        except ValueError as exc:
            raise UsageError(f"--snr-bins: {exc}") from exc
        label_list = [s for s in (labels or "").split(",") if s.strip()] or None
        if labels is not None and not label_list:
            raise UsageError("--labels: give at least one label name")
        _check_output(output)
        ev = evaluate(pred, truth, id_column=id_column, pred_id_column=pred_id_column, labels=label_list,
                      snr_column=snr_column, snr_edges=edges)
        report = write_report(ev, output, plots=not no_plots)
        if json_out:
            console.print_json(report)
        else:
            print_table(report)
            for note in report["notes"]:
                console.info(f"note: {note}")
            console.info(f"report written to {output}/ ({', '.join(['report.json', *report['plots']])})")


__all__ = ["evaluate", "join_ids", "id_strings", "read_table", "register", "write_report"]

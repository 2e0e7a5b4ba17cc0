"""``stx pretrain``: train a head on one or more feature stores and write a model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .. import console
from ..errors import UsageError

# Options shared by pretrain and finetune (typer needs them spelled out per command).
EPOCHS = typer.Option(None, "--epochs", help="Maximum epochs (default: the head's / adapter's).")
BATCH = typer.Option(None, "--batch-size", help="Minibatch size.")
LR = typer.Option(None, "--lr", help="Learning rate (AdamW).")
WD = typer.Option(None, "--weight-decay", help="AdamW weight decay.")
PATIENCE = typer.Option(None, "--patience", help="Early stopping: epochs without validation improvement.")
VAL = typer.Option(0.2, "--val-frac", help="Fraction of the stars held out for validation / early stopping.")
NTRAIN = typer.Option(None, "--n-train", help="Use N labelled stars in all (training + validation), a seeded random subset (learning curves).")
SEED = typer.Option(0, "--seed", help="Random seed (split, subsample, initialisation, shuffling).")
NOISE = typer.Option(0.0, "--augment-noise", help="Noise augmentation: add F x N(0, 1/ivar) to the features each batch (0 = off).")
DEVICE = typer.Option("cpu", "--device", help="cpu or cuda.")
THREADS = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice).")
CACHE = typer.Option(2048.0, "--cache-mb", help="Hold the training rows in memory when they fit in this many MB; otherwise stream the store every epoch.")
CHUNK = typer.Option(4096, "--chunk-rows", help="Rows per contiguous read from the store.")
CALIBRATE = typer.Option(True, "--calibrate-errors/--no-calibrate-errors", help="Scale each label's predicted errors so that 68.27 % of the validation stars' residuals fall within 1 sigma (recorded in the manifest; see docs/models.md).")
JSON = typer.Option(False, "--json", help="Print the summary as JSON.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def parse_settings(settings: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, lists, objects)."""
    out: dict[str, Any] = {}
    for item in settings or []:
        if "=" not in item:
            raise UsageError(f"{flag} expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    out = [t.strip() for t in text.split(",") if t.strip()]
    return out or None


def train_options(**kw: Any) -> Any:
    from ..train import TrainOptions

    return TrainOptions(epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"],
                        weight_decay=kw["weight_decay"], patience=kw["patience"], val_frac=kw["val_frac"],
                        n_train=kw["n_train"], seed=kw["seed"], augment_noise=kw["augment_noise"],
                        device=kw["device"], threads=kw["threads"], cache_mb=kw["cache_mb"],
                        chunk_rows=kw["chunk_rows"], calibrate_errors=kw.get("calibrate_errors", True))


def print_summary(title: str, summary: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column("key")
    t.add_column("value")
    for k, v in summary.items():
        if k == "validation" and isinstance(v, dict):
            continue
        t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.out().print(t)
    val = summary.get("validation")
    if isinstance(val, dict) and val:
        print_validation(val)


def print_validation(val: dict[str, Any]) -> None:
    from rich.table import Table

    from ..metrics import unit

    single = all(isinstance(v, dict) and "mae" in v for v in val.values())
    rows = {"model": val} if single else val
    t = Table(title="validation (held-out stars)")
    for c in ("model", "label", "MAE", "robust scatter", "unit"):
        t.add_column(c)
    for block, labels in rows.items():
        for lab, m in labels.items():
            fmt = (lambda x: "-" if x is None else f"{x:.4g}")
            t.add_row(block, lab, fmt(m.get("mae")), fmt(m.get("scatter")), unit(lab))
    console.out().print(t)


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain_cmd(
        stores: list[Path] = typer.Argument(..., help="Feature stores (same featurizer config)."),
        output: Path = typer.Option(..., "-o", "--output", help="Model directory to write."),
        head: str = typer.Option("mlp", "--head", help="Head plugin (see `stx plugins`): mlp, ridge, ..."),
        settings: Optional[list[str]] = typer.Option(None, "--set", help="Head option key=value (repeatable), e.g. --set hidden=512,256 --set ensemble=5."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels (default: those every store has)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated loss weight per store (default 1 each)."),
        transform: Optional[list[str]] = typer.Option(None, "--transform", help="Label transform label=log10|identity (default teff=log10)."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the directory name)."),
        epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH, lr: Optional[float] = LR,
        weight_decay: Optional[float] = WD, patience: Optional[int] = PATIENCE, val_frac: float = VAL,
        n_train: Optional[int] = NTRAIN, seed: int = SEED, augment_noise: float = NOISE,
        device: str = DEVICE, threads: Optional[int] = THREADS, cache_mb: float = CACHE,
        chunk_rows: int = CHUNK, calibrate_errors: bool = CALIBRATE, json_out: bool = JSON, quiet: bool = QUIET,
    ) -> None:
        """Train a head (features -> labels with uncertainties) on feature stores.

        Several stores are combined with a weight per store when they share one featurizer
        config. Labels are transformed (Teff as log10 Teff) and standardised; the model
        directory records everything predict needs (see docs/models.md).

        Example: stx pretrain lamost.h5 sim.h5 --weights 1,0.3 -o base/ --set ensemble=3
        """
        from ..train import pretrain

        console.set_quiet(quiet or json_out)
        w = [float(x) for x in split_list(weights)] if weights else None
        tr = {k: str(v) for k, v in parse_settings(transform, "--transform").items()}
        opts = train_options(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             patience=patience, val_frac=val_frac, n_train=n_train, seed=seed,
                             augment_noise=augment_noise, device=device, threads=threads,
                             cache_mb=cache_mb, chunk_rows=chunk_rows, calibrate_errors=calibrate_errors)
        summary = pretrain(stores, output, head=head, head_config=parse_settings(settings),
                           labels=split_list(labels), weights=w, transforms=tr, opts=opts, name=name)
        if json_out:
            console.print_json(summary)
        else:
            print_summary("pretrain", summary)

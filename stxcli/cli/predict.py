"""``stx predict``: labels with uncertainties and flags for survey files, stores or a catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import console
from ..errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_cmd(
        args: list[str] = typer.Argument(..., help="MODEL_DIR then INPUT... (or only INPUT... with --model): survey files, directories, lists of paths, feature stores (.h5), or one input catalog (FITS/CSV with a path column)."),
        output: Path = typer.Option(..., "-o", "--output", help="FITS catalog to write."),
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model directory (instead of the first argument)."),
        format: Optional[str] = typer.Option(None, "--format", help="Force a reader for survey files."),
        chunk_size: int = typer.Option(4096, "--chunk-size", help="Spectra per chunk (memory stays flat)."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads: torch's, and batches featurized at once when predicting from survey files (default: torch's choice; featurizing uses the usable cores)."),
        path_column: Optional[str] = typer.Option(None, "--path-column", help="Input catalog: column of spectrum paths (default: path, file, filename, ...)."),
        row_column: Optional[str] = typer.Option(None, "--row-column", help="Input catalog: row of the spectrum in its file (default: row, source_row)."),
        targetid_column: Optional[str] = typer.Option(None, "--targetid-column", help="Input catalog: TARGETID column matched against DESI files."),
        prefix: str = typer.Option("", "--prefix", help="Input catalog: prefix of the appended prediction columns."),
        dask: Optional[str] = typer.Option(None, "--dask", help="Featurize and predict survey files on a Dask cluster: a scheduler address (tcp://host:8786) or local[:N]. Needs the extra stx[dask]; the parts folder beside the output must be visible to every worker."),
        dask_partition: Optional[int] = typer.Option(None, "--dask-partition", help="Files per Dask partition."),
        dask_retries: int = typer.Option(2, "--dask-retries", help="Times a failed Dask partition is resubmitted."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Predict labels (with 1-sigma errors) and quality flags into a FITS table.

        The model directory alone rebuilds the pipeline: survey files are featurized on the fly
        with the model's featurizer; a feature store must have been made with the same
        featurizer config. With an input catalog the output is that catalog, row for row, with
        the prediction columns appended. Zero-shot prediction is simply a pretrained model here.
        With --dask the survey files are split into partitions predicted on a Dask cluster; the
        catalog equals the single-process one.

        Example: stx predict base/ ../shared/data/desi-edr/coadd-sv3-dark-26065.fits -o pred.fits
        """
        from ..predict import run_predict

        console.set_quiet(quiet or json_out)
        items = list(args)
        if model is None:
            if len(items) < 2:
                raise UsageError("give MODEL_DIR and at least one INPUT (or --model MODEL_DIR INPUT...)")
            model_dir, inputs = Path(items[0]), items[1:]
        else:
            model_dir, inputs = model, items
        if dask is not None:
            if path_column or row_column or targetid_column or prefix:
                raise UsageError("--dask predicts survey files; input-catalog options do not apply")
            from ..distributed import predict_on_dask

            summary = predict_on_dask(dask, model_dir, inputs, output, format=format, chunk_rows=chunk_size,
                                      device=device, partition_files=dask_partition, retries=dask_retries)
        else:
            summary = run_predict(model_dir, inputs, output, format=format, chunk_rows=chunk_size,
                                  device=device, threads=threads, path_column=path_column,
                                  row_column=row_column, targetid_column=targetid_column, prefix=prefix)
        if json_out:
            console.print_json(summary)
        else:
            from .pretrain import print_summary

            print_summary("predict", summary)

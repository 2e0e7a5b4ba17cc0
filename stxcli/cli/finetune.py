"""``stx finetune``: adapt a pretrained model to a few labelled target stars."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import console
from ..errors import UsageError
from .pretrain import (BATCH, CACHE, CALIBRATE, CHUNK, DEVICE, EPOCHS, JSON, LR, NOISE, NTRAIN, PATIENCE, QUIET, SEED,
                       THREADS, VAL, WD, parse_settings, print_summary, train_options)


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        model: Path = typer.Argument(..., help="Pretrained model directory."),
        target: Path = typer.Argument(..., help="Feature store of labelled target stars: same featurizer config as the model, or, for an adapter that reaches into the encoder (--set target=encoder), a raw store with the encoder's raw config."),
        output: Path = typer.Option(..., "-o", "--output", help="Fine-tuned model directory to write."),
        adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="Adapter plugin: residual, lora, full, auto, ..."),
        settings: Optional[list[str]] = typer.Option(None, "--set", help="Adapter option key=value (repeatable), e.g. --set r=8, or --set target=encoder / encoder+head (lora, full) to fine-tune the spectral encoder too."),
        scratch: bool = typer.Option(False, "--scratch", help="No adapter: train the base's head architecture from scratch on the same target stars (the target-only baseline)."),
        embed_base: bool = typer.Option(False, "--embed-base", help="Copy the base model into OUT/base/ (and the files its featurizer reads, e.g. a transformer base's encoder, into OUT/assets/) instead of referencing it by path + sha256: a self-contained model."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the directory name)."),
        epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH, lr: Optional[float] = LR,
        weight_decay: Optional[float] = WD, patience: Optional[int] = PATIENCE, val_frac: float = VAL,
        n_train: Optional[int] = NTRAIN, seed: int = SEED, augment_noise: float = NOISE,
        device: str = DEVICE, threads: Optional[int] = THREADS, cache_mb: float = CACHE,
        chunk_rows: int = CHUNK, calibrate_errors: bool = CALIBRATE, json_out: bool = JSON, quiet: bool = QUIET,
    ) -> None:
        """Fine-tune a pretrained model on target stars with an adapter.

        residual: frozen base + small zero-initialised correction network; lora: low-rank
        updates of the frozen linear layers (saved in peft's layout); full: every weight, low
        learning rate; auto: trains the candidates and keeps the best per label. --scratch
        trains the same architecture on the target stars alone (the baseline that shows whether
        pre-training pays). The numbers of target stars and trainable parameters are reported
        and stored.

        By default adapters change the head only. For a model trained on transformer embeddings,
        lora and full can also reach into the spectral encoder: --set target=encoder (LoRA on
        the encoder's attention and MLP layers, head frozen) or target=encoder+head (both); with
        full, the encoder trains at encoder_lr_scale (0.1) x the learning rate. TARGET is then a
        store made by the raw featurizer with the encoder's raw config (stx encoder info ENC).

        Examples:

          stx finetune base/ desi.h5 --adapter lora --set r=8 --n-train 300 -o lora300/

          stx finetune emb_base/ desi_raw.h5 --adapter lora --set target=encoder+head -o enc_lora/

          stx finetune emb_base/ desi_raw.h5 --adapter full --set target=encoder+head -o enc_full/
        """
        from ..train import finetune

        console.set_quiet(quiet or json_out)
        if scratch and adapter:
            raise UsageError("--scratch trains without an adapter; drop --adapter")
        if not scratch and not adapter:
            raise UsageError("give --adapter NAME (residual, lora, full, auto, ...) or --scratch")
        if scratch and settings:
            raise UsageError("--set configures an adapter; --scratch reuses the base's head config")
        opts = train_options(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             patience=patience, val_frac=val_frac, n_train=n_train, seed=seed,
                             augment_noise=augment_noise, device=device, threads=threads,
                             cache_mb=cache_mb, chunk_rows=chunk_rows, calibrate_errors=calibrate_errors)
        summary = finetune(model, target, output, adapter=adapter or "", adapter_config=parse_settings(settings),
                           opts=opts, embed_base=embed_base, scratch=scratch, name=name)
        if json_out:
            console.print_json(summary)
        else:
            print_summary("finetune" if not scratch else "finetune --scratch", summary)

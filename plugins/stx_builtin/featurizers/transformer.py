"""The ``transformer`` featurizer: spectra -> embeddings of a self-supervised spectral encoder.

It wraps the ``raw`` featurizer: ``transform(batch) = encoder(raw.transform(batch))``, one
``width``-long vector per spectrum. The encoder is a directory made by ``stx encoder train`` (see
docs/encoder.md); its manifest holds the raw featurizer's full configuration, so the raw features
are exactly those the encoder was trained on.

Config (everything :meth:`TransformerFeaturizer.config` returns rebuilds the same featurizer)::

    encoder         path of the encoder directory (required); where to find it, not what it is
    encoder_sha256  sha256 of its weights: the encoder's identity; a directory whose weights
                    differ is refused
    pooling         "mean" (default) or "attention" (learned query, trained during pretraining)
    raw             the raw featurizer's config (default: the one in the encoder manifest);
                    single keys can be overridden with ``raw.KEY=value`` (e.g. ``--set raw.rv=estimate``)
                    as long as the grid stays the encoder's

Runtime knobs, not part of the config: ``device`` ("cpu" default, or "cuda") and ``batch_size``
(spectra per forward pass; default 64 on CPU, 512 on CUDA).

**Identity.** What determines the numbers is ``encoder_sha256``, ``pooling`` and ``raw``
(:meth:`TransformerFeaturizer.identity_config`); the core compares stores and models by that
(``stxcli.train.featurizer_identity``), so a moved encoder directory or another device does not
make features "different". When the recorded ``encoder`` path does not hold the encoder with
``encoder_sha256`` (it moved), the directories listed in the environment variable
``STX_ENCODER_PATH`` (``os.pathsep``-separated; each an encoder directory or a folder of them) are
searched for it.

Feature ivar: 1 for every spectrum with data (the embedding's noise is not propagated: do not use
it as a measured uncertainty), 0 where the spectrum has no valid pixel.

For the adapters that reach into the encoder, :meth:`TransformerFeaturizer.front` gives the
differentiable torch module raw features + ivar -> embedding and :meth:`front_input` the raw
featurizer entry its input must come from.

Also registers the ``stx encoder`` command group (train, embed, info).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from stxcli import console
from stxcli.errors import ModelFileError, StxError, UsageError
from stxcli.hookspecs import hookimpl
from stxcli.protocols import FeatureBatch


#: environment variable: where to look for an encoder that is not at its recorded path
SEARCH_ENV = "STX_ENCODER_PATH"
#: the config keys that determine the embeddings (``encoder`` only says where the encoder is)
IDENTITY_KEYS = ("encoder_sha256", "pooling", "raw")


def _holds(d: Path, sha256: str) -> bool:
    """Whether directory ``d`` is an encoder whose manifest records weights ``sha256`` (cheap:
    the weights themselves are hashed when the featurizer verifies them)."""
    import json

    try:
        m = json.loads((d / "manifest.json").read_text())
        return isinstance(m, dict) and str(m.get("weights", {}).get("sha256", "")) == sha256
    except (OSError, ValueError):
        return False


def locate_encoder(path: str | Path, sha256: str | None) -> Path:
    """The directory of the encoder recorded as ``path`` with weights ``sha256``: ``path`` when it
    holds that encoder (or when no sha256 is given), else the first match among the folders the
    core offers (:func:`stxcli.pipeline.asset_dirs`: a model directory's ``assets/``), then the
    directories of ``$STX_ENCODER_PATH``, each folder and its sub-directories; ``path`` again
    when none matches (loading it then gives the one-line error)."""
    import os

    from stxcli.pipeline import asset_dirs

    p = Path(path).expanduser().resolve()
    if not sha256 or _holds(p, sha256):
        return p
    searched = [str(d) for d in asset_dirs()] + os.environ.get(SEARCH_ENV, "").split(os.pathsep)
    for entry in searched:
        if not entry.strip():
            continue
        root = Path(entry.strip()).expanduser().resolve()
        cands = [root] + (sorted(c for c in root.iterdir() if c.is_dir()) if root.is_dir() else [])
        for c in cands:
            if _holds(c, sha256):
                return c
    return p


def verified_encoder(path: str | Path, sha256: str | None) -> tuple[Path, dict[str, Any], str]:
    """The encoder recorded as ``path`` with weights ``sha256`` (:func:`locate_encoder`): its
    directory, manifest and verified weights sha256; a one-line error, which says where else it
    is looked for, when it is not there or its weights differ."""
    from ..encoder.io import read_manifest, verify_weights

    found = locate_encoder(path, sha256)
    hint = f" (if the encoder moved, point {SEARCH_ENV} at the folder that holds it now)" if sha256 else ""
    try:
        manifest = read_manifest(found)
        _, digest = verify_weights(found, manifest, sha256)
    except ModelFileError as exc:
        raise ModelFileError(f"{exc}{hint}") from exc
    return found, manifest, digest


class TransformerFeaturizer:
    name = "transformer"
    version = "1"
    description = "Embeddings of a self-supervised spectral transformer (stx encoder train) over raw features."
    #: the raw featurizer's property, and the encoder embeds each spectrum alone (eval mode)
    row_independent = True

    def __init__(self, encoder: str | None = None, encoder_sha256: str | None = None, pooling: str = "mean",
                 device: str = "cpu", raw: dict[str, Any] | None = None, batch_size: int | None = None,
                 **raw_overrides: Any) -> None:
        from stxcli.pipeline import build_featurizer

        from ..encoder.config import POOLINGS, EncoderConfig

        if encoder is None:
            raise UsageError("featurizer 'transformer' needs an encoder: --set encoder=DIR "
                             "(a directory made by `stx encoder train`)")
        bad = [k for k in raw_overrides if not k.startswith("raw.")]
        if bad:
            raise UsageError(f"featurizer 'transformer': unknown setting(s) {', '.join(sorted(bad))} "
                             "(known: encoder, encoder_sha256, pooling, device, raw, raw.KEY, batch_size)")
        if pooling not in POOLINGS:
            raise UsageError(f"featurizer 'transformer': pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.device = str(device)
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"featurizer 'transformer': device must be cpu or cuda, got {device!r}")
        if self.device != "cpu":
            from ..encoder.train import resolve_device

            resolve_device(self.device)
        # Verify now (sha256), build the torch module only when first used: a process that just
        # reads config()/dim (the parent of `stx featurize --workers N`) never runs torch ops, so
        # forking workers from it stays safe.
        self.path, self.manifest, self.encoder_sha256 = verified_encoder(encoder, encoder_sha256)
        try:
            self.architecture = EncoderConfig.from_dict(dict(self.manifest["architecture"]))
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{self.path}: bad encoder architecture in the manifest ({exc})") from exc
        self._encoder: Any = None
        if pooling == "attention" and not self.manifest.get("pooling", {}).get("attention", False):
            raise UsageError(f"{self.path}: this encoder was trained without the attention-pooling objective "
                             "(--aux-weight 0); use pooling=mean or retrain")
        self.pooling = pooling
        self.batch_size = int(batch_size) if batch_size else (64 if self.device == "cpu" else 512)
        if self.batch_size < 1:
            raise UsageError("featurizer 'transformer': batch_size must be >= 1")

        rawinfo = self.manifest["raw_featurizer"]
        raw_cfg = dict(rawinfo.get("config", {}))
        raw_cfg.update(raw or {})
        raw_cfg.update({k[len("raw."):]: v for k, v in raw_overrides.items()})
        self.raw = build_featurizer(str(rawinfo.get("name", "raw")), raw_cfg)
        n_pix = int(self.architecture.n_pix)
        if self.raw.dim != n_pix:
            raise UsageError(f"{self.path}: the encoder expects {n_pix} raw features, the raw featurizer "
                             f"configured here gives {self.raw.dim}: keep the grid of the encoder's manifest")
        grid = self.manifest.get("grid", {})
        axis = self.raw.axis()
        if axis is not None and grid.get("first") is not None:
            if not np.allclose([axis[0], axis[-1]], [grid["first"], grid["last"]], rtol=1e-9, atol=0):
                raise UsageError(f"{self.path}: the raw grid ({axis[0]:.3f}-{axis[-1]:.3f}) differs from the "
                                 f"encoder's ({grid['first']:.3f}-{grid['last']:.3f})")
        if str(getattr(self.raw, "version", "")) != str(rawinfo.get("version", "")):
            console.warn(f"{self.path}: encoder trained on raw featurizer version {rawinfo.get('version')}, "
                         f"installed is {self.raw.version}; embeddings may differ from training")
        trained_cfg = dict(rawinfo.get("config", {}))
        built = self.raw.config()
        user_keys = set(raw or {}) | {k[len("raw."):] for k in raw_overrides}
        changed = sorted(k for k in set(trained_cfg) | set(built)
                         if k not in user_keys and trained_cfg.get(k) != built.get(k))
        if changed:
            console.warn(f"{self.path}: the installed raw featurizer sets {', '.join(changed)} differently from "
                         "the raw config the encoder was trained on; embeddings may differ from training")

    # -- protocol
    @property
    def needs_resolution(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.raw, "needs_resolution", False))

    @property
    def dim(self) -> int:
        return int(self.architecture.width)

    @property
    def encoder(self) -> Any:
        """The :class:`~stx_builtin.encoder.model.SpectralEncoder` (eval mode, on ``device``),
        loaded and re-verified against ``encoder_sha256`` on first use."""
        if self._encoder is None:
            from ..encoder.io import load_encoder

            self._encoder, _ = load_encoder(self.path, self.encoder_sha256, device=self.device)
        return self._encoder

    def axis(self) -> np.ndarray | None:
        return None

    def config(self) -> dict[str, Any]:
        return {"encoder": str(self.path), "encoder_sha256": self.encoder_sha256, "pooling": self.pooling,
                "raw": self.raw.config()}

    @staticmethod
    def assets(config: dict[str, Any]) -> dict[str, Path]:
        """The encoder directory a recorded config uses (``stx finetune --embed-base`` copies it
        into the model), found and verified as the featurizer finds and verifies it."""
        return {"encoder": verified_encoder(config.get("encoder") or "", config.get("encoder_sha256"))[0]}

    @staticmethod
    def identity_config(config: dict[str, Any]) -> dict[str, Any]:
        """The part of a recorded config that determines the embeddings: encoder sha256, pooling
        and the raw config; not the encoder's path, nor the device (older configs, which also
        recorded ``device``, compare equal to today's)."""
        return {"encoder_sha256": config.get("encoder_sha256"), "pooling": config.get("pooling", "mean"),
                "raw": config.get("raw")}

    # -- for the adapters that fine-tune the encoder
    def front_input(self) -> dict[str, Any]:
        """The featurizer entry (name, version, config, key) that the front's input comes from:
        the raw featurizer this encoder was trained on."""
        from stxcli.store import featurizer_key

        cfg = self.raw.config()
        return {"name": self.raw.name, "version": str(self.raw.version), "config": cfg,
                "key": featurizer_key(self.raw.name, str(self.raw.version), cfg)}

    def front(self, device: str = "cpu") -> Any:
        """A fresh :class:`~stx_builtin.encoder.model.EncoderFront` (its own copy of the verified
        encoder, eval mode, weights frozen): raw features + ivar -> this featurizer's embedding,
        differentiable."""
        import copy

        from ..encoder.model import EncoderFront

        enc = copy.deepcopy(self.encoder).to(device)
        for p in enc.parameters():
            p.requires_grad_(False)
        return EncoderFront(enc, self.pooling).eval()

    def front_info(self) -> dict[str, Any]:
        """What a model fine-tuned through :meth:`front` records about the encoder."""
        return {"encoder_sha256": self.encoder_sha256, "pooling": self.pooling, "dim": self.dim,
                "architecture": self.architecture.to_dict()}

    def transform(self, batch: Any) -> FeatureBatch:
        fb = self.raw.transform(batch)
        emb, ivar = self.embed(fb.features, fb.ivar)
        return FeatureBatch(features=emb, ivar=ivar, quality=fb.quality, meta=fb.meta, notes=list(fb.notes))

    # -- the encoder on raw features
    def embed(self, features: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings ``(n, width)`` float32 of raw features, and their ivar (1, or 0 where a
        spectrum has no valid pixel)."""
        import torch

        features = np.asarray(features, np.float32)
        ivar = np.asarray(ivar, np.float32)
        from ..encoder.model import EncoderFront

        n = features.shape[0]
        out = np.zeros((n, self.dim), np.float32)
        has = ((ivar > 0) & np.isfinite(features)).any(axis=1)
        front = EncoderFront(self.encoder, self.pooling)  # the same module the encoder adapters tune
        with torch.inference_mode():
            for s in range(0, n, self.batch_size):
                e = min(s + self.batch_size, n)
                xf = torch.from_numpy(features[s:e]).to(self.device)
                xi = torch.from_numpy(ivar[s:e]).to(self.device)
                out[s:e] = front(xf, xi).float().cpu().numpy()
        finite = np.isfinite(out).all(axis=1)
        if not finite[has].all():
            raise StxError(f"{self.path}: the encoder produced non-finite embeddings for "
                           f"{int((~finite & has).sum())} spectra (a diverged encoder?)")
        return out, has.astype(np.float32)[:, None].repeat(self.dim, axis=1)


@hookimpl
def register_featurizers(register: Any) -> None:
    register(TransformerFeaturizer)


def embed_store(raw_store: str | Path, output: str | Path, *, encoder: str | Path, pooling: str = "mean",
                device: str = "cpu", batch_size: int | None = None, chunk_rows: int = 4096) -> dict[str, Any]:
    """Embed a ``raw`` feature store into a ``transformer`` store without re-reading the spectra.

    The result is the store ``stx featurize --featurizer transformer --set encoder=...`` would make
    from the same files with the raw store's raw config: same featurizer name, version and config
    (hence the same featurizer key), ids, meta, quality, labels and inputs; written atomically."""
    import json

    from stxcli.io import atomic_file
    from stxcli.pipeline import build_featurizer
    from stxcli.store import FeatureStore, StoreWriter, featurizer_key

    with FeatureStore.open(raw_store) as st:
        if st.featurizer_name != "raw":
            raise StxError(f"{st.path}: encoder embed needs a store made by the 'raw' featurizer, "
                           f"this one was made by {st.featurizer_name!r}")
        cfg: dict[str, Any] = {"encoder": str(encoder), "pooling": pooling, "device": device,
                               "raw": st.featurizer_config}
        if batch_size:
            cfg["batch_size"] = batch_size
        feat = build_featurizer("transformer", cfg)
        raw = feat.raw
        if featurizer_key(raw.name, raw.version, raw.config()) != st.featurizer_key:
            old, now = st.featurizer_config, raw.config()
            diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
            what = (f"config keys {', '.join(diff)}" if diff else
                    f"version {st.featurizer_version} vs {raw.version}" if st.featurizer_version != raw.version
                    else "featurizer key")
            raise StxError(f"{st.path}: the installed raw featurizer no longer reproduces this store's features "
                           f"({what} differ); re-featurize the spectra (stx featurize)")
        with atomic_file(output) as tmp:
            w = StoreWriter(tmp, featurizer_name=feat.name, featurizer_version=feat.version,
                            featurizer_config=feat.config(), dim=feat.dim, axis=None)
            try:
                with console.progress("embed", total=st.n) as bar:
                    for s in range(0, st.n, chunk_rows):
                        d = st.read(s, min(s + chunk_rows, st.n), fields=("features", "ivar", "ids", "meta", "quality"))
                        for b in range(0, len(d["ids"]), feat.batch_size):
                            emb, eiv = feat.embed(d["features"][b:b + feat.batch_size], d["ivar"][b:b + feat.batch_size])
                            for name, arr in (("features", emb), ("ivar", eiv)):
                                w.f[name].resize(w.f[name].shape[0] + len(emb), axis=0)
                                w.f[name][-len(emb):] = arr
                            bar.advance(len(emb))
                        w._append("ids", d["ids"])
                        for group in ("meta", "quality"):
                            for key, arr in d[group].items():
                                w._append(f"{group}/{key}", arr)
                w.set_inputs(st.inputs)
                if st.label_names:
                    w.set_labels({k: st.f["labels"][k][:] for k in st.label_names},
                                 json.loads(st.f.attrs.get("label_source", "{}")))
                checksum = w.finish()
            finally:
                w.close()
        n = st.n
    return {"output": str(output), "n_spectra": n, "dim": feat.dim, "featurizer": feat.name,
            "encoder_sha256": feat.encoder_sha256, "pooling": pooling, "source_store": str(raw_store),
            "checksum": checksum}


def raw_settings(name: str, config: dict[str, Any]) -> str:
    """``--featurizer NAME --set k=v ...`` for the keys of ``config`` that differ from the
    installed featurizer's defaults: how to make stores with the features an encoder reads."""
    import json

    from stxcli.pipeline import build_featurizer

    try:
        defaults = build_featurizer(name, {}).config()
    except StxError:
        defaults = {}
    sets = [f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(config.items())
            if defaults.get(k, object()) != v]
    return " ".join([f"--featurizer {name}", *sets])


# ------------------------------------------------------------------------------------ commands


@hookimpl
def register_commands(app: Any) -> None:
    import typer

    from ..encoder.config import EncoderConfig
    from ..encoder.train import TrainOptions

    A = EncoderConfig.__dataclass_fields__
    T = TrainOptions.__dataclass_fields__
    enc = typer.Typer(help="Train and inspect self-supervised spectral encoders (the transformer featurizer).",
                      no_args_is_help=True)
    app.add_typer(enc, name="encoder")

    @enc.command("train")
    def train(
        store: Path = typer.Argument(..., help="Feature store made by the raw featurizer (stx featurize)."),
        output: Path = typer.Option(..., "-o", "--output", help="Encoder directory to write."),
        width: int = typer.Option(A["width"].default, help="Token width."),
        depth: int = typer.Option(A["depth"].default, help="Transformer blocks."),
        heads: int = typer.Option(A["heads"].default, help="Attention heads."),
        patch: int = typer.Option(A["patch"].default, help="Pixels per patch token."),
        stride: int = typer.Option(A["stride"].default, help="Pixels between patch starts."),
        mlp_ratio: float = typer.Option(A["mlp_ratio"].default, help="MLP hidden width / width."),
        dropout: float = typer.Option(A["dropout"].default, help="Dropout in the blocks."),
        mask_frac: float = typer.Option(T["mask_frac"].default, help="Fraction of patch tokens masked."),
        mask_chunk: int = typer.Option(T["mask_chunk"].default, help="Tokens per contiguous masked chunk."),
        epochs: int = typer.Option(T["epochs"].default, help="Maximum epochs."),
        batch_size: int = typer.Option(T["batch_size"].default, help="Spectra per step."),
        lr: float = typer.Option(T["lr"].default, help="Peak learning rate (AdamW)."),
        weight_decay: float = typer.Option(T["weight_decay"].default, help="AdamW weight decay."),
        warmup_frac: float = typer.Option(T["warmup_frac"].default, help="Fraction of steps of linear warm-up."),
        patience: int = typer.Option(T["patience"].default, help="Stop after this many epochs without a better validation loss."),
        val_frac: float = typer.Option(T["val_frac"].default, help="Fraction of rows (in blocks) for validation."),
        aux_weight: float = typer.Option(T["aux_weight"].default, help="Weight of the attention-pooling objective (0: no attention pooling)."),
        gap_prob: float = typer.Option(T["gap_prob"].default, help="Augmentation: fraction of training spectra given random gaps."),
        gap_max: int = typer.Option(T["gap_max"].default, help="Augmentation: at most this many gaps per spectrum."),
        gap_max_px: int = typer.Option(T["gap_max_px"].default, help="Augmentation: longest gap (pixels)."),
        gap_pix_frac: float = typer.Option(T["gap_pix_frac"].default, help="Augmentation: up to this fraction of single pixels dropped."),
        max_rows: Optional[int] = typer.Option(None, help="Use only the first N rows of the store."),
        seed: int = typer.Option(T["seed"].default, help="Random seed (CPU runs are deterministic)."),
        device: str = typer.Option(T["device"].default, help="cpu or cuda."),
        amp: bool = typer.Option(False, "--amp", help="Mixed precision (CUDA only; bf16 where supported)."),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Pretrain a masked-patch spectral transformer on a raw feature store.

        Example: stx encoder train lamost.h5 -o enc/ && stx featurize files/ -o emb.h5 --featurizer transformer --set encoder=enc
        """
        from ..encoder.train import run_train

        console.set_quiet(quiet or json_out)
        arch = {"width": width, "depth": depth, "heads": heads, "patch": patch, "stride": stride,
                "mlp_ratio": mlp_ratio, "dropout": dropout}
        opts = TrainOptions(mask_frac=mask_frac, mask_chunk=mask_chunk, epochs=epochs, batch_size=batch_size,
                            lr=lr, weight_decay=weight_decay, warmup_frac=warmup_frac, patience=patience,
                            val_frac=val_frac, aux_weight=aux_weight, gap_prob=gap_prob, gap_max=gap_max,
                            gap_max_px=gap_max_px, gap_pix_frac=gap_pix_frac, max_rows=max_rows, seed=seed,
                            device=device, amp=amp, threads=threads)
        summary = run_train(store, output, arch, opts)
        console.print_summary("encoder train", summary, json_out)

    @enc.command("embed")
    def embed(store: Path = typer.Argument(..., help="Feature store made by the raw featurizer."),
              encoder: Path = typer.Option(..., "--encoder", "-e", help="Encoder directory."),
              output: Path = typer.Option(..., "-o", "--output", help="Embedding store to write."),
              pooling: str = typer.Option("mean", help="mean or attention."),
              device: str = typer.Option("cpu", help="cpu or cuda."),
              batch_size: Optional[int] = typer.Option(None, help="Spectra per forward pass."),
              threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
              json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
              quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output.")) -> None:
        """Embed a raw feature store (no re-reading of spectra): the same store `stx featurize
        --featurizer transformer --set encoder=DIR` makes from the files, labels included.

        Example: stx encoder embed lamost_raw.h5 --encoder enc/ -o lamost_emb.h5
        """
        console.set_quiet(quiet or json_out)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        summary = embed_store(store, output, encoder=encoder, pooling=pooling, device=device,
                              batch_size=batch_size)
        console.print_summary("encoder embed", summary, json_out)

    @enc.command("info")
    def info(path: Path = typer.Argument(..., help="Encoder directory."),
             json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Show an encoder's architecture, raw grid and training summary; verify its weights' sha256.

        `raw_settings` gives the --set options that make raw stores for this encoder (what
        `stx finetune --set target=encoder` needs as target store)."""
        from ..encoder.io import read_manifest, verify_weights

        m = read_manifest(path)
        _, sha = verify_weights(path, m)
        tr = m.get("training", {})
        rawinfo = m["raw_featurizer"]
        summary = {
            "path": str(path), "encoder_sha256": sha, "verified": True,
            "n_params": m["weights"].get("n_params"), "architecture": m["architecture"],
            "raw_featurizer": {k: rawinfo.get(k) for k in ("name", "version", "key")},
            "raw_settings": raw_settings(str(rawinfo.get("name", "raw")), dict(rawinfo.get("config", {}))),
            "grid": m.get("grid"), "pooling": {k: v for k, v in m.get("pooling", {}).items() if isinstance(v, bool)},
            "n_train": tr.get("n_train"), "n_val": tr.get("n_val"), "best_epoch": tr.get("best_epoch"),
            "epochs_run": tr.get("epochs_run"), "best_val_mse": tr.get("best_val_mse"),
            "val_mse_predicting_mean": tr.get("val_mse_predicting_mean"),
            "store_checksum": tr.get("store_checksum"), "stx_version": m.get("stx_version"),
            "created": m.get("created"),
        }
        console.print_summary("encoder", summary, json_out)



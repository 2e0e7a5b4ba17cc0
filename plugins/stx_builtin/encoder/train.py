"""Masked-patch pretraining of the spectral encoder on a ``raw`` feature store.

Data are read in contiguous blocks of rows (the store is chunked by rows): the validation split is
a seeded random set of blocks; every epoch shuffles the training blocks, reads a buffer of them and
shuffles rows within the buffer. A store that fits ``cache_gb`` is read once into memory.

Objective per batch: mask ``round(mask_frac * P)`` patch tokens in contiguous chunks of
``mask_chunk`` tokens, reconstruct the z-scored flux of the masked patches (MSE over their valid
pixels only), plus ``aux_weight`` x the attention-pooling auxiliary loss (see
:meth:`~.model.SpectralEncoder.pretrain_losses`). AdamW, linear warm-up then cosine decay, gradient
clipping, early stopping on the validation MSE (fixed validation masks, so epochs compare), and
the best epoch's weights are the ones saved.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stxcli import console
from stxcli.errors import StxError, UsageError

RAW_NAME = "raw"


@dataclass
class TrainOptions:
    mask_frac: float = 0.4
    mask_chunk: int = 10
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.05
    grad_clip: float = 1.0
    val_frac: float = 0.1
    val_max_rows: int = 2048
    patience: int = 3
    aux_weight: float = 0.1
    #: augmentation: fraction of training spectra given random gaps (ivar 0) in the input
    gap_prob: float = 0.5
    gap_max: int = 3
    gap_max_px: int = 60
    gap_pix_frac: float = 0.05
    #: rows with a larger masked-pixel fraction are not used for training
    max_masked_frac: float = 0.5
    max_rows: int | None = None
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    threads: int | None = None
    cache_gb: float = 4.0

    def check(self) -> None:
        bad = []
        if not 0.0 < self.mask_frac < 1.0:
            bad.append("--mask-frac must be in (0, 1)")
        if self.mask_chunk < 1:
            bad.append("--mask-chunk must be >= 1")
        if self.epochs < 1 or self.batch_size < 1:
            bad.append("--epochs and --batch-size must be >= 1")
        if self.lr <= 0:
            bad.append("--lr must be > 0")
        if not 0.0 < self.val_frac < 1.0:
            bad.append("--val-frac must be in (0, 1)")
        if self.patience < 1:
            bad.append("--patience must be >= 1")
        if (not 0.0 <= self.gap_prob <= 1.0 or self.gap_max < 0 or self.gap_max_px < 0
                or not 0.0 <= self.gap_pix_frac < 1.0):
            bad.append("--gap-prob and --gap-pix-frac must be in [0, 1), --gap-max and --gap-max-px >= 0")
        if self.aux_weight < 0:
            bad.append("--aux-weight must be >= 0")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            bad.append(f"--device must be cpu or cuda, got {self.device!r}")
        if self.amp and not self.device.startswith("cuda"):
            bad.append("--amp (mixed precision) needs --device cuda")
        if self.max_rows is not None and self.max_rows < 2:
            bad.append("--max-rows must be >= 2")
        if bad:
            raise UsageError("; ".join(bad))


@dataclass
class EpochLog:
    epoch: int
    train_mse: float
    train_aux: float
    val_mse: float
    val_aux: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    model: Any
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    n_train: int = 0
    n_val: int = 0
    n_skipped: int = 0
    val_mse_zero: float = float("nan")
    steps: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------- data


class BlockData:
    """Row blocks of a feature store, cached in memory when small enough."""

    def __init__(self, store: Any, n_rows: int, cache_gb: float) -> None:
        self.store = store
        self.n = n_rows
        self.block = 256 if n_rows >= 256 * 20 else max(1, n_rows // 20)
        self.n_blocks = math.ceil(n_rows / self.block)
        masked = store.quality.get("masked_frac")
        self.masked_frac = (np.asarray(masked[:n_rows], np.float32) if masked is not None
                            else np.zeros(n_rows, np.float32))
        nbytes = 2 * 4 * n_rows * store.dim
        self.cache: dict[str, np.ndarray] | None = None
        if nbytes <= cache_gb * 2**30:
            self.cache = {"features": np.empty((n_rows, store.dim), np.float32),
                          "ivar": np.empty((n_rows, store.dim), np.float32)}
            for s in range(0, n_rows, 8192):
                e = min(s + 8192, n_rows)
                d = store.read(s, e)
                self.cache["features"][s:e] = d["features"]
                self.cache["ivar"][s:e] = d["ivar"]

    def rows(self, b: int) -> tuple[int, int]:
        return b * self.block, min((b + 1) * self.block, self.n)

    def read_blocks(self, blocks: np.ndarray, max_masked: float) -> tuple[np.ndarray, np.ndarray]:
        fs, ivs = [], []
        for b in blocks:
            s, e = self.rows(int(b))
            if self.cache is not None:
                f, iv = self.cache["features"][s:e], self.cache["ivar"][s:e]
            else:
                d = self.store.read(s, e)
                f, iv = d["features"], d["ivar"]
            keep = self.masked_frac[s:e] <= max_masked
            fs.append(f[keep])
            ivs.append(iv[keep])
        if not fs:
            return np.zeros((0, self.store.dim), np.float32), np.zeros((0, self.store.dim), np.float32)
        return np.concatenate(fs), np.concatenate(ivs)


def _batches(data: BlockData, blocks: np.ndarray, batch_size: int, rng: np.random.Generator,
             max_masked: float, buffer_rows: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled training batches: block order shuffled, rows shuffled within a buffer; the
    remainder of a buffer is carried into the next so every batch but the last is full."""
    order = rng.permutation(blocks)
    per_buffer = max(1, buffer_rows // data.block)
    carry_f = np.zeros((0, data.store.dim), np.float32)
    carry_i = carry_f
    for g in range(0, len(order), per_buffer):
        f, iv = data.read_blocks(order[g:g + per_buffer], max_masked)
        f, iv = np.concatenate([carry_f, f]), np.concatenate([carry_i, iv])
        perm = rng.permutation(len(f))
        f, iv = f[perm], iv[perm]
        full = (len(f) // batch_size) * batch_size
        for s in range(0, full, batch_size):
            yield f[s:s + batch_size], iv[s:s + batch_size]
        carry_f, carry_i = f[full:], iv[full:]
    if len(carry_f):
        yield carry_f, carry_i


def split_blocks(n_blocks: int, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(n_blocks)
    n_val = min(max(1, int(round(val_frac * n_blocks))), n_blocks - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ------------------------------------------------------------------------------------ training


def resolve_device(device: str) -> Any:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StxError("--device cuda asked for, but torch sees no CUDA device (CPU-only torch build?)")
    return torch.device(device)


def lr_factor(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_frac`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


def evaluate(model: Any, f: np.ndarray, iv: np.ndarray, masks: Any, batch_size: int,
             device: Any, amp_dtype: Any = None) -> tuple[float, float, float]:
    """(masked-patch MSE, aux loss, MSE of predicting zero = the spectrum mean) over a fixed set,
    each weighted by its count of masked valid pixels (aux: by batch)."""
    import torch

    model.eval()
    se = n = se0 = 0.0
    aux_sum = aux_n = 0.0
    with torch.no_grad():
        for s in range(0, len(f), batch_size):
            xf = torch.from_numpy(f[s:s + batch_size]).to(device)
            xi = torch.from_numpy(iv[s:s + batch_size]).to(device)
            tm = masks[s:s + batch_size].to(device)
            with _autocast(device, amp_dtype):
                out = model.pretrain_losses(xf, xi, tm)
            cnt = float(out["n_masked_px"])
            se += float(out["mse"]) * cnt
            n += cnt
            values, valid, _ = model.prepare(xf, xi)
            w = (valid & tm[..., None]).float()
            se0 += float((w * values ** 2).sum())
            aux_sum += float(out["aux"]) * len(xf)
            aux_n += len(xf)
    model.train()
    return se / max(n, 1.0), aux_sum / max(aux_n, 1.0), se0 / max(n, 1.0)


def _autocast(device: Any, amp_dtype: Any) -> Any:
    import contextlib

    import torch

    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_encoder(store: Any, config: Any, opts: TrainOptions) -> TrainResult:
    """Pretrain a :class:`~.model.SpectralEncoder` of architecture ``config`` on ``store``."""
    import torch

    from .model import SpectralEncoder, contiguous_chunk_mask, random_gaps

    opts.check()
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    amp_dtype = None
    if opts.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    t0 = time.perf_counter()
    n_rows = store.n if opts.max_rows is None else min(store.n, int(opts.max_rows))
    data = BlockData(store, n_rows, opts.cache_gb)
    train_blocks, val_blocks = split_blocks(data.n_blocks, opts.val_frac, opts.seed)
    vf, viv = data.read_blocks(val_blocks, opts.max_masked_frac)
    vf, viv = vf[:opts.val_max_rows], viv[:opts.val_max_rows]
    n_train = int(sum((data.masked_frac[slice(*data.rows(int(b)))] <= opts.max_masked_frac).sum()
                      for b in train_blocks))
    n_skipped = int((data.masked_frac > opts.max_masked_frac).sum())
    if n_train < 1 or len(vf) < 1:
        raise StxError(f"{store.path}: too few usable spectra to train an encoder ({n_train} for training, "
                       f"{len(vf)} for validation; {n_skipped} skipped with masked fraction > "
                       f"{opts.max_masked_frac})")

    torch.manual_seed(opts.seed)
    model = SpectralEncoder(config).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n.endswith("pos_embed")]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=opts.lr, betas=(opts.beta1, opts.beta2))
    steps_per_epoch = math.ceil(n_train / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    warmup = max(1, int(round(opts.warmup_frac * total)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: lr_factor(s, total, warmup, opts.min_lr_frac))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    mask_gen = torch.Generator().manual_seed(opts.seed + 1)
    val_masks = contiguous_chunk_mask(len(vf), config.n_patches, opts.mask_frac, opts.mask_chunk,
                                      torch.Generator().manual_seed(opts.seed + 2))
    rng = np.random.default_rng([opts.seed, 11])
    result = TrainResult(model=model, n_train=n_train, n_val=len(vf), n_skipped=n_skipped)
    best = math.inf
    best_state: dict[str, Any] | None = None
    bad_epochs = 0
    console.info(f"encoder: {n_train} training / {len(vf)} validation spectra ({n_skipped} skipped), "
                 f"{config.n_patches} patches, device {device}, torch threads {torch.get_num_threads()}")
    step = 0
    with console.progress("encoder", total=total) as bar:
        for epoch in range(1, opts.epochs + 1):
            te = time.perf_counter()
            sum_mse = sum_aux = 0.0
            nb = 0
            for f, iv in _batches(data, train_blocks, opts.batch_size, rng, opts.max_masked_frac):
                xf = torch.from_numpy(f).to(device, non_blocking=True)
                xi = random_gaps(torch.from_numpy(iv), opts.gap_prob, opts.gap_max, opts.gap_max_px,
                                 opts.gap_pix_frac, mask_gen).to(device, non_blocking=True)
                tm = contiguous_chunk_mask(len(f), config.n_patches, opts.mask_frac, opts.mask_chunk,
                                           mask_gen).to(device)
                with _autocast(device, amp_dtype):
                    out = model.pretrain_losses(xf, xi, tm)
                    loss = out["mse"] + opts.aux_weight * out["aux"]
                if not torch.isfinite(loss):
                    raise StxError(f"encoder training diverged at epoch {epoch} step {step} (loss {float(loss)}); "
                                   "lower --lr or check the store for extreme values")
                optim.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optim)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
                    scaler.step(optim)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
                    optim.step()
                sched.step()
                step += 1
                nb += 1
                sum_mse += float(out["mse"].detach())
                sum_aux += float(out["aux"].detach())
                bar.advance(1)
                bar.update(status=f"epoch {epoch} mse {sum_mse / nb:.4f}")
            val_mse, val_aux, val_zero = evaluate(model, vf, viv, val_masks, max(opts.batch_size, 64),
                                                  device, amp_dtype)
            result.val_mse_zero = val_zero
            log = EpochLog(epoch, sum_mse / max(nb, 1), sum_aux / max(nb, 1), val_mse, val_aux,
                           float(sched.get_last_lr()[0]), time.perf_counter() - te)
            result.history.append(log)
            console.info(f"epoch {epoch}: train mse {log.train_mse:.4f}, val mse {val_mse:.4f} "
                         f"(predicting the mean: {val_zero:.4f}), val aux {val_aux:.4f}, {log.seconds:.0f} s")
            if val_mse < best:
                best, bad_epochs, result.best_epoch = val_mse, 0, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
                if bad_epochs >= opts.patience:
                    result.stopped_early = epoch < opts.epochs
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.steps = step
    result.seconds = time.perf_counter() - t0
    return result


def run_train(store_path: str | Path, out_dir: str | Path, arch: dict[str, Any],
              opts: TrainOptions) -> dict[str, Any]:
    """``stx encoder train``: train on a raw store and write the encoder directory; return a summary."""
    import torch

    from stxcli.store import FeatureStore

    from .io import save_encoder
    from .model import EncoderConfig, count_parameters

    opts.check()
    with FeatureStore.open(store_path) as st:
        if st.featurizer_name != RAW_NAME:
            raise StxError(f"{st.path}: an encoder trains on a store made by the {RAW_NAME!r} featurizer; "
                           f"this one was made by {st.featurizer_name!r}")
        try:
            config = EncoderConfig.from_dict({"n_pix": st.dim, **arch})
        except (TypeError, ValueError) as exc:
            raise UsageError(f"bad encoder architecture: {exc}") from exc
        result = train_encoder(st, config, opts)
        axis = st.axis
        manifest = {
            "raw_featurizer": {"name": st.featurizer_name, "version": st.featurizer_version,
                               "config": st.featurizer_config, "key": st.featurizer_key},
            "grid": {"n_pix": st.dim,
                     "first": float(axis[0]) if axis is not None and len(axis) else None,
                     "last": float(axis[-1]) if axis is not None and len(axis) else None},
            "pooling": {"mean": True, "attention": opts.aux_weight > 0,
                        "attention_training": "auxiliary objective: the attention-pooled vector of the "
                                              "masked spectrum predicts every patch's mean z-flux"},
            "training": {
                "store": str(Path(store_path).resolve()), "store_checksum": st.checksum,
                "store_rows": st.n, "n_train": result.n_train, "n_val": result.n_val,
                "n_skipped": result.n_skipped, "options": asdict(opts),
                "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                "stopped_early": result.stopped_early, "steps": result.steps,
                "best_val_mse": min(h.val_mse for h in result.history),
                "val_mse_predicting_mean": result.val_mse_zero,
                "history": [asdict(h) for h in result.history],
                "seconds": round(result.seconds, 2), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            },
        }
    written = save_encoder(out_dir, result.model, manifest)
    return {"output": str(out_dir), "encoder_sha256": written["weights"]["sha256"],
            "n_params": count_parameters(result.model), "width": config.width, "depth": config.depth,
            "n_patches": config.n_patches, "n_train": result.n_train, "n_val": result.n_val,
            "best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "best_val_mse": manifest["training"]["best_val_mse"],
            "val_mse_predicting_mean": result.val_mse_zero, "seconds": round(result.seconds, 1)}

"""Models (issue 4): the cost of stx's training loop and predict next to bare torch, same run.

    python benchmarks/bench_models.py [--quick] [--n 100000] [--dim 3500] [--threads 2]

1. Pretrain epoch: ``stx``'s loop (store-backed rows, masked NLL, gradient clipping, validation
   pass and early-stopping bookkeeping every epoch) against a bare torch loop of the same MLP
   (3500-512-256-6, AdamW, Gaussian NLL) on in-memory tensors holding the same training rows.
   Target: stx epoch <= 1.25x the bare epoch.
2. Predict from a feature store (``stx predict``: chunked HDF5 reads, the model, the
   training-domain scores, delta-method errors, flags, the streamed FITS catalog) against bare
   MLP inference on in-memory tensors. Target: >= 0.8x the bare rate.
The feature store is synthetic (random features with labels linear in them): speed does not
depend on the values. Writes benchmarks/results/models.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

os.environ.setdefault("STX_LOAD_PLUGINS", "stx")


def make_store(path: Path, n: int, dim: int, seed: int = 0) -> None:
    """A store of ``n`` rows written in slabs (flat memory)."""
    from stxcli.io import atomic_file
    from stxcli.protocols import FeatureBatch
    from stxcli.spectra import SpectrumMeta
    from stxcli.store import StoreWriter

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, 3)) / math.sqrt(dim)
    labels = []
    with atomic_file(path) as tmp:
        sw = StoreWriter(tmp, featurizer_name="bench", featurizer_version="0", featurizer_config={}, dim=dim)
        try:
            for s in range(0, n, 10000):
                m = min(10000, n - s)
                x = (1 + 0.1 * rng.normal(size=(m, dim))).astype(np.float32)
                z = (x - 1) @ w * 10
                labels.append(np.stack([10 ** (3.75 + 0.05 * z[:, 0]), 3 + z[:, 1], -0.5 + 0.5 * z[:, 2]], 1))
                meta = SpectrumMeta.empty(m, "bench", "bench", s)
                q = {"snr": np.full(m, 30, np.float32), "masked_frac": np.zeros(m, np.float32),
                     "flags": np.zeros(m, np.int32)}
                sw.append(FeatureBatch(x, np.full_like(x, 100.0), q, meta))
            lab = np.concatenate(labels)
            sw.set_labels({"teff": lab[:, 0], "logg": lab[:, 1], "feh": lab[:, 2]})
            sw.finish()
        finally:
            sw.close()


def bare_epoch(x, y, hidden: list[int], batch: int, lr: float, seed: int) -> tuple[float, int]:
    """One epoch of a plain loop: randperm, index, forward, Gaussian NLL, AdamW step."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = x.shape[1]
    for h in hidden:
        layers += [nn.Linear(d, h), nn.SiLU()]
        d = h
    layers.append(nn.Linear(d, 2 * y.shape[1]))
    net = nn.Sequential(*layers)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    L = y.shape[1]
    t0 = time.perf_counter()
    perm = torch.randperm(x.shape[0])
    for s in range(0, x.shape[0], batch):
        idx = perm[s:s + batch]
        out = net(x[idx])
        mean, logvar = out[:, :L], out[:, L:]
        loss = 0.5 * (logvar + (y[idx] - mean) ** 2 * torch.exp(-logvar)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, sum(p.numel() for p in net.parameters())


def bare_inference(x, hidden: list[int], n_labels: int, chunk: int) -> float:
    import torch

    from stxcli.model import make_head

    net = make_head("mlp", {"hidden": hidden, "dropout": 0.0}).build(x.shape[1], n_labels).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            net(x[s:s + chunk])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k rows instead of 100k")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--dim", type=int, default=3500)
    ap.add_argument("--hidden", default="512,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="stx epochs timed (the first is included)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    n = args.n or (20000 if args.quick else 100000)
    hidden = [int(h) for h in args.hidden.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    from stxcli import console
    from stxcli.predict import run_predict
    from stxcli.store import FeatureStore
    from stxcli.train import TrainOptions, pretrain

    console.set_quiet(True)
    tmp = Path(tempfile.mkdtemp(dir=args.workdir))
    store = tmp / "bench.h5"
    t0 = time.perf_counter()
    make_store(store, n, args.dim)
    t_store = time.perf_counter() - t0

    # -- pretrain: stx loop (rows cached in memory, as they fit) vs bare loop on the same rows
    opts = TrainOptions(epochs=args.epochs, patience=args.epochs + 1, threads=args.threads, seed=0)
    t0 = time.perf_counter()
    s = pretrain([store], tmp / "model", head_config={"hidden": hidden, "dropout": 0.0}, opts=opts)
    t_pretrain_total = time.perf_counter() - t0
    import json

    hist = json.loads((tmp / "model" / "manifest.json").read_text())["training"]["history"]
    stx_epoch = min(h["epoch_s"] for h in hist)  # best epoch: the machine is shared
    stx_train_only = min(h["train_s"] for h in hist)
    n_train = s["n_train"]
    with FeatureStore.open(store) as st:
        x = torch.from_numpy(st.read(0, n_train)["features"])
    y = torch.randn(n_train, 3)
    bare = [bare_epoch(x, y, hidden, 256, 1e-3, seed=k)[0] for k in range(args.epochs)]
    bare_ep = float(min(bare))

    # -- predict from the store vs bare inference
    t_pred = math.inf
    for _ in range(2):  # best of two: the machine is shared
        t0 = time.perf_counter()
        p = run_predict(tmp / "model", [str(store)], tmp / "pred.fits", chunk_rows=4096, threads=args.threads)
        t_pred = min(t_pred, time.perf_counter() - t0)
    with FeatureStore.open(store) as st:
        xall = torch.from_numpy(st.read(0, st.n)["features"])
    t_bare_inf = min(bare_inference(xall, hidden, 3, 4096) for _ in range(2))
    del xall
    result = {
        "n": n, "dim": args.dim, "hidden": hidden, "threads": args.threads, "n_train": n_train,
        "store_write_s": round(t_store, 2),
        "pretrain": {
            "stx_epoch_s": round(stx_epoch, 3), "stx_epoch_without_validation_s": round(stx_train_only, 3),
            "bare_epoch_s": round(bare_ep, 3),
            "ratio_stx_over_bare": round(stx_epoch / bare_ep, 3), "target_max_ratio": 1.25,
            "stx_total_s": round(t_pretrain_total, 2),
            "note": "best of the timed epochs on each side; the stx epoch includes the validation "
                    "pass and bookkeeping; total adds reading the store, feature statistics, the "
                    "domain PCA and saving",
        },
        "predict": {
            "stx_spectra_per_s": round(n / t_pred, 1), "bare_spectra_per_s": round(n / t_bare_inf, 1),
            "ratio_stx_over_bare": round((n / t_pred) / (n / t_bare_inf), 3), "target_min_ratio": 0.8,
            "stx_s": round(t_pred, 2), "bare_s": round(t_bare_inf, 2), "summary_time_s": p["time_s"],
        },
    }
    write("models", result)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

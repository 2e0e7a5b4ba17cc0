"""Embedding throughput of the transformer featurizer next to raw featurization (issue 5).

    python benchmarks/bench_encoder.py [--encoder DIR] [--n 512] [--quick]

Spectra: the 40 real LAMOST DR10 files in ../shared/data/lamost-dr10/spectra, featurized with the
default ``raw`` featurizer (3900-8800 A, 3535 pixels) and tiled to ``--n`` rows. Encoder: ``--encoder
DIR`` (made by `stx encoder train`), or a freshly initialised default-size one (width 128, 4 blocks,
4 heads: throughput does not depend on the weights' values). Measured, best of 3, in one run:

* raw: ``RawFeaturizer.transform`` file by file (what `stx featurize` does per LAMOST file);
* embed: the encoder on raw features, batches of 64, with 2 and with 1 torch threads (stx featurize
  --workers N sets 1 thread per worker process);
* transformer: the whole featurizer (raw + embed) file by file, 1 torch thread (stx featurize sets
  1 thread per process: for a batch of one spectrum a second thread only adds waiting);
* train: pretraining steps (batch 32, forward + backward + AdamW) with 2 threads.

Writes benchmarks/results/encoder.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, best_of, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", type=Path, help="encoder directory (default: a fresh default-size one)")
    ap.add_argument("--n", type=int, default=512, help="spectra for the embedding timing")
    ap.add_argument("--quick", action="store_true", help="n=128, one repeat")
    args = ap.parse_args()
    n = 128 if args.quick else args.n
    repeat = 1 if args.quick else 3
    load_before = os.getloadavg()[0]

    import torch

    from stxcli.pipeline import build_featurizer
    from stxcli.registry import get_registry
    from stx_builtin.encoder.config import EncoderConfig
    from stx_builtin.encoder.io import save_encoder
    from stx_builtin.encoder.model import SpectralEncoder, contiguous_chunk_mask

    files = sorted((SHARED / "lamost-dr10" / "spectra").glob("*.fits*"))
    reader = get_registry().get("reader", "lamost")
    batches = [b.validate() for p in files for b in reader.read(p)]
    raw = build_featurizer("raw", {})
    n_files = len(batches)

    def run_raw() -> list:
        return [raw.transform(b) for b in batches]

    torch.set_num_threads(2)
    t_raw = best_of(run_raw, repeat)
    fbs = run_raw()
    feats = np.concatenate([fb.features for fb in fbs])
    ivars = np.concatenate([fb.ivar for fb in fbs])
    idx = np.arange(n) % len(feats)
    feats, ivars = feats[idx], ivars[idx]

    with tempfile.TemporaryDirectory() as tmp:
        enc_dir = args.encoder
        if enc_dir is None:
            torch.manual_seed(0)
            model = SpectralEncoder(EncoderConfig(n_pix=raw.dim)).eval()
            enc_dir = Path(tmp) / "enc"
            save_encoder(enc_dir, model, {"raw_featurizer": {"name": "raw", "version": raw.version,
                                                             "config": raw.config()},
                                          "grid": {"n_pix": raw.dim}, "pooling": {"mean": True}})
        tf = build_featurizer("transformer", {"encoder": str(enc_dir)})
        arch = tf.encoder.config
        tf.embed(feats[:64], ivars[:64])  # warm-up
        t_embed2 = best_of(lambda: tf.embed(feats, ivars), repeat)
        torch.set_num_threads(1)
        t_embed1 = best_of(lambda: tf.embed(feats, ivars), repeat)
        t_tf = best_of(lambda: [tf.transform(b) for b in batches], repeat)  # 1 thread, as stx featurize
        torch.set_num_threads(2)

        model = SpectralEncoder(arch).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        xf, xi = torch.from_numpy(feats[:32]), torch.from_numpy(ivars[:32])
        g = torch.Generator().manual_seed(0)

        def step() -> None:
            tm = contiguous_chunk_mask(32, arch.n_patches, 0.4, 10, g)
            out = model.pretrain_losses(xf, xi, tm)
            loss = out["mse"] + 0.1 * out["aux"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        step()
        n_steps = 2 if args.quick else 5
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        t_train = (time.perf_counter() - t0) / n_steps

    write("encoder", {
        "command": "python benchmarks/bench_encoder.py" + (" --quick" if args.quick else f" --n {n}"),
        "torch": torch.__version__,
        "encoder": {"architecture": arch.to_dict(), "n_tokens": arch.n_tokens,
                    "n_params": int(sum(p.numel() for p in tf.encoder.parameters())),
                    "source": str(args.encoder) if args.encoder else "fresh (random init)"},
        "raw_lamost_files": {"n": n_files, "seconds": round(t_raw, 3),
                             "spectra_per_s": round(n_files / t_raw, 1), "threads": "numpy"},
        "embed_2_threads": {"n": n, "seconds": round(t_embed2, 3), "spectra_per_s": round(n / t_embed2, 1)},
        "embed_1_thread": {"n": n, "seconds": round(t_embed1, 3), "spectra_per_s": round(n / t_embed1, 1)},
        "transformer_featurizer_files_1_thread": {"n": n_files, "seconds": round(t_tf, 3),
                                         "spectra_per_s": round(n_files / t_tf, 1)},
        "pretrain_2_threads": {"batch": 32, "seconds_per_step": round(t_train, 3),
                               "spectra_per_s": round(32 / t_train, 1)},
        "load_avg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "note": "timings are best of repeats; a load average above the core count means other jobs "
                "shared the CPU and the rates are lower bounds",
    })


if __name__ == "__main__":
    main()

"""Encoder directories: ``manifest.json`` + ``encoder.safetensors``.

The manifest records the format, the architecture (:class:`~.model.EncoderConfig`), the ``raw``
featurizer (name, version, full config, key, grid) the encoder was trained on, the training run
(store checksum, options, per-epoch losses) and ``weights.sha256``, the sha256 of the weight file.
That sha256 is the encoder's identity: the ``transformer`` featurizer records it as
``encoder_sha256`` and refuses a directory whose weights hash differently. Nothing is unpickled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from stxcli import __version__
from stxcli.errors import ModelFileError
from stxcli.io import atomic_dir
from stxcli.pipeline import sha256_file

FORMAT = "stx-encoder"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "encoder.safetensors"


def save_encoder(out_dir: str | Path, model: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``model`` (a :class:`~.model.SpectralEncoder`) and ``manifest`` atomically into
    ``out_dir`` (an existing directory is replaced); return the manifest as written."""
    from safetensors.torch import save_file

    from .model import count_parameters

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        full = dict(manifest)
        full.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "stx_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "architecture": model.config.to_dict(),
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS),
                        "n_params": count_parameters(model)},
        })
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the encoder directory ``path`` (one-line errors)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such encoder directory")
    if not path.is_dir():
        raise ModelFileError(f"{path}: an encoder is a directory (made by `stx encoder train`), not a file")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise ModelFileError(f"{path}: not an encoder directory ({MANIFEST} missing)")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{mpath}: unreadable encoder manifest ({exc})") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ModelFileError(f"{mpath}: not an stx encoder manifest (format is not {FORMAT!r})")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{mpath}: encoder format version {m.get('format_version')} is newer than "
                             f"this stx understands ({FORMAT_VERSION}); upgrade stx")
    for key in ("architecture", "weights", "raw_featurizer"):
        if key not in m:
            raise ModelFileError(f"{mpath}: encoder manifest lacks {key!r}")
    return m


def verify_weights(path: str | Path, manifest: dict[str, Any],
                   expected_sha256: str | None = None) -> tuple[Path, str]:
    """Hash the weight file; it must match the manifest and, when given, ``expected_sha256``."""
    path = Path(path)
    wfile = path / str(manifest["weights"].get("file", WEIGHTS))
    if not wfile.exists():
        raise ModelFileError(f"{path}: encoder weights {wfile.name} missing")
    actual = sha256_file(wfile)
    recorded = str(manifest["weights"].get("sha256", ""))
    if actual != recorded:
        raise ModelFileError(f"{wfile}: sha256 {actual[:16]}... differs from the manifest's "
                             f"{recorded[:16]}...: the encoder weights were modified or truncated")
    if expected_sha256 and actual != expected_sha256:
        raise ModelFileError(f"{wfile}: sha256 {actual[:16]}... differs from the recorded encoder_sha256 "
                             f"{expected_sha256[:16]}...: this is not the encoder the features were made with")
    return wfile, actual


def load_encoder(path: str | Path, expected_sha256: str | None = None,
                 device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """``(model, manifest)``: the verified encoder in eval mode on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import EncoderConfig, SpectralEncoder

    manifest = read_manifest(path)
    wfile, _ = verify_weights(path, manifest, expected_sha256)
    try:
        cfg = EncoderConfig.from_dict(dict(manifest["architecture"]))
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: bad encoder architecture in the manifest ({exc})") from exc
    model = SpectralEncoder(cfg)
    try:
        tensors = load_file(str(wfile), device="cpu")
        model.load_state_dict(tensors, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"{wfile}: weights do not fit the manifest's architecture ({msg})") from exc
    return model.eval().to(device), manifest

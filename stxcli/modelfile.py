"""Model directories: safetensors weights plus a JSON manifest, never pickle.

A model directory holds ``manifest.json`` and the files it lists under ``files`` with their
sha256. Every other file (weights, adapter configs, an embedded base model) is hashed when the
directory is written and checked when it is read, so a tampered or truncated file is a one-line
:class:`~stxcli.errors.ModelFileError` before any byte of it is interpreted. Weights are read with
``safetensors`` only (never ``torch.load``). See docs/models.md for the manifest fields.

This module imports numpy and the standard library only; torch stays out of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError
from .io import jsonable
from .io import atomic_dir

MANIFEST = "manifest.json"
FORMAT = "stx-model"
FORMAT_VERSION = 1
#: File names of the peft-like adapter layout.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def dump_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=jsonable, allow_nan=False) + "\n")


def _to_numpy(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tensors.items():
        if hasattr(v, "detach"):  # a torch tensor, converted without importing torch here
            v = v.detach().cpu().contiguous().numpy()
        out[k] = np.ascontiguousarray(v)
    return out


def save_tensors(path: Path, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (numpy arrays or torch tensors) as one safetensors file."""
    from safetensors.numpy import save_file

    save_file(_to_numpy(tensors), str(path), metadata={"format": "pt", **(metadata or {})})


def write_model_dir(out: str | os.PathLike[str], manifest: dict[str, Any], *,
                    tensors: Mapping[str, Mapping[str, Any]] | None = None,
                    json_files: Mapping[str, Any] | None = None,
                    copy_dirs: Mapping[str, Path] | None = None) -> str:
    """Write a model directory atomically; return the sha256 of its manifest.

    ``tensors`` maps a relative file name to the tensors it holds, ``json_files`` a relative file
    name to a JSON object, ``copy_dirs`` a relative folder to a directory copied in (an embedded
    base model). ``manifest['files']`` is filled with the sha256 of every file written.
    """
    manifest = dict(manifest)
    manifest["format"], manifest["format_version"] = FORMAT, FORMAT_VERSION
    with atomic_dir(out) as tmp:
        for rel, src in (copy_dirs or {}).items():
            shutil.copytree(src, tmp / rel)
        for rel, t in (tensors or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            save_tensors(tmp / rel, t)
        for rel, obj in (json_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            dump_json(obj, tmp / rel)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and p.relative_to(tmp).as_posix() != MANIFEST:
                files[p.relative_to(tmp).as_posix()] = sha256_file(p)
        manifest["files"] = files
        dump_json(manifest, tmp / MANIFEST)
        digest = sha256_file(tmp / MANIFEST)
    return digest


#: a model directory's folder of featurizer assets (an embedded base's encoder)
ASSETS = "assets"


class ModelDir:
    """A model directory opened for reading: the manifest, and verified access to its files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ModelFileError(f"{self.path}: no such model directory")
        if not self.path.is_dir():
            raise ModelFileError(f"{self.path}: not a model directory (a model is a directory with {MANIFEST})")
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise ModelFileError(f"{self.path}: not a model directory ({MANIFEST} is missing)")
        raw = mpath.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"{mpath}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ModelFileError(f"{mpath}: not an stx model manifest (format is not {FORMAT!r})")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelFileError(f"{mpath}: model format version {manifest['format_version']} is newer "
                                 f"than this stx understands ({FORMAT_VERSION}); upgrade stx")
        self.manifest: dict[str, Any] = manifest
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self._verified: set[str] = set()

    def assets(self) -> list[Path]:
        """The folder of featurizer assets (``stx finetune --embed-base`` copies the base's encoder
        there) as a one-item list, or an empty one when the model has none."""
        d = self.path / ASSETS
        return [d] if d.is_dir() else []

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.resolve().name)

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "pretrained"))

    def file(self, rel: str) -> Path:
        """The path of a listed file, after checking its sha256 against the manifest."""
        files = self.manifest.get("files", {})
        if rel not in files:
            raise ModelFileError(f"{self.path}: manifest lists no file {rel!r}")
        p = self.path / rel
        if rel in self._verified:
            return p
        if not p.is_file():
            raise ModelFileError(f"{p}: weight file is missing from the model directory")
        if sha256_file(p) != files[rel]:
            raise ModelFileError(f"{p}: sha256 does not match the manifest (file tampered with or truncated)")
        self._verified.add(rel)
        return p

    def tensors(self, rel: str) -> dict[str, np.ndarray]:
        """Every tensor of a safetensors file, verified first (copies, the file is not kept open)."""
        from safetensors.numpy import load_file

        p = self.file(rel)
        try:
            loaded = load_file(str(p))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelFileError(f"{p}: not a readable safetensors file ({exc})") from exc
        return {k: np.array(v) for k, v in loaded.items()}

    def json(self, rel: str) -> Any:
        p = self.file(rel)
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"{p}: not valid JSON ({exc})") from exc

    def verify(self) -> None:
        """Check the sha256 of every listed file."""
        for rel in self.manifest.get("files", {}):
            self.file(rel)

    def resolve_base(self) -> "ModelDir":
        """The base model of a fine-tuned model: embedded, or referenced by path + sha256."""
        base = self.manifest.get("base")
        if not base:
            raise ModelFileError(f"{self.path}: a {self.kind} model has no base")
        candidates = []
        if base.get("embedded"):
            candidates.append(self.path / base["path"])
        else:
            candidates.append(self.path / base["path"])
            if base.get("abs_path"):
                candidates.append(Path(base["abs_path"]))
        found = next((c for c in candidates if (c / MANIFEST).is_file()), None)
        if found is None:
            where = " or ".join(str(c) for c in candidates)
            raise ModelFileError(f"{self.path}: its base model is not found at {where} "
                                 f"(move the base back, or fine-tune with --embed-base)")
        bdir = ModelDir(found)
        if bdir.manifest_sha256 != base.get("manifest_sha256"):
            raise ModelFileError(f"{found}: base model manifest sha256 differs from the one {self.path} was "
                                 f"fine-tuned from (base changed since)")
        return bdir

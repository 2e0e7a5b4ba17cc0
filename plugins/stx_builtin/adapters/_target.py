"""What an adapter fine-tunes: the head (default), the encoder in front of it, or both.

Torch-free (imported at CLI start-up by the adapter plugin modules). ``target`` is one of
``head``, ``encoder``, ``encoder+head`` (``head+encoder`` is accepted as the same). ``encoder``
needs a base model trained on the embeddings of an encoder featurizer (``transformer``); it then
fine-tunes on RAW features of the target stars (see docs/models.md, "Reaching into the encoder").
"""

from __future__ import annotations

from stxcli.errors import UsageError

TARGETS = ("head", "encoder", "encoder+head")


def parse_target(value: object, adapter: str) -> str:
    """The canonical target string; a one-line UsageError for anything else."""
    text = str(value).strip().lower().replace(" ", "")
    parts = sorted(set(p for p in text.replace(",", "+").split("+") if p))
    if not parts or any(p not in ("head", "encoder") for p in parts):
        raise UsageError(f"{adapter}: target must be one of {', '.join(TARGETS)}, got {value!r}")
    return "+".join(parts)  # sorted: "encoder+head"


def has_head(target: str) -> bool:
    return "head" in target.split("+")


def has_encoder(target: str) -> bool:
    return "encoder" in target.split("+")

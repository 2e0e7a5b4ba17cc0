"""The encoder architecture settings (torch-free, so the CLI can show defaults without torch)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

POOLINGS = ("mean", "attention")


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of an encoder; saved in the encoder manifest."""

    n_pix: int
    patch: int = 20
    stride: int = 10
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    #: floor of the per-spectrum std used for z-scoring (a perfectly flat spectrum stays finite)
    std_floor: float = 1e-3

    def __post_init__(self) -> None:
        problems = []
        if self.patch < 1:
            problems.append("patch must be >= 1")
        if not 1 <= self.stride <= self.patch:
            problems.append("stride must be between 1 and patch")
        if self.n_pix < self.patch:
            problems.append(f"the spectrum ({self.n_pix} px) is shorter than one patch ({self.patch})")
        if self.width < 1 or self.depth < 1 or self.heads < 1:
            problems.append("width, depth and heads must be >= 1")
        elif self.width % self.heads:
            problems.append(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.std_floor <= 0:
            problems.append("std_floor must be > 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def n_patches(self) -> int:
        return 1 + math.ceil((self.n_pix - self.patch) / self.stride)

    @property
    def n_padded(self) -> int:
        """Pixels after right-padding so the last patch ends at the last pixel or beyond."""
        return (self.n_patches - 1) * self.stride + self.patch

    @property
    def n_tokens(self) -> int:
        return self.n_patches + 1  # + the scale token

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown encoder setting(s): {', '.join(unknown)}")
        return cls(**d)

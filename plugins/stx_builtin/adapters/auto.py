"""The ``auto`` adapter: train several candidate adapters on one split and keep, per label, the
one with the best validation score (the best strategy depends on the label).

Config (``--set key=value`` on ``stx finetune --adapter auto``):

* ``candidates``: adapter names to try (default ``residual,lora,full``; any installed adapter);
* ``metric``: validation score, lower is better: ``mae`` (default) or ``scatter`` (robust);
* ``candidate_config``: per-candidate configuration, e.g. ``{"lora": {"r": 8}}``.

Every candidate trains on the same training stars with the same seed and is scored on the same
validation stars. The model directory keeps the chosen candidates under ``adapters/<name>/``
and its manifest records the choice per label and every score; predict uses, for each label,
the adapter chosen for it.
"""

from __future__ import annotations

from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl

METRICS = ("mae", "scatter")


class AutoAdapter:
    name = "auto"
    version = "1.0"
    description = "per label, the candidate adapter with the best validation score"

    def __init__(self, candidates: Any = ("residual", "lora", "full"), metric: str = "mae",
                 candidate_config: dict[str, dict[str, Any]] | None = None) -> None:
        if isinstance(candidates, str):
            candidates = [c for c in candidates.replace(" ", "").split(",") if c]
        self.candidates = list(dict.fromkeys(candidates))
        if not self.candidates:
            raise UsageError("auto: give at least one candidate adapter")
        if metric not in METRICS:
            raise UsageError(f"auto: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.metric = metric
        self.candidate_config = dict(candidate_config or {})
        unknown = set(self.candidate_config) - set(self.candidates)
        if unknown:
            raise UsageError(f"auto: candidate_config names non-candidates {sorted(unknown)}")

    def config(self) -> dict[str, Any]:
        return {"candidates": list(self.candidates), "metric": self.metric,
                "candidate_config": self.candidate_config}

    def choose(self, scores: dict[str, dict[str, float]]) -> dict[str, str]:
        """``scores[candidate][label]`` -> ``{label: best candidate}`` (ties: first candidate)."""
        labels = next(iter(scores.values())).keys()
        return {lab: min(self.candidates, key=lambda c: (scores[c][lab], self.candidates.index(c)))
                for lab in labels}


@hookimpl
def register_adapters(register: Any) -> None:
    register(AutoAdapter)

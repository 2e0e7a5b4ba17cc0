"""The ``mlp`` head: features -> a mean and a log-variance per label, optionally a deep ensemble.

Trained by the core loop (:mod:`stxcli.train`) with the heteroscedastic Gaussian negative
log-likelihood. Config (``--set key=value`` on ``stx pretrain``):

* ``hidden``: widths of the hidden layers, e.g. ``512,256`` (default); ``[]`` for a linear model;
* ``activation``: relu, gelu, silu (default), tanh, elu;
* ``dropout``: dropout after each hidden layer (default 0.1: pretraining sets of a few hundred
  to a few thousand stars overfit without it);
* ``ensemble``: number of independently initialised members K (default 1); the prediction's
  variance is then the members' mean variance plus the spread of their means;
* ``logvar_min`` / ``logvar_max``: soft bounds of the predicted log-variance (standardised space).
"""

from __future__ import annotations

from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl

ACTIVATION_NAMES = ("relu", "gelu", "silu", "tanh", "elu")


def parse_widths(value: Any) -> list[int]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, int):
        value = [value]
    try:
        widths = [int(v) for v in value]
    except (TypeError, ValueError):
        raise UsageError(f"hidden: expected comma-separated layer widths, got {value!r}") from None
    if any(w < 1 for w in widths):
        raise UsageError(f"hidden: layer widths must be >= 1, got {widths}")
    return widths


class MLPHead:
    name = "mlp"
    version = "1.0"
    description = "MLP with Gaussian mean + variance per label; optional deep ensemble"
    closed_form = False

    def __init__(self, hidden: Any = (512, 256), activation: str = "silu", dropout: float = 0.1,
                 ensemble: int = 1, logvar_min: float = -14.0, logvar_max: float = 4.0) -> None:
        self.hidden = parse_widths(hidden)
        if activation not in ACTIVATION_NAMES:
            raise UsageError(f"activation: choose from {', '.join(ACTIVATION_NAMES)}, got {activation!r}")
        self.activation = activation
        self.dropout = float(dropout)
        if not 0 <= self.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), got {dropout}")
        self.ensemble = int(ensemble)
        if self.ensemble < 1:
            raise UsageError(f"ensemble must be >= 1, got {ensemble}")
        self.logvar_min, self.logvar_max = float(logvar_min), float(logvar_max)
        if self.logvar_min >= self.logvar_max:
            raise UsageError("logvar_min must be below logvar_max")

    def config(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden), "activation": self.activation, "dropout": self.dropout,
                "ensemble": self.ensemble, "logvar_min": self.logvar_min, "logvar_max": self.logvar_max}

    def build(self, in_dim: int, n_labels: int) -> Any:
        from ._nets import MLPNet

        return MLPNet(in_dim, self.hidden, n_labels, self.activation, self.dropout, self.ensemble,
                      self.logvar_min, self.logvar_max)

    def training_defaults(self) -> dict[str, Any]:
        return {"lr": 1e-3, "weight_decay": 1e-4, "epochs": 100, "batch_size": 256, "patience": 10}


@hookimpl
def register_heads(register: Any) -> None:
    register(MLPHead)

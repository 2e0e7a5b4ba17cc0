"""The ``residual`` adapter: the pre-trained head stays frozen; a small trainable network adds a
correction to its mean (and log-variance) per label.

Config (``--set key=value`` on ``stx finetune --adapter residual``):

* ``input``: what the correction network sees: ``hidden`` (default: the base's last hidden
  layer, all ensemble members concatenated), ``features`` (the standardised features) or
  ``both``;
* ``hidden``: widths of its hidden layers (default ``64``; ``[]`` = a linear correction);
* ``activation``: relu, gelu, silu (default), tanh, elu;
* ``correct_logvar``: also correct the log-variance (default true).

The last layer is zero-initialised, so training starts exactly from the pre-trained prediction.
Saved as ``adapter_config.json`` + ``adapter_model.safetensors`` (keys ``delta.*``).
"""

from __future__ import annotations

from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl

INPUTS = ("hidden", "features", "both")


def _widths(value: Any) -> list[int]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, int):
        value = [value]
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise UsageError(f"hidden: expected layer widths, got {value!r}") from None
    if any(w < 1 for w in out):
        raise UsageError(f"hidden: widths must be >= 1, got {out}")
    return out


class ResidualAdapter:
    name = "residual"
    version = "1.0"
    description = "frozen base + zero-initialised residual network on its hidden state or features"

    def __init__(self, input: str = "hidden", hidden: Any = (64,), activation: str = "silu",
                 correct_logvar: bool = True) -> None:
        if input not in INPUTS:
            raise UsageError(f"input: choose from {', '.join(INPUTS)}, got {input!r}")
        if activation not in ("relu", "gelu", "silu", "tanh", "elu"):
            raise UsageError(f"activation: unknown {activation!r}")
        self.input, self.hidden, self.activation = input, _widths(hidden), activation
        self.correct_logvar = bool(correct_logvar)
        self._dims: dict[str, int] = {}

    def config(self) -> dict[str, Any]:
        return {"input": self.input, "hidden": list(self.hidden), "activation": self.activation,
                "correct_logvar": self.correct_logvar}

    def attach(self, base: Any) -> Any:
        from ._layers import ResidualNet

        n_labels = getattr(base, "n_labels", None)
        if n_labels is None:
            n_labels = base.linear.out_features if hasattr(base, "linear") else None
        if n_labels is None:
            raise UsageError("residual adapter: the base head does not say how many labels it predicts")
        in_features = _first_in_features(base)
        if self.input in ("hidden", "both"):
            if not hasattr(base, "forward_hidden") or not getattr(base, "hidden_dim", None):
                raise UsageError("residual adapter: this base head exposes no hidden state; "
                                 "use --set input=features")
            hdim = int(base.hidden_dim)
            in_dim = hdim if self.input == "hidden" else hdim + in_features
        else:
            in_dim = in_features
        self._dims = {"in_dim": in_dim, "n_labels": int(n_labels)}
        return ResidualNet(base, in_dim, int(n_labels), self.hidden, self.activation, self.input,
                           self.correct_logvar)

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        return [{"params": list(model.delta.parameters())}]

    def state_dict(self, model: Any) -> dict[str, Any]:
        return {f"delta.{k}": v for k, v in model.delta.state_dict().items()}

    def load_state_dict(self, model: Any, tensors: dict[str, Any]) -> None:
        extra = [k for k in tensors if not k.startswith("delta.")]
        if extra:
            raise KeyError(f"unexpected tensor(s) {extra[:3]}")
        model.delta.load_state_dict({k[len("delta."):]: v for k, v in tensors.items()}, strict=True)

    def merge(self, model: Any) -> Any:
        return model

    def adapter_config(self) -> dict[str, Any]:
        return {"adapter_type": "residual", **self.config(), **self._dims}

    def training_defaults(self) -> dict[str, Any]:
        return {"lr": 1e-3, "weight_decay": 1e-4, "epochs": 300, "batch_size": 64, "patience": 20}


def _first_in_features(module: Any) -> int:
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    raise UsageError("residual adapter: the base head has no linear layer")


@hookimpl
def register_adapters(register: Any) -> None:
    register(ResidualAdapter)

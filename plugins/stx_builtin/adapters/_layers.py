"""torch modules of the built-in adapters (imported lazily by the adapter plugin modules)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


# ------------------------------------------------------------------------------------- residual


class ResidualNet(nn.Module):
    """A frozen base plus a small network whose output is added to the base's mean and
    log-variance. The last layer starts at zero, so the untrained adapter equals the base."""

    def __init__(self, base: nn.Module, in_dim: int, n_labels: int, hidden: list[int], activation: str,
                 use: str, correct_logvar: bool) -> None:
        super().__init__()
        self.base = base
        freeze(base)
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), ACTIVATIONS[activation]()]
            d = h
        last = nn.Linear(d, 2 * n_labels if correct_logvar else n_labels)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.delta = nn.Sequential(*layers)
        self.use, self.n_labels, self.correct_logvar = use, n_labels, correct_logvar

    def train(self, mode: bool = True) -> "ResidualNet":
        super().train(mode)
        self.base.eval()  # the frozen base never runs dropout
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use == "features":
            mean, logvar = self.base(x)
            h = x
        else:
            mean, logvar, hidden = self.base.forward_hidden(x)
            h = hidden if self.use == "hidden" else torch.cat([x, hidden], dim=1)
        return self._corrected(mean, logvar, h)

    def _corrected(self, mean: torch.Tensor, logvar: torch.Tensor, h: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.delta(h)
        L = self.n_labels
        mean = mean + d[:, :L]
        if self.correct_logvar:
            logvar = logvar + d[:, L:]
        return mean, logvar

    def frozen_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the frozen base gives each row, ``(B, 2 K L + H)``: its mean and log-variance
        (member-major) and its hidden state. Training reads them once instead of running the base
        every epoch (the base never changes, and never runs dropout). None when the correction
        reads the features themselves (``input=features|both``, or a base whose hidden state is
        its input): a cache would copy them."""
        if self.use != "hidden":
            return None
        mean, logvar, hidden = self.base.forward_hidden(x)
        if hidden is x:  # a linear base (ridge): its "hidden state" is the features
            return None
        K, B, L = mean.shape
        return torch.cat([mean.transpose(0, 1).reshape(B, K * L), logvar.transpose(0, 1).reshape(B, K * L),
                          hidden], dim=1)

    def forward_from_frozen(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` from :meth:`frozen_rows`' output."""
        L = self.n_labels
        k = (c.shape[1] - self.delta[0].in_features) // (2 * L)
        B = c.shape[0]
        mean = c[:, :k * L].reshape(B, k, L).transpose(0, 1)
        logvar = c[:, k * L:2 * k * L].reshape(B, k, L).transpose(0, 1)
        return self._corrected(mean, logvar, c[:, 2 * k * L:])


# ----------------------------------------------------------------------------------------- LoRA


class LoraLinear(nn.Module):
    """``y = base(x) + (alpha / r) * B(A(dropout(x)))`` with ``base`` frozen and B zero at start
    (the layout and initialisation of peft's LoRA ``Linear``)."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        freeze(base_layer)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / r
        self.lora_A.to(base_layer.weight.device)
        self.lora_B.to(base_layer.weight.device)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        b = self.base_layer
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None,
                        device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(b.weight + self.delta_weight())
            if b.bias is not None:
                out.bias.copy_(b.bias)
        freeze(out)
        return out


def linear_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]


def match_targets(module: nn.Module, target: Any) -> list[str]:
    """peft's matching: ``"all"`` = every Linear; a string = regex full match on the module name;
    a list = exact name or name ending in ``.<entry>``."""
    names = linear_names(module)
    if target == "all":
        return names
    if isinstance(target, str):
        return [n for n in names if re.fullmatch(target, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target)]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def lora_layers(module: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLinear)]

"""The torch networks of the built-in heads (imported lazily by :mod:`.mlp` and :mod:`.ridge`).

Both follow the head contract of :mod:`stxcli.protocols`: ``forward(x) -> (mean, logvar)``, each
``(K, B, L)``, in standardised label space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}


def bound_logvar(raw: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Smoothly keep a log-variance within [lo, hi] (gradients never vanish abruptly)."""
    x = hi - F.softplus(hi - raw)
    return lo + F.softplus(x - lo)


class MLPMember(nn.Module):
    """One MLP: ``layers`` (each Linear, then the activation and dropout), then ``out`` -> 2L
    values. Linear layers have stable names (``layers.0``, ``layers.1``, ``out``) whatever the
    dropout, so adapters can target them by name."""

    def __init__(self, in_dim: int, hidden: list[int], n_labels: int, activation: str, dropout: float) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(dims[-1], 2 * n_labels)
        nn.init.zeros_(self.out.bias)
        self.width = dims[-1]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.drop(self.act(layer(x)))
        return x


class MLPNet(nn.Module):
    """``K`` independent MLP members (a deep ensemble when K > 1)."""

    def __init__(self, in_dim: int, hidden: list[int], n_labels: int, activation: str, dropout: float,
                 ensemble: int, logvar_min: float, logvar_max: float) -> None:
        super().__init__()
        self.members = nn.ModuleList(
            MLPMember(in_dim, hidden, n_labels, activation, dropout) for _ in range(ensemble))
        self.n_labels = n_labels
        self.logvar_min, self.logvar_max = logvar_min, logvar_max
        self.hidden_dim = ensemble * self.members[0].width

    def _split(self, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.n_labels
        return o[..., :L], bound_logvar(o[..., L:], self.logvar_min, self.logvar_max)

    @staticmethod
    def _stack(outs: list[torch.Tensor]) -> torch.Tensor:
        return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)  # no copy for K = 1

    def forward_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hs = [m.hidden(x) for m in self.members]
        o = self._stack([m.out(h) for m, h in zip(self.members, hs)])
        mean, logvar = self._split(o)
        return mean, logvar, hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self._stack([m.out(m.hidden(x)) for m in self.members]))

    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight ``(K*H, D)`` and bias ``(K*H,)`` of every member's first Linear, stacked:
        ``stx predict`` computes them (and the domain projections) in one matrix product, then
        :meth:`forward_from_first`. None when a member has no hidden layer or its first layer is
        not a plain Linear (an unmerged adapter layer)."""
        firsts = [m.layers[0] if len(m.layers) else None for m in self.members]
        if any(type(f) is not nn.Linear for f in firsts):
            return None
        return torch.cat([f.weight for f in firsts]), torch.cat([f.bias for f in firsts])

    def forward_from_first(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` continued from the first layers' outputs ``h`` (B, K*H) (any strides)."""
        width = self.members[0].layers[0].out_features
        outs = []
        for i, m in enumerate(self.members):
            x = m.drop(m.act(h[:, i * width:(i + 1) * width]))
            for layer in m.layers[1:]:
                x = m.drop(m.act(layer(x)))
            outs.append(m.out(x))
        return self._split(self._stack(outs))


class RidgeNet(nn.Module):
    """A linear map (fitted in closed form) and one log-variance per label."""

    def __init__(self, in_dim: int, n_labels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n_labels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.logvar = nn.Parameter(torch.zeros(n_labels))
        self.hidden_dim = in_dim

    def forward_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.forward(x)
        return mean, logvar, x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.linear(x).unsqueeze(0)
        return mean, self.logvar.expand_as(mean)

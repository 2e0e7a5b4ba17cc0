"""The ``full`` adapter: every weight of the pre-trained head trainable, gently.

A few hundred target stars must not wreck the pre-trained solution, so full fine-tuning uses a
learning rate ten times below pre-training (1e-4 by default), early stopping on the validation
split, and optional layer-wise learning-rate decay: with ``layer_decay = d`` the output layer
trains at the full rate and each layer below at ``d`` times the rate of the one above (ensemble
members share the schedule; parameters outside linear layers train at the full rate).

Config: ``layer_decay`` (default 1.0 = none); ``target``: ``head`` (default), ``encoder+head``
(the spectral encoder in front of a head trained on ``transformer`` embeddings trains too) or
``encoder`` (the encoder only, head frozen); ``encoder_lr_scale`` (default 0.1): the encoder
trains at this fraction of the learning rate (1e-5 with the default 1e-4, the published
encoder's fine-tuning rate). With the encoder, fine-tuning reads RAW features of the target stars
(docs/models.md).

Saved as ``adapter_config.json`` + ``adapter_model.safetensors`` holding the whole fine-tuned head
(keys ``head.*``; none with ``target=encoder``), and with the encoder ``encoder/adapter_config.json``
+ ``encoder/adapter_model.safetensors`` holding the fine-tuned encoder tensors the embedding uses
(keys ``encoder.*``; the pretraining-only decoders are left out). The base still provides the
feature normalisation and the label standardisation; the manifest records the base encoder's
sha256.
"""

from __future__ import annotations

import re
from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl

from ._target import has_encoder, has_head, parse_target

#: encoder parameters used only by pretraining (and the attention pool, unless pooling uses it)
PRETRAIN_ONLY = ("decoder.", "pool_decoder.")


class FullAdapter:
    name = "full"
    version = "1.0"
    description = "full fine-tuning: low learning rate, optional layer-wise decay, early stopping"

    def __init__(self, layer_decay: float = 1.0, target: str = "head", encoder_lr_scale: float = 0.1) -> None:
        self.layer_decay = float(layer_decay)
        if not 0 < self.layer_decay <= 1:
            raise UsageError(f"layer_decay must be in (0, 1], got {layer_decay}")
        self.target = parse_target(target, "full")
        self.encoder_lr_scale = float(encoder_lr_scale)
        if not 0 < self.encoder_lr_scale <= 1:
            raise UsageError(f"encoder_lr_scale must be in (0, 1], got {encoder_lr_scale}")

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"layer_decay": self.layer_decay, "target": self.target}
        if self.targets_encoder:
            cfg["encoder_lr_scale"] = self.encoder_lr_scale
        return cfg

    @property
    def targets_encoder(self) -> bool:
        """Whether this adapter fine-tunes the encoder in front of the head (core protocol)."""
        return has_encoder(self.target)

    def attach(self, base: Any) -> Any:
        for p in base.parameters():
            p.requires_grad_(has_head(self.target))
        return base

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        from torch import nn

        if not has_head(self.target):
            return []

        linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        keys: list[str] = []
        for n, _ in linear:  # depth of a layer, ensemble members folded together
            k = re.sub(r"^members\.\d+\.", "", n)
            if k not in keys:
                keys.append(k)
        groups: dict[float, list[Any]] = {}
        seen: set[int] = set()
        for n, m in linear:
            depth = keys.index(re.sub(r"^members\.\d+\.", "", n))
            scale = self.layer_decay ** (len(keys) - 1 - depth)
            for p in m.parameters():
                groups.setdefault(scale, []).append(p)
                seen.add(id(p))
        rest = [p for p in model.parameters() if id(p) not in seen]
        if rest:
            groups.setdefault(1.0, []).extend(rest)
        return [{"params": ps, "lr_scale": s} for s, ps in sorted(groups.items())]

    def state_dict(self, model: Any) -> dict[str, Any]:
        if not has_head(self.target):
            return {}
        return {f"head.{k}": v for k, v in model.state_dict().items()}

    def load_state_dict(self, model: Any, tensors: dict[str, Any]) -> None:
        extra = [k for k in tensors if not k.startswith("head.")]
        if extra:
            raise KeyError(f"unexpected tensor(s) {extra[:3]}")
        if not has_head(self.target):
            return
        model.load_state_dict({k[len("head."):]: v for k, v in tensors.items()}, strict=True)

    # -- the encoder part (core protocol for adapters with ``targets_encoder``); ``front`` is the
    # featurizer's front module: ``front.encoder`` (the SpectralEncoder) and ``front.pooling``
    @staticmethod
    def _used(front: Any) -> list[tuple[str, Any]]:
        """The encoder parameters that the front's embedding depends on."""
        skip = PRETRAIN_ONLY + (() if front.pooling == "attention" else ("attn_pool.",))
        return [(n, p) for n, p in front.encoder.named_parameters() if not n.startswith(skip)]

    def attach_encoder(self, front: Any) -> Any:
        for p in front.encoder.parameters():
            p.requires_grad_(False)
        for _, p in self._used(front):
            p.requires_grad_(True)
        return front

    def encoder_param_groups(self, front: Any) -> list[dict[str, Any]]:
        return [{"params": [p for _, p in self._used(front)], "lr_scale": self.encoder_lr_scale}]

    def encoder_state_dict(self, front: Any) -> dict[str, Any]:
        return {f"encoder.{n}": p.detach() for n, p in self._used(front)}

    def load_encoder_state_dict(self, front: Any, tensors: dict[str, Any]) -> None:
        import torch

        used = dict(self._used(front))
        want = {f"encoder.{n}" for n in used}
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        if missing or extra:
            raise KeyError(f"missing {missing[:2]} unexpected {extra[:2]}")
        with torch.no_grad():
            for n, p in used.items():
                t = tensors[f"encoder.{n}"]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"encoder.{n}: shape {tuple(t.shape)} != {tuple(p.shape)}")
                p.copy_(t)

    def merge_encoder(self, front: Any) -> Any:
        return front

    def encoder_adapter_config(self) -> dict[str, Any]:
        return {"adapter_type": "full-encoder", "encoder_lr_scale": self.encoder_lr_scale}

    def merge(self, model: Any) -> Any:
        return model

    def adapter_config(self) -> dict[str, Any]:
        return {"adapter_type": "full", **self.config()}

    def training_defaults(self) -> dict[str, Any]:
        if self.targets_encoder:  # every step runs the encoder forward and backward
            return {"lr": 1e-4, "weight_decay": 1e-4, "epochs": 60, "batch_size": 32, "patience": 10}
        return {"lr": 1e-4, "weight_decay": 1e-4, "epochs": 300, "batch_size": 64, "patience": 20}


@hookimpl
def register_adapters(register: Any) -> None:
    register(FullAdapter)

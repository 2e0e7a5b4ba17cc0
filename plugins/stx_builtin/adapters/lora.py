"""The ``lora`` adapter: low-rank updates ``W + (lora_alpha / r) B A`` on the frozen head's
linear layers, with the configuration fields and file layout of the peft library.

Config (``--set key=value`` on ``stx finetune --adapter lora``):

* ``r``: rank (default 4); ``lora_alpha``: scale numerator (default 8, i.e. scaling alpha/r = 2);
* ``lora_dropout``: dropout on the LoRA branch's input (default 0);
* ``target_modules``: which linear layers of the head: ``all`` (default), a list of module names
  or name suffixes (``out`` = every member's output layer, ``layers.0`` = every first layer), or
  a regular expression matched against the full module name (peft's rules);
* ``target``: what gets LoRA: ``head`` (default), ``encoder`` (the spectral encoder in front of a
  head trained on ``transformer`` embeddings; the head stays frozen) or ``encoder+head``. With
  the encoder, fine-tuning reads RAW features of the target stars (docs/models.md);
* ``encoder_modules``: the encoder's linear layers that get LoRA (same rules as
  ``target_modules``; default ``attn.qkv,attn.proj,mlp.fc1,mlp.fc2``: every block's attention
  and MLP layers).

``B`` starts at zero, so the untrained adapter equals the base. Saved apart from the base as
``adapter_config.json`` (peft ``LoraConfig`` fields) + ``adapter_model.safetensors`` with peft's
key names (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), so one base model
serves many adapters. For prediction the update is merged into the weights. The encoder's LoRA is
saved the same way in the sub-folder ``encoder/`` (keys relative to the encoder, e.g.
``base_model.model.blocks.0.attn.qkv.lora_A.weight``); the base encoder itself is referenced by
its sha256, never copied.
"""

from __future__ import annotations

import copy
from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl

from ._target import has_encoder, has_head, parse_target

PREFIX = "base_model.model."
#: the encoder's attention and MLP linear layers (``blocks.N.attn.qkv`` ...), by name suffix
ENCODER_MODULES = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


class LoraAdapter:
    name = "lora"
    version = "1.0"
    description = "low-rank updates on the frozen head's linear layers (peft layout), mergeable"

    def __init__(self, r: int = 4, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 target_modules: Any = "all", target: str = "head", encoder_modules: Any = None) -> None:
        self.r = int(r)
        if self.r < 1:
            raise UsageError(f"r must be >= 1, got {r}")
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if isinstance(target_modules, str) and "," in target_modules:
            target_modules = [t for t in target_modules.split(",") if t]
        self.target_modules = target_modules
        self.target = parse_target(target, "lora")
        if encoder_modules is None:
            encoder_modules = list(ENCODER_MODULES)
        elif isinstance(encoder_modules, str) and "," in encoder_modules:
            encoder_modules = [t for t in encoder_modules.split(",") if t]
        self.encoder_modules = encoder_modules
        self._resolved: list[str] = []
        self._enc_resolved: list[str] = []

    def config(self) -> dict[str, Any]:
        cfg = {"r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
               "target_modules": self.target_modules, "target": self.target}
        if self.targets_encoder:
            cfg["encoder_modules"] = self.encoder_modules
        return cfg

    @property
    def targets_encoder(self) -> bool:
        """Whether this adapter fine-tunes the encoder in front of the head (core protocol)."""
        return has_encoder(self.target)

    def _attach_lora(self, module: Any, targets: Any, what: str) -> list[str]:
        from ._layers import LoraLinear, freeze, linear_names, match_targets, set_submodule

        names = match_targets(module, targets)
        if not names:
            raise UsageError(f"lora: {what} {targets!r} match no linear layer "
                             f"(layers: {', '.join(linear_names(module))})")
        freeze(module)
        for n in names:
            set_submodule(module, n, LoraLinear(module.get_submodule(n), self.r, self.lora_alpha,
                                                self.lora_dropout))
        return names

    def attach(self, base: Any) -> Any:
        from ._layers import freeze

        if not has_head(self.target):  # target=encoder: the head stays as pre-trained
            freeze(base)
            self._resolved = []
            return base
        self._resolved = self._attach_lora(base, self.target_modules, "target_modules")
        return base

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        from ._layers import lora_layers

        params = []
        for _, m in lora_layers(model):
            params += [m.lora_A.weight, m.lora_B.weight]
        return [{"params": params, "weight_decay": 0.0}] if params else []

    def state_dict(self, model: Any) -> dict[str, Any]:
        from ._layers import lora_layers

        out = {}
        for n, m in lora_layers(model):
            out[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach()
            out[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach()
        return out

    def load_state_dict(self, model: Any, tensors: dict[str, Any]) -> None:
        import torch

        from ._layers import lora_layers

        expected = self.state_dict(model)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise KeyError(f"missing {missing[:2]} unexpected {extra[:2]}")
        with torch.no_grad():
            for n, m in lora_layers(model):
                for part in ("lora_A", "lora_B"):
                    t = tensors[f"{PREFIX}{n}.{part}.weight"]
                    w = getattr(m, part).weight
                    if tuple(t.shape) != tuple(w.shape):
                        raise ValueError(f"{n}.{part}: shape {tuple(t.shape)} != {tuple(w.shape)}")
                    w.copy_(t)

    def merge(self, model: Any) -> Any:
        """A copy of the module with every LoRA layer folded into a plain ``nn.Linear``."""
        from ._layers import lora_layers, set_submodule

        merged = copy.deepcopy(model)
        for n, m in lora_layers(merged):
            set_submodule(merged, n, m.merged())
        return merged

    def adapter_config(self) -> dict[str, Any]:
        return self._peft_config(self._resolved)

    def _peft_config(self, modules: list[str]) -> dict[str, Any]:
        return {"peft_type": "LORA", "task_type": None, "r": self.r, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout, "target_modules": list(modules),
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
                "modules_to_save": None, "inference_mode": True, "use_rslora": False, "use_dora": False,
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "base_model_name_or_path": None, "revision": None}

    # -- the encoder part (core protocol for adapters with ``targets_encoder``); ``front`` is the
    # featurizer's front module (``front.encoder`` = the SpectralEncoder, whose module names the
    # saved keys use)
    def attach_encoder(self, front: Any) -> Any:
        self._enc_resolved = self._attach_lora(front.encoder, self.encoder_modules, "encoder_modules")
        return front

    def encoder_param_groups(self, front: Any) -> list[dict[str, Any]]:
        return self.param_groups(front.encoder)

    def encoder_state_dict(self, front: Any) -> dict[str, Any]:
        return self.state_dict(front.encoder)

    def load_encoder_state_dict(self, front: Any, tensors: dict[str, Any]) -> None:
        self.load_state_dict(front.encoder, tensors)

    def merge_encoder(self, front: Any) -> Any:
        """A copy of ``front`` with the encoder's LoRA folded into its linear layers."""
        return type(front)(self.merge(front.encoder), front.pooling).eval()

    def encoder_adapter_config(self) -> dict[str, Any]:
        return self._peft_config(self._enc_resolved)

    def training_defaults(self) -> dict[str, Any]:
        if self.targets_encoder:  # every step runs the encoder forward and backward
            return {"lr": 1e-3, "weight_decay": 0.0, "epochs": 60, "batch_size": 32, "patience": 10}
        return {"lr": 1e-3, "weight_decay": 0.0, "epochs": 300, "batch_size": 64, "patience": 20}


@hookimpl
def register_adapters(register: Any) -> None:
    register(LoraAdapter)

"""stx-peft: the ``peft-lora`` adapter, LoRA fine-tuning done by the Hugging Face ``peft`` library.

A third-party stx plugin (its own distribution, registered through the ``stx`` entry-point
group). It implements the stx Adapter protocol (:class:`stxcli.protocols.Adapter`) on the
pre-trained head's ``torch.nn.Module`` with peft's own machinery: ``LoraConfig`` +
``get_peft_model`` wrap the head, ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``
save and load the adapter tensors, ``merge_and_unload`` folds them into the weights for
prediction. It mirrors the built-in ``lora`` adapter: same configuration fields, same
initialisation rule (B = 0, so the untrained adapter equals the base), same files
(``adapter_config.json`` from ``LoraConfig.to_dict()`` + ``adapter_model.safetensors`` with
peft's key names ``base_model.model.<module>.lora_A.weight``), so the same weights give the
same outputs and a saved adapter folder loads in plain peft (``PeftModel.from_pretrained``).

Config (``stx finetune --adapter peft-lora --set key=value``):

* ``r`` (default 4), ``lora_alpha`` (default 8), ``lora_dropout`` (default 0);
* ``target_modules``: ``all`` (default: every ``nn.Linear`` of the head), else passed to peft
  as it is: a list of module names / name suffixes (``out,layers.0``) or a regular expression
  matched against the full module name (peft's rules).

peft (and the transformers it imports, ~10 s) is imported inside the methods only, so
``stx --help`` and ``stx plugins`` stay fast.
"""

from __future__ import annotations

import copy
import enum
from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl

__version__ = "0.1.0"

#: peft's key prefix of a wrapped model's tensors (``PeftModel.base_model.model``).
PREFIX = "base_model.model."


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # the distribution depends on peft; a broken install says so
        raise UsageError(f"peft-lora needs the peft library, which fails to import ({exc}); "
                         f"pip install peft") from exc
    return peft


def _jsonable(value: Any) -> Any:
    """``LoraConfig.to_dict()`` holds sets and enums; JSON gets sorted lists and their values."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class PeftLoraAdapter:
    """The stx Adapter protocol implemented with peft's LoRA."""

    name = "peft-lora"
    version = __version__
    description = "LoRA through the peft library (peft's LoraConfig, layers, files and merge)"

    def __init__(self, r: int = 4, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 target_modules: Any = "all") -> None:
        self.r = int(r)
        if self.r < 1:
            raise UsageError(f"r must be >= 1, got {r}")
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if isinstance(target_modules, str) and "," in target_modules:
            target_modules = [t for t in target_modules.split(",") if t]
        if isinstance(target_modules, tuple):
            target_modules = list(target_modules)
        self.target_modules = target_modules
        self._peft_config: Any = None

    # ------------------------------------------------------------------------- configuration

    def config(self) -> dict[str, Any]:
        return {"r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": self.target_modules}

    def _lora_config(self, base: Any) -> Any:
        from torch import nn

        linear = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n]
        if not linear:
            raise UsageError(f"peft-lora: the head ({type(base).__name__}) has no linear layer to adapt")
        targets = linear if self.target_modules == "all" else self.target_modules
        return _peft().LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                  target_modules=targets, bias="none", init_lora_weights=True)

    # ------------------------------------------------------------------------------- protocol

    def attach(self, base: Any) -> Any:
        """``get_peft_model(base, LoraConfig(...))``: base frozen, LoRA layers with B = 0."""
        from torch import nn

        peft = _peft()
        cfg = self._lora_config(base)
        names = ", ".join(n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n)
        try:
            model = peft.get_peft_model(base, cfg)
        except ValueError as exc:  # peft: "Target modules ... not found", "... is not supported"
            raise UsageError(f"peft-lora: target_modules {self.target_modules!r} do not fit the head "
                             f"({str(exc).splitlines()[0]}; linear layers: {names})") from exc
        self._peft_config = model.peft_config["default"]
        return model

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0}]

    def state_dict(self, model: Any) -> dict[str, Any]:
        """peft's adapter state dict: ``base_model.model.<module>.lora_{A,B}.weight``."""
        sd = _peft().get_peft_model_state_dict(model)
        return {k: v.detach() for k, v in sd.items()}

    def load_state_dict(self, model: Any, tensors: dict[str, Any]) -> None:
        """Strict: exactly the keys and shapes :meth:`state_dict` gives, else KeyError/ValueError."""
        expected = self.state_dict(model)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise KeyError(f"missing {missing[:2]} unexpected {extra[:2]}")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(expected[k].shape):
                raise ValueError(f"{k}: shape {tuple(t.shape)} != {tuple(expected[k].shape)}")
        res = _peft().set_peft_model_state_dict(model, dict(tensors))
        bad = list(getattr(res, "unexpected_keys", []) or [])
        if bad:
            raise KeyError(f"peft did not place {bad[:2]}")

    def merge(self, model: Any) -> Any:
        """A copy with every LoRA update folded into its linear layer (``merge_and_unload``):
        the plain head module, no peft left in the forward pass."""
        merged = copy.deepcopy(model).merge_and_unload()
        for p in merged.parameters():
            p.requires_grad_(False)
        return merged

    def adapter_config(self) -> dict[str, Any]:
        """peft's own ``LoraConfig.to_dict()`` (what ``PeftModel.save_pretrained`` writes), with
        the target modules resolved by peft on the head."""
        cfg = self._peft_config
        if cfg is None:
            raise RuntimeError("peft-lora: adapter_config() before attach()")
        d = _jsonable(cfg.to_dict())
        d["inference_mode"] = True
        return d

    def training_defaults(self) -> dict[str, Any]:
        return {"lr": 1e-3, "weight_decay": 0.0, "epochs": 300, "batch_size": 64, "patience": 20}


@hookimpl
def register_adapters(register: Any) -> None:
    register(PeftLoraAdapter)

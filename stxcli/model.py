"""Core model building: label transforms, feature normalisation, the network wrapper, the
training-domain model, and rebuilding a trained model from its directory.

Knows the head/adapter protocols (:mod:`stxcli.protocols`), never a concrete head or adapter.
Imports torch at module level: import this module inside the commands that use a model, never
at CLI start-up.

Spaces
------
* physical labels (K, dex) --transform--> transformed (log10 Teff by default) --standardise-->
  standardised space, where heads predict a mean and a log-variance;
* physical error bars come back through the delta method: for ``y = 10**z``,
  ``sigma_y = ln(10) * y * sigma_z``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import console
from .errors import ModelFileError, StxError, UsageError
from .linear import Linear, linear_fn
from .modelfile import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ModelDir

#: the sub-folder of a fine-tuned model holding an adapter's encoder part (peft-like layout)
ENCODER_FOLDER = "encoder/"

TRANSFORMS = ("identity", "log10")
#: Teff as log10 Teff: a model linear in Teff fails on hot and cool stars.
DEFAULT_TRANSFORMS = {"teff": "log10"}
DEFAULT_UNITS = {"teff": "K", "logg": "dex", "feh": "dex", "alpha_fe": "dex", "mh": "dex"}
LN10 = math.log(10.0)


# ------------------------------------------------------------------------------------- labels


@dataclass
class LabelSpec:
    """One label: unit, transform, standardisation (of the transformed value), training range."""

    name: str
    unit: str
    transform: str
    mean: float
    std: float
    lo: float  # training range, physical units
    hi: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelSpec":
        return cls(**{k: d[k] for k in ("name", "unit", "transform", "mean", "std", "lo", "hi")})


def forward_transform(values: np.ndarray, transform: str, name: str = "label") -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if transform == "identity":
        return v
    if transform == "log10":
        bad = np.isfinite(v) & (v <= 0)
        if bad.any():
            raise UsageError(f"label {name}: {int(bad.sum())} value(s) <= 0 cannot take the log10 transform "
                             f"(use --transform {name}=identity)")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.log10(v)
    raise UsageError(f"label {name}: unknown transform {transform!r} (choose from {', '.join(TRANSFORMS)})")


def fit_label_specs(names: list[str], y: np.ndarray, *, units: dict[str, str] | None = None,
                    transforms: dict[str, str] | None = None) -> list[LabelSpec]:
    """Specs from training labels ``y`` (N, L), physical units, NaN = missing."""
    specs = []
    for j, name in enumerate(names):
        col = np.asarray(y[:, j], dtype=np.float64)
        ok = np.isfinite(col)
        tr = (transforms or {}).get(name, DEFAULT_TRANSFORMS.get(name, "identity"))
        t = forward_transform(col[ok], tr, name)
        std = float(t.std()) if t.size > 1 else 1.0
        specs.append(LabelSpec(name=name, unit=(units or {}).get(name) or DEFAULT_UNITS.get(name, ""),
                               transform=tr, mean=float(t.mean()), std=std if std > 0 else 1.0,
                               lo=float(col[ok].min()), hi=float(col[ok].max())))
    return specs


def encode_labels(specs: list[LabelSpec], y: np.ndarray) -> np.ndarray:
    """Physical (N, L) -> standardised float32, NaN kept."""
    out = np.empty(y.shape, dtype=np.float32)
    for j, s in enumerate(specs):
        out[:, j] = (forward_transform(y[:, j], s.transform, s.name) - s.mean) / s.std
    return out


def decode_labels(specs: list[LabelSpec], mean_s: np.ndarray, var_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardised mean and variance (B, L) -> physical value and 1-sigma error (delta method)."""
    value = np.empty(mean_s.shape, dtype=np.float64)
    err = np.empty(mean_s.shape, dtype=np.float64)
    for j, s in enumerate(specs):
        z = mean_s[:, j].astype(np.float64) * s.std + s.mean
        sz = np.sqrt(np.maximum(var_s[:, j].astype(np.float64), 0.0)) * s.std
        if s.transform == "log10":
            value[:, j] = 10.0 ** z
            err[:, j] = LN10 * value[:, j] * sz
        else:
            value[:, j] = z
            err[:, j] = sz
    return value, err


def combine_members(mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble (K, B, L) -> mean (B, L) and total variance = mean aleatoric + member spread."""
    m = mean.mean(0)
    var = logvar.exp().mean(0)
    if mean.shape[0] > 1:
        var = var + mean.var(0, unbiased=False)
    return m, var


def combine_members_np(mean: np.ndarray, logvar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`combine_members` in numpy (float64), for predicted batches."""
    mean = mean.astype(np.float64)
    var = np.exp(logvar.astype(np.float64)).mean(0)
    if mean.shape[0] > 1:
        var = var + mean.var(0)
    return mean.mean(0), var


# --------------------------------------------------------------------------------- the network


class StxNet(nn.Module):
    """Feature standardisation in front of a head network (or an adapted one)."""

    def __init__(self, head: nn.Module, feature_mean: torch.Tensor, feature_scale: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("feature_mean", feature_mean.detach().clone().float())
        self.register_buffer("feature_scale", feature_scale.detach().clone().float())

    def standardize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(x - mean) * scale`` in one fused pass, into ``out`` when given (predict reuses one
        buffer: a fresh batch-sized tensor per chunk costs more in page faults than the pass)."""
        return torch.addcmul(-self.feature_mean * self.feature_scale, x, self.feature_scale, out=out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.standardize(x))

    #: rows that :meth:`forward_rows` takes at once in evaluation (standardised features: many)
    row_batch = 4096

    def forward_rows(self, x: torch.Tensor, ivar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The network on training rows as :class:`stxcli.train.Batches` holds them: features
        already standardised (``ivar`` unused)."""
        return self.head(x)


class FrontNet(nn.Module):
    """A model whose input is the features a *front* consumes (the raw spectrum and its ivar):
    ``front`` (from the base featurizer's ``front()``: the spectral encoder + pooling, partly
    trainable) -> the head's feature standardisation -> head. What the encoder adapters train."""

    needs_ivar = True
    #: spectra per front pass in evaluation (attention over hundreds of tokens: keep it small)
    row_batch = 64

    def __init__(self, front: nn.Module, net: StxNet) -> None:
        super().__init__()
        self.front = front
        self.net = net

    @property
    def head(self) -> nn.Module:
        return self.net.head

    @property
    def feature_mean(self) -> torch.Tensor:
        return self.net.feature_mean

    @property
    def feature_scale(self) -> torch.Tensor:
        return self.net.feature_scale

    def embed(self, x: torch.Tensor, ivar: torch.Tensor) -> torch.Tensor:
        """Standardised front output (what the head sees)."""
        return self.net.standardize(self.front(x, ivar))

    def forward_rows(self, x: torch.Tensor, ivar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if ivar is None:
            raise ValueError("a model with a front (encoder) needs the ivar of its input features")
        return self.net.head(self.embed(x, ivar))

    def forward(self, x: torch.Tensor, ivar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_rows(x, ivar)


class FromFrozen(nn.Module):
    """An adapted head trained from what its frozen part gave each row once
    (:func:`stxcli.train.frozen_cache`); its state is the head's."""

    row_batch = 4096

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward_rows(self, c: torch.Tensor, ivar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.forward_from_frozen(c)


def feature_norm(mean: np.ndarray, std: np.ndarray, floor: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale = 1/std) with constant features (std below ``floor``) left unscaled."""
    std = np.asarray(std, dtype=np.float64)
    scale = np.where(std > floor, 1.0 / np.maximum(std, floor), 1.0)
    return np.asarray(mean, np.float32), scale.astype(np.float32)


def count_trainable(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


# ----------------------------------------------------------------------------- training domain


@dataclass
class DomainModel:
    """Where the training features live: a PCA of standardised features.

    Two scores per spectrum: ``d2``, the mean squared Mahalanobis distance over the ``k``
    principal components, and ``resid``, the mean squared residual off the PCA subspace.
    A spectrum is out of the domain when either exceeds its threshold: the ``quantile`` of the
    scores of the fitted and of held-out training spectra, whichever is larger (1.5 x the maximum
    score when there are too few spectra to estimate that quantile).
    """

    center: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    eigvals: np.ndarray  # (k,)
    d2_max: float
    resid_max: float
    quantile: float
    n_fit: int
    _dev: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def fit(cls, z_fit: np.ndarray, z_cal: np.ndarray, *, n_components: int = 16,
            quantile: float = 0.999, seed: int = 0) -> "DomainModel":
        """PCA of ``z_fit`` (standardised features); thresholds: the ``quantile`` of the scores
        of the fitted rows and of the held-out ``z_cal`` rows, whichever is larger (a PCA fitted
        on rows of high dimension describes those rows better than new ones)."""
        z_fit = np.asarray(z_fit, dtype=np.float32)
        n, d = z_fit.shape
        k = max(1, min(n_components, n // 10, d))  # a PCA of few rows describes only them
        center = z_fit.mean(0)
        zc = torch.from_numpy(z_fit - center)
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            _, s, v = torch.svd_lowrank(zc, q=min(k + 8, n, d), niter=4)
        comps = v[:, :k].T.contiguous().numpy()
        eig = (s[:k].numpy().astype(np.float64) ** 2) / max(n - 1, 1)
        eig = np.maximum(eig, 1e-12 * max(float(eig.max()), 1e-12))
        dm = cls(center=center, components=comps.astype(np.float32), eigvals=eig.astype(np.float32),
                 d2_max=np.inf, resid_max=np.inf, quantile=quantile, n_fit=n)
        d2, resid = dm.scores_np(z_fit)
        dm.d2_max, dm.resid_max = _threshold(d2, quantile), _threshold(resid, quantile)
        if len(z_cal):
            d2, resid = dm.scores_np(z_cal)
            dm.d2_max = max(dm.d2_max, _threshold(d2, quantile))
            dm.resid_max = max(dm.resid_max, _threshold(resid, quantile))
        return dm

    def _on(self, device: Any) -> dict[str, Any]:
        key = str(device)
        if self._dev.get("device") != key:
            comp = np.asarray(self.components, np.float64)
            c = np.asarray(self.center, np.float64)
            a = np.concatenate([self.components, self.center[None]], 0).astype(np.float32)
            self._dev = {"device": key, "a": torch.as_tensor(a, device=device).contiguous(),
                         "cc": c @ comp.T, "c2": float(c @ c), "ev": np.asarray(self.eigvals, np.float64)}
        return self._dev

    def projection(self, device: Any) -> torch.Tensor:
        """The ``(k + 1, D)`` matrix whose product with ``z`` gives :meth:`scores_from`'s ``q``:
        the components, then the center."""
        return self._on(device)["a"]

    def scores(self, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(d2, resid) per row of ``z``. The two passes over ``z`` run in torch (one skinny matrix
        product gives the projections and z.c; ``|z - c|^2 = z.z - 2 z.c + c.c``); the rest,
        a few numbers per row, in numpy (float64), which costs nothing next to thread
        synchronisation of many small torch operations on a busy machine."""
        t = self._on(z.device)
        q = torch.nn.functional.linear(z, t["a"])  # (B, k + 1)
        return self.scores_from(q, torch.linalg.vector_norm(z, dim=1), z.shape[1])

    def scores_from(self, q: torch.Tensor, znorm: torch.Tensor, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(d2, resid) from ``q = z @ projection().T`` (B, k + 1) and the rows' norms |z|."""
        t = self._on(q.device)
        k = t["ev"].shape[0]
        q = q.cpu().numpy().astype(np.float64)
        zz = znorm.cpu().numpy().astype(np.float64) ** 2
        p = q[:, :k] - t["cc"]
        pp = p * p
        d2 = (pp / t["ev"]).mean(1)
        resid = np.maximum(zz - 2 * q[:, k] + t["c2"] - pp.sum(1), 0.0) / dim
        return d2, resid

    def scores_np(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.scores(torch.from_numpy(np.ascontiguousarray(z, np.float32)))

    def outside(self, z: torch.Tensor) -> np.ndarray:
        return self.outside_scores(*self.scores(z))

    def outside_scores(self, d2: np.ndarray, resid: np.ndarray) -> np.ndarray:
        return (d2 > self.d2_max) | (resid > self.resid_max)

    def tensors(self, prefix: str = "domain.") -> dict[str, np.ndarray]:
        return {f"{prefix}center": self.center, f"{prefix}components": self.components,
                f"{prefix}eigvals": self.eigvals}

    def info(self) -> dict[str, Any]:
        return {"n_components": int(self.components.shape[0]), "d2_max": self.d2_max,
                "resid_max": self.resid_max, "quantile": self.quantile, "n_fit": self.n_fit}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], info: dict[str, Any], prefix: str = "domain.") -> "DomainModel":
        return cls(center=t[f"{prefix}center"], components=t[f"{prefix}components"],
                   eigvals=t[f"{prefix}eigvals"], d2_max=float(info["d2_max"]),
                   resid_max=float(info["resid_max"]), quantile=float(info["quantile"]),
                   n_fit=int(info["n_fit"]))


def _threshold(scores: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the scores when there are enough of them to estimate it
    (n (1 - q) >= 1), else 1.5 x their maximum (small training sets)."""
    if len(scores) * (1.0 - quantile) >= 1.0:
        return float(np.quantile(scores, quantile))
    return 1.5 * float(np.max(scores))


# ------------------------------------------------------------------------ plugins and rebuilding


def plugin_info(kind: str, name: str) -> dict[str, str]:
    """name, version and distribution of an installed plugin object, for the manifest."""
    from .registry import get_registry

    reg = get_registry()
    obj = reg.get(kind, name)
    item = reg.items[kind][name]
    return {"name": name, "version": str(getattr(obj, "version", "?")),
            "plugin": item.plugin.name, "distribution": item.plugin.distribution,
            "distribution_version": item.plugin.version}


def make_head(name: str, config: dict[str, Any] | None = None) -> Any:
    from .registry import get_registry

    factory = get_registry().get("head", name)
    try:
        return factory(**(config or {}))
    except TypeError as exc:
        raise UsageError(f"head {name!r}: bad configuration ({exc})") from exc


def make_adapter(name: str, config: dict[str, Any] | None = None) -> Any:
    from .registry import get_registry

    factory = get_registry().get("adapter", name)
    try:
        return factory(**(config or {}))
    except TypeError as exc:
        raise UsageError(f"adapter {name!r}: bad configuration ({exc})") from exc


def _require(mdir: ModelDir, kind: str, entry: dict[str, Any]) -> None:
    from .registry import get_registry

    reg = get_registry()
    name = entry["name"]
    if name not in reg.items[kind]:
        known = ", ".join(reg.names(kind)) or "none"
        raise ModelFileError(f"{mdir.path}: the model needs {kind} {name!r}, which is not installed "
                             f"(installed: {known})")
    have = str(getattr(reg.get(kind, name), "version", "?"))
    if entry.get("version") and have != str(entry["version"]):
        console.warn(f"{mdir.path}: trained with {kind} {name} {entry['version']}, installed is {have}")


def _load_strict(module: nn.Module, tensors: dict[str, np.ndarray], where: str) -> None:
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelFileError(f"{where}: weights do not fit the network the manifest describes ({first})") from exc


def _sub(t: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def load_base_net(mdir: ModelDir) -> tuple[StxNet, list[LabelSpec]]:
    """The network of a pretrained model directory, weights loaded (eval mode)."""
    m = mdir.manifest
    if mdir.kind != "pretrained":
        raise ModelFileError(f"{mdir.path}: expected a pretrained model, found a {mdir.kind} one")
    _require(mdir, "head", m["head"])
    head = make_head(m["head"]["name"], m["head"]["config"])
    specs = [LabelSpec.from_dict(d) for d in m["labels"]]
    module = head.build(int(m["input_dim"]), len(specs))
    t = mdir.tensors("model.safetensors")
    _load_strict(module, _sub(t, "head."), str(mdir.path / "model.safetensors"))
    net = StxNet(module, torch.from_numpy(t["norm.mean"]), torch.from_numpy(t["norm.scale"]))
    net.eval()
    return net, specs


def attach_saved_adapter(mdir: ModelDir, base: StxNet, folder: str = "") -> tuple[Any, nn.Module]:
    """Attach and load the adapter saved under ``folder`` of a fine-tuned model to a copy of
    ``base``'s head; return (adapter, adapted head)."""
    import copy

    cfg_rel = f"{folder}{ADAPTER_CONFIG}"
    acfg = mdir.json(cfg_rel)
    entry = acfg.get("stx_adapter")
    if not isinstance(entry, dict) or "name" not in entry:
        raise ModelFileError(f"{mdir.path / cfg_rel}: no stx_adapter entry naming the adapter")
    _require(mdir, "adapter", entry)
    adapter = make_adapter(entry["name"], entry.get("config", {}))
    head = adapter.attach(copy.deepcopy(base.head))
    state = {k: torch.from_numpy(np.array(v)) for k, v in mdir.tensors(f"{folder}{ADAPTER_WEIGHTS}").items()}
    try:
        adapter.load_state_dict(head, state)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = mdir.path / folder / ADAPTER_WEIGHTS
        raise ModelFileError(f"{where}: adapter weights do not fit the base ({first})") from exc
    return adapter, head


def front_featurizer(entry: dict[str, Any], where: Any) -> Any:
    """The featurizer of ``entry`` (name, version, config, key), rebuilt, that can give a
    trainable front (``front()``, ``front_input()``: the ``transformer`` featurizer's encoder);
    a one-line error when it is not installed or cannot."""
    from .pipeline import build_featurizer
    from .registry import get_registry
    from .store import featurizer_key
    from .train import featurizer_identity

    name = entry["name"]
    reg = get_registry()
    if name not in reg.items["featurizer"]:
        known = ", ".join(reg.names("featurizer")) or "none"
        raise ModelFileError(f"{where}: needs featurizer {name!r}, which is not installed (installed: {known})")
    feat = build_featurizer(name, entry["config"])
    if not callable(getattr(feat, "front", None)) or not callable(getattr(feat, "front_input", None)):
        raise UsageError(f"{where}: was trained on {name!r} features, which have no encoder in front to "
                         f"fine-tune; use the adapter's head-only default (target=head)")
    now = {"name": feat.name, "version": str(feat.version), "config": feat.config()}
    now["key"] = featurizer_key(now["name"], now["version"], now["config"])
    if featurizer_identity(now) != featurizer_identity(entry):
        raise ModelFileError(f"{where}: the installed featurizer {name} {feat.version} does not reproduce the "
                             f"recorded one ({entry.get('version')}): its embeddings would differ")
    return feat


def attach_saved_encoder(mdir: ModelDir, adapter: Any, front: nn.Module, folder: str = "") -> nn.Module:
    """Attach the adapter's encoder part to ``front`` and load its tensors from
    ``folder/encoder/``; return the front."""
    rel = f"{folder}{ENCODER_FOLDER}{ADAPTER_WEIGHTS}"
    mdir.json(f"{folder}{ENCODER_FOLDER}{ADAPTER_CONFIG}")  # listed and verified, like the weights
    front = adapter.attach_encoder(front)
    state = {k: torch.from_numpy(np.array(v)) for k, v in mdir.tensors(rel).items()}
    try:
        adapter.load_encoder_state_dict(front, state)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{mdir.path / rel}: encoder adapter weights do not fit the encoder ({first})") from exc
    return front


@dataclass
class LoadedModel:
    """Everything predict needs, rebuilt from a model directory's manifest alone."""

    mdir: ModelDir
    specs: list[LabelSpec]
    nets: list[StxNet]  # one per adapter in use (one for pretrained / single-adapter models)
    label_net: list[int]  # for each label, the index of the net that predicts it
    domains: list[DomainModel]
    featurizer: dict[str, Any]
    input_dim: int
    #: a model fine-tuned through its encoder: raw features + ivar -> embedding (eval mode)
    front: nn.Module | None = None
    #: per label, the factor applied to the predicted 1-sigma error (the manifest's
    #: ``error_calibration``, fitted on the validation stars; 1 for models written without it)
    err_scale: np.ndarray | None = None
    _zbuf: torch.Tensor | None = field(default=None, repr=False)
    _folded: dict[str, Any] = field(default_factory=dict, repr=False)

    def _fold(self, device: Any) -> tuple[Linear, int] | None:
        """The first net's first layer (its head's optional ``first_layer()``) with every domain
        model's projection appended, as one product (:func:`stxcli.linear.linear_fn`: oneDNN's
        kernel on the CPU), and the width of the first layer; None when the head does not offer
        it. Built once per device (the nets do not change in predict)."""
        key = str(device)
        if key not in self._folded:
            first = getattr(self.nets[0].head, "first_layer", None)
            wb = first() if callable(first) and hasattr(self.nets[0].head, "forward_from_first") else None
            if wb is None or not self.domains:
                self._folded[key] = None
            else:
                w, b = (t.detach().to(device) for t in wb)
                proj = [dm.projection(device).to(w.dtype) for dm in self.domains]
                rows = int(w.shape[0]) + sum(p.shape[0] for p in proj)
                # zero rows up to a multiple of 32 outputs: MKL's product for 512 + 17 outputs took
                # 1.3x that for 544 (4096 x 3500 rows, 2 threads)
                pad = torch.zeros(-rows % 32, w.shape[1], dtype=w.dtype, device=w.device)
                zeros = torch.zeros(rows - int(w.shape[0]) + pad.shape[0], dtype=b.dtype, device=b.device)
                self._folded[key] = (linear_fn(torch.cat([w, *proj, pad]).contiguous(), torch.cat([b, zeros])),
                                     int(w.shape[0]))
        return self._folded[key]

    @property
    def label_names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def needs_ivar(self) -> bool:
        """Whether :meth:`predict` needs the features' ivar (the encoder masks ivar-0 pixels)."""
        return self.front is not None

    def to(self, device: str) -> "LoadedModel":
        self.nets = [n.to(device) for n in self.nets]
        if self.front is not None:
            self.front = self.front.to(device)
        return self

    def _embed(self, x: np.ndarray, ivar: np.ndarray | None, device: str) -> np.ndarray:
        if ivar is None:
            raise StxError(f"{self.mdir.path}: this model's input is raw spectra run through its encoder; "
                           "predicting needs the features' ivar too")
        assert self.front is not None
        x = np.ascontiguousarray(x, dtype=np.float32)
        ivar = np.ascontiguousarray(ivar, dtype=np.float32)
        step = 512 if str(device).startswith("cuda") else FrontNet.row_batch
        out = np.empty((x.shape[0], int(self.nets[0].feature_mean.shape[0])), np.float32)
        for s in range(0, x.shape[0], step):
            e = min(s + step, x.shape[0])
            out[s:e] = self.front(torch.from_numpy(x[s:e]).to(device),
                                  torch.from_numpy(ivar[s:e]).to(device)).float().cpu().numpy()
        return out

    @torch.no_grad()
    def predict(self, x: np.ndarray, device: str = "cpu", ivar: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Features (B, D) -> physical ``value`` and ``err`` (B, L) and ``out_of_domain`` (B,).
        A model with an encoder front takes raw features and needs their ``ivar``.

        The batch-sized work (standardisation into a reused buffer, the networks, the domain
        projections) runs in torch; the few numbers per star after it in numpy."""
        if self.front is not None:
            x = self._embed(x, ivar, device)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        n, L = xt.shape[0], len(self.specs)
        buf = self._zbuf
        if buf is None or buf.shape[0] < n or buf.shape[1] != xt.shape[1] or buf.device != xt.device:
            buf = self._zbuf = torch.empty(xt.shape, device=xt.device)
        # every net of one model shares the base's feature standardisation: standardise once
        z = self.nets[0].standardize(xt, out=buf[:n])
        fold = self._fold(z.device)
        mean = np.empty((n, L))
        var = np.empty((n, L))
        q = None
        for i, net in enumerate(self.nets):
            cols = [j for j in range(L) if self.label_net[j] == i]
            folded = i == 0 and fold is not None  # run even without labels: it gives the domain's q
            if not (cols or folded):
                continue
            if folded:
                # the first layer and the domain projections in one product: z is read once
                first, h = fold
                y = first(z)
                q = y[:, h:]
                mu, lv = net.head.forward_from_first(y[:, :h])
            else:
                mu, lv = net.head(z)
            if cols:
                m, v = combine_members_np(mu.cpu().numpy(), lv.cpu().numpy())
                mean[:, cols], var[:, cols] = m[:, cols], v[:, cols]
        ood = np.ones(n, dtype=bool)
        if q is None:
            for dm in self.domains:
                ood &= dm.outside(z)
        else:
            znorm = torch.linalg.vector_norm(z, dim=1)
            at = 0
            for dm in self.domains:
                k1 = dm.components.shape[0] + 1
                ood &= dm.outside_scores(*dm.scores_from(q[:, at:at + k1], znorm, z.shape[1]))
                at += k1
        value, err = decode_labels(self.specs, mean, var)
        if self.err_scale is not None:
            err *= self.err_scale
        return {"value": value, "err": err, "out_of_domain": ood}


def error_scales(manifest: dict[str, Any], specs: list[LabelSpec]) -> np.ndarray:
    """The per-label error factors of a manifest (ones when it has no ``error_calibration``)."""
    cal = (manifest.get("error_calibration") or {}).get("labels", {})
    return np.array([float(cal.get(s.name, {}).get("factor", 1.0)) for s in specs], dtype=np.float64)


def load_model(path: Any, *, merge: bool = True) -> LoadedModel:
    """Rebuild a model (pretrained or fine-tuned) from its directory; every file verified, and
    its errors scaled by the manifest's calibration."""
    model = _load_model(path, merge=merge)
    model.err_scale = error_scales(model.mdir.manifest, model.specs)
    return model


def _load_model(path: Any, *, merge: bool = True) -> LoadedModel:
    """Rebuild a model (pretrained or fine-tuned) from its directory; every file verified."""
    mdir = path if isinstance(path, ModelDir) else ModelDir(path)
    m = mdir.manifest
    if mdir.kind == "pretrained":
        net, specs = load_base_net(mdir)
        t = mdir.tensors("model.safetensors")
        domains = [DomainModel.from_tensors(t, m["domain"])]
        return LoadedModel(mdir, specs, [net], [0] * len(specs), domains, m["featurizer"], int(m["input_dim"]))
    if mdir.kind != "finetuned":
        raise ModelFileError(f"{mdir.path}: unknown model kind {mdir.kind!r}")
    base_dir = mdir.resolve_base()
    base, specs = load_base_net(base_dir)
    domains = [DomainModel.from_tensors(base_dir.tensors("model.safetensors"), base_dir.manifest["domain"])]
    if m.get("domain"):
        domains.append(DomainModel.from_tensors(mdir.tensors("domain.safetensors"), m["domain"]))
    folders = m["adapter"].get("folders", {"": ""})  # adapter name -> folder
    selection = m["adapter"].get("selection")  # label -> adapter name (auto)
    enc = m.get("encoder")
    if enc and len(folders) != 1:
        raise ModelFileError(f"{mdir.path}: an encoder-adapted model holds exactly one adapter")
    front = None
    nets, names = [], []
    for aname, folder in folders.items():
        adapter, head = attach_saved_adapter(mdir, base, folder)
        if merge:
            head = adapter.merge(head)
        if enc:
            if not getattr(adapter, "targets_encoder", False):
                raise ModelFileError(f"{mdir.path}: the manifest records an encoder, but adapter "
                                     f"{adapter.name} {adapter.config()} does not fine-tune one")
            from .pipeline import searching_assets

            with searching_assets(mdir.assets()):
                feat = front_featurizer(enc["featurizer"], mdir.path)
            if feat.encoder_sha256 != enc["encoder_sha256"]:
                raise ModelFileError(f"{mdir.path}: its base encoder sha256 {enc['encoder_sha256'][:16]}... is not "
                                     f"the one the featurizer found ({feat.encoder_sha256[:16]}...)")
            front = attach_saved_encoder(mdir, adapter, feat.front(), folder)
            if merge:
                front = adapter.merge_encoder(front)
            front.eval()
        net = StxNet(head, base.feature_mean, base.feature_scale)
        net.eval()
        nets.append(net)
        names.append(aname)
    if selection:
        label_net = [names.index(selection[s.name]) for s in specs]
    else:
        label_net = [0] * len(specs)
    if enc:  # the model's input is what the encoder consumes (raw features), not embeddings
        return LoadedModel(mdir, specs, nets, label_net, domains, m["featurizer"], int(m["input_dim"]), front)
    return LoadedModel(mdir, specs, nets, label_net, domains, base_dir.manifest["featurizer"],
                       int(base_dir.manifest["input_dim"]))

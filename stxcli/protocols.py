"""The small typed protocols every plugin kind implements.

A plugin registers *objects* through a hook (see :mod:`stxcli.hookspecs`); each object has a
unique ``name`` within its kind and a ``version`` string. The core only ever talks to these
protocols, never to a concrete survey or model.

* :class:`Reader` instances are registered as they are (they are stateless).
* :class:`FeaturizerFactory`, :class:`HeadFactory` and :class:`AdapterFactory` are registered as
  classes (or any callable with ``name``/``version`` attributes) and instantiated with a config.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .spectra import SpectrumBatch, SpectrumMeta

# --------------------------------------------------------------------------------------- readers

#: Priority of a reader that knows one survey's layout; outranks generic readers.
PRIORITY_SURVEY = 100
#: Priority of a generic reader (e.g. any 1-D FITS spectrum).
PRIORITY_GENERIC = 10


class HduInfo:
    """What the core learned about one HDU without reading its data: ``index``, ``name`` (EXTNAME
    upper-cased, "PRIMARY" for HDU 0 without one), ``kind`` ("primary", "image", "bintable",
    "table", "compimage", "other"), ``columns`` (a table's TTYPEs, upper-cased), ``shape`` (numpy
    order) and ``header``, its ``astropy.io.fits.Header``.

    Given ``header_text`` (the header's cards, as the probe's scan finds them) instead of a
    header, the header is parsed on first use: most readers' ``identify`` never looks at most
    headers, and a DESI coadd's 19 cost the probe three quarters of its time.

    ``cards`` is the cheap way to look keywords up (``get``, ``[]``, ``in``): the probe scan's
    keyword -> value dict where there is one (the values astropy gives), else the astropy header.
    An ``identify`` that only reads a few keywords should use it: parsing a LAMOST primary header
    with astropy cost 1.4 ms a file, a sixth of predicting from one-spectrum files."""

    __slots__ = ("index", "name", "kind", "columns", "shape", "_header", "_header_text", "_cards")

    def __init__(self, index: int, name: str, kind: str, header: Any = None, columns: tuple[str, ...] = (),
                 shape: tuple[int, ...] = (), *, header_text: str | None = None,
                 cards: Mapping[str, Any] | None = None) -> None:
        self.index, self.name, self.kind = index, name, kind
        self.columns, self.shape = tuple(columns), tuple(shape)
        self._header, self._header_text = header, header_text
        self._cards = cards

    @property
    def cards(self) -> Mapping[str, Any]:
        return self._cards if self._cards is not None else self.header

    @property
    def header(self) -> Any:
        if self._header is None and self._header_text is not None:
            from astropy.io import fits

            self._header = fits.Header.fromstring(self._header_text)
        return self._header

    def __repr__(self) -> str:
        return (f"HduInfo(index={self.index}, name={self.name!r}, kind={self.kind!r}, "
                f"columns={self.columns!r}, shape={self.shape!r})")


@dataclass(frozen=True)
class FileProbe:
    """A cheap summary of one input file, built once and shown to every reader's ``identify``."""

    path: Path
    suffix: str  # lower-case, compression suffix stripped: ".fits"
    compressed: bool
    hdus: tuple[HduInfo, ...] = ()

    def hdu(self, name: str) -> HduInfo | None:
        for h in self.hdus:
            if h.name == name.upper():
                return h
        return None

    @property
    def primary_header(self) -> Any:
        return self.hdus[0].header if self.hdus else None


@runtime_checkable
class Reader(Protocol):
    """Reads one survey's files into :class:`~stxcli.spectra.SpectrumBatch` chunks."""

    name: str
    version: str
    priority: int
    extensions: tuple[str, ...]
    description: str

    def identify(self, probe: FileProbe) -> bool:
        """True when this reader can read the probed file. Cheap and pure: headers only."""

    def read(
        self, path: Path, *, chunk_size: int = 1024, with_resolution: bool = False
    ) -> Iterator[SpectrumBatch]:
        """Yield batches of at most ``chunk_size`` spectra, with flat memory."""


# ----------------------------------------------------------------------------------- featurizers


@dataclass
class FeatureBatch:
    """Features of ``n`` spectra. No NaN or inf: a missing feature has ``ivar == 0``.

    ``quality`` holds per-spectrum arrays: at least ``snr`` (float32), ``masked_frac`` (float32)
    and ``flags`` (int32 bitmask, see :mod:`stxcli.flags`); featurizers may add more (``rv_kms``).
    """

    features: np.ndarray  # (n, d) float32
    ivar: np.ndarray  # (n, d) float32
    quality: dict[str, np.ndarray]
    meta: SpectrumMeta
    # Human-readable provenance a featurizer wants to report (e.g. "rv estimated for 12 spectra").
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Featurizer(Protocol):
    """Turns a batch from any survey into one float32 vector per star."""

    name: str
    version: str
    #: True when this featurizer uses DESI-style resolution matrices (readers then load them).
    needs_resolution: bool

    @property
    def dim(self) -> int: ...

    def config(self) -> dict[str, Any]:
        """The full configuration: ``factory(**config())`` rebuilds an identical featurizer."""

    def transform(self, batch: SpectrumBatch) -> FeatureBatch: ...

    def axis(self) -> np.ndarray | None:
        """The feature axis (e.g. the wavelength grid of the raw featurizer), or None."""

    # Optional members, looked up with getattr (a featurizer without them works):
    #
    # ``thread_safe: bool`` (default False): ``transform`` may run in several threads at once on
    #   different batches. ``stx featurize --threads N`` and ``stx predict`` from survey files
    #   then transform N batches in parallel; for any other featurizer they run one at a time.
    # ``row_independent: bool`` (default False): each spectrum's features depend on that spectrum
    #   alone, not on the others of its batch. Consecutive one-spectrum files (LAMOST, MILES) are
    #   then featurized as one batch and cut back (``stxcli.coalesce``): much less fixed cost per
    #   spectrum; the features must equal those of the spectra one by one to float32 rounding.
    # ``prepare() -> None``: build what does not depend on the input (bases, templates, imports)
    #   once, before worker processes are forked or threads started; must not start threads.
    # ``identity_config(config) -> dict`` (on the factory): the part of a config that determines
    #   the numbers, when the config also says where or on what device (the transformer's
    #   encoder path); stores and models are compared by it (``stxcli.store.featurizer_identity``).
    # ``front(device)`` / ``front_input()``: for adapters that fine-tune an encoder (see
    #   :class:`Adapter`).
    # ``assets(config) -> dict[str, Path]`` (on the factory): the directories a recorded config
    #   reads besides its numbers (the transformer's encoder), by role, found without building the
    #   featurizer. ``stx finetune --embed-base`` copies them into the model's ``assets/``; while
    #   the core rebuilds a model's featurizers,
    #   ``stxcli.pipeline.asset_dirs()`` lists that folder, for the featurizer to search when a
    #   directory is not where its config says (the transformer searches it by sha256).


class FeaturizerFactory(Protocol):
    name: str
    version: str
    description: str

    def __call__(self, **config: Any) -> Featurizer: ...


# ------------------------------------------------------------------------------ heads, adapters


class Head(Protocol):
    """A configured regression head (what ``HeadFactory(**config)`` returns).

    The network it builds maps *standardised* features ``(B, D)`` (the core subtracts the
    training mean and divides by the standard deviation) to a mean and a log-variance per label
    in *standardised label space*, each shaped ``(K, B, L)`` where ``K`` is the number of ensemble
    members (1 without an ensemble). The core owns label transforms, standardisation, the loss,
    the training loop, saving and predicting; a head only builds (and, if closed-form, fits) the
    network. Full contract and a worked example: docs/models.md.
    """

    name: str
    version: str
    #: True when the head is fitted by :meth:`fit` (e.g. ridge) instead of gradient descent.
    closed_form: bool

    def config(self) -> dict[str, Any]:
        """The full configuration (every default spelled out): ``factory(**config())`` rebuilds
        an identical head."""

    def build(self, in_dim: int, n_labels: int) -> Any:
        """A ``torch.nn.Module``: ``forward(x) -> (mean, logvar)``, each ``(K, B, L)``.

        Optional on the module: ``forward_hidden(x) -> (mean, logvar, hidden)`` with ``hidden``
        ``(B, H)`` and an int attribute ``hidden_dim = H`` (the residual adapter can use it);
        ``first_layer() -> (weight (F, D), bias (F,)) | None`` and ``forward_from_first(h)``
        (``h = x @ weight.T + bias``, possibly a strided view) ``-> (mean, logvar)``: the one
        linear map that reads the input, so ``stx predict`` computes it together with the domain
        projections in one matrix product instead of reading the features twice."""

    def fit(self, module: Any, data: Any) -> dict[str, Any]:
        """Closed-form heads only: fit ``module`` in place from ``data`` (a
        :class:`stxcli.train.FitData`: ``iter_train()`` / ``iter_val()`` yield standardised
        ``(x, y, w)`` numpy chunks, NaN where a label is missing); return a small JSON-able info
        dict (chosen regularisation, ...)."""

    def training_defaults(self) -> dict[str, Any]:
        """Optional: defaults for the training loop (``lr``, ``epochs``, ``batch_size``, ...)."""


class HeadFactory(Protocol):
    """Registered through ``register_heads``; ``factory(**config)`` returns a :class:`Head`.
    Unknown config keys raise ``TypeError`` (shown to the user as a usage error)."""

    name: str
    version: str
    description: str

    def __call__(self, **config: Any) -> Head: ...


class Adapter(Protocol):
    """A configured fine-tuning adapter (what ``AdapterFactory(**config)`` returns).

    It wraps a pre-trained head network (the module :meth:`Head.build` made, weights loaded)
    without changing its input/output contract. Saved as ``adapter_config.json`` (from
    :meth:`adapter_config`) plus ``adapter_model.safetensors`` (from :meth:`state_dict`), apart
    from the base, so one base serves many adapters. Full contract: docs/models.md.
    """

    name: str
    version: str

    def config(self) -> dict[str, Any]:
        """The full configuration: ``factory(**config())`` rebuilds an identical adapter."""

    def attach(self, base: Any) -> Any:
        """Freeze what must stay frozen and return the module to train (same forward contract as
        the base). Fresh adapter weights must leave the output equal to the base's."""

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups (``{"params": [...], "lr_scale": 1.0}``): exactly the
        trainable tensors; ``lr_scale`` multiplies the learning rate (layer-wise decay)."""

    def state_dict(self, model: Any) -> dict[str, Any]:
        """The adapter's own tensors, under the names they are saved with."""

    def load_state_dict(self, model: Any, tensors: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned into a freshly attached ``model`` (strict)."""

    def merge(self, model: Any) -> Any:
        """A module for inference with the adapter folded in where it can be (LoRA), else
        ``model`` itself."""

    def adapter_config(self) -> dict[str, Any]:
        """The JSON written to ``adapter_config.json``."""

    def training_defaults(self) -> dict[str, Any]:
        """Defaults for the fine-tuning loop (``lr``, ``epochs``, ``patience``, ...)."""

    # Optional: adapters that also reach into a featurizer's encoder (``--set target=encoder``
    # or ``encoder+head``; the built-in ``lora`` and ``full``), looked up with getattr:
    #
    # ``targets_encoder: bool`` - True when this configuration trains the encoder too; the
    #   featurizer must then offer ``front()`` / ``front_input()`` (below).
    # ``attach_encoder(front) -> front``, ``encoder_param_groups(front)``,
    #   ``encoder_state_dict(front)``, ``load_encoder_state_dict(front, tensors)``,
    #   ``merge_encoder(front)``, ``encoder_adapter_config()``: :meth:`attach` ... :meth:`adapter_config`
    #   for the encoder module; its tensors are saved in the model's ``encoder/`` folder.
    #
    # The featurizer side (optional members of :class:`Featurizer`): ``front(device) -> nn.Module``
    # maps the input features and their ivar ``(B, D)`` to the embedding (differentiable), and
    # ``front_input() -> dict`` is the featurizer entry (name, version, config) whose features
    # that module takes (the transformer's: its raw featurizer). Full contract: docs/models.md.


class AdapterSelector(Protocol):
    """An adapter that trains no weights itself but chooses, per label, among ``candidates``
    (other adapters' names) from their validation scores (the built-in ``auto``)."""

    name: str
    version: str
    candidates: list[str]
    metric: str

    def config(self) -> dict[str, Any]: ...

    def choose(self, scores: dict[str, dict[str, float]]) -> dict[str, str]:
        """``scores[candidate][label]`` (lower is better) -> ``{label: candidate}``."""


class AdapterFactory(Protocol):
    """Registered through ``register_adapters``; ``factory(**config)`` returns an
    :class:`Adapter` (or an :class:`AdapterSelector`)."""

    name: str
    version: str
    description: str

    def __call__(self, **config: Any) -> Adapter: ...


KINDS = ("reader", "featurizer", "head", "adapter")

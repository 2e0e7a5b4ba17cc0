"""Plugin loading: entry points of the ``stx`` group, one by one, with provenance and status.

Built-ins get no privileges: they are entry points of the ``stx`` distribution, loaded exactly
like a third-party package's. A plugin that fails to import, or whose module implements a hook
that does not exist (a misspelling), is recorded as *broken* with the reason and left out; the
CLI keeps working.

Selection, read when loading (not at import):

* ``STX_LOAD_PLUGINS=a,b``: load only these; each item is an entry-point name or a
  distribution name (``STX_LOAD_PLUGINS=stx`` loads the built-ins only).
* ``STX_DISABLE_PLUGINS=a,b``: skip these (same matching).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

import pluggy

from . import hookspecs

GROUP = "stx"


@dataclass
class PluginInfo:
    """One entry point of the ``stx`` group and what became of it."""

    name: str  # entry-point name
    module: str  # entry-point value
    distribution: str
    version: str
    status: str = "ok"  # "ok" | "broken" | "disabled"
    error: str | None = None
    provides: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)


def _selected(info: PluginInfo, load: list[str] | None, disable: list[str]) -> bool:
    keys = {info.name, info.distribution}
    if load is not None and not keys & set(load):
        return False
    return not keys & set(disable)


def _env_list(var: str) -> list[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return [s.strip() for s in raw.split(",") if s.strip()]


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


class PluginSet:
    """The loaded plugin manager plus the provenance table ``stx plugins`` shows."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}

    def add_module(self, info: PluginInfo, module: ModuleType) -> None:
        """Register one plugin module; mark it broken if pluggy rejects it or a hook name is
        unknown (a misspelled ``register_reader`` would otherwise be silently ignored)."""
        self.infos[info.name] = info
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:  # pluggy.PluginValidationError and friends
            info.status, info.error = "broken", f"{type(exc).__name__}: {exc}"
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=info.name)
            info.status, info.error = "broken", f"unknown hook: {exc}"

    def ok_names(self) -> set[str]:
        return {n for n, i in self.infos.items() if i.status == "ok"}


def load_plugins(extra: list[tuple[PluginInfo, ModuleType]] | None = None) -> PluginSet:
    """Load every selected entry point of the ``stx`` group (plus ``extra`` modules, for tests)."""
    ps = PluginSet()
    load, disable = _env_list("STX_LOAD_PLUGINS"), _env_list("STX_DISABLE_PLUGINS") or []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        dist, version = _dist_of(ep)
        info = PluginInfo(name=ep.name, module=ep.value, distribution=dist, version=version)
        if info.name in ps.infos:
            info.status = "broken"
            info.error = (
                f"entry point name {info.name!r} is used by both "
                f"{ps.infos[info.name].distribution} and {dist}"
            )
            ps.infos[f"{info.name} ({dist})"] = info
            continue
        if not _selected(info, load, disable):
            info.status = "disabled"
            ps.infos[info.name] = info
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the CLI down
            info.status, info.error = "broken", f"import failed: {type(exc).__name__}: {exc}"
            ps.infos[info.name] = info
            continue
        ps.add_module(info, module)
    for info, module in extra or []:
        ps.add_module(info, module)
    return ps

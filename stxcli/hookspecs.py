"""The hooks a stx plugin can implement.

A plugin is a module listed in the ``stx`` entry-point group. It marks its implementations
with :data:`hookimpl`::

    from stxcli.hookspecs import hookimpl

    @hookimpl
    def register_readers(register):
        register(MyReader())

Every hook receives a ``register`` callable (or the typer app); a plugin may implement any
subset. Names are unique per kind across all plugins: a second registration of the same name
is an error naming both plugins.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "stx"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_readers(register: Callable[[Any], None]) -> None:
    """Register survey readers: ``register(reader)`` for each object implementing
    :class:`stxcli.protocols.Reader` (``name``, ``version``, ``priority``, ``extensions``,
    ``identify(probe)``, ``read(path, chunk_size=..., with_resolution=...)``)."""


@hookspec
def register_featurizers(register: Callable[[Any], None]) -> None:
    """Register featurizer factories: ``register(factory)`` where ``factory(**config)`` returns a
    :class:`stxcli.protocols.Featurizer` and the factory has ``name`` and ``version``."""


@hookspec
def register_heads(register: Callable[[Any], None]) -> None:
    """Register regression heads: ``register(factory)``; ``factory(**config)`` returns a head
    (features -> a mean and a log-variance per label)."""


@hookspec
def register_adapters(register: Callable[[Any], None]) -> None:
    """Register fine-tuning adapters: ``register(factory)``; the adapter attaches to a model,
    lists its trainable parameters, saves and loads only its own tensors and may merge."""


@hookspec
def register_commands(app: Any) -> None:
    """Add subcommands to the ``stx`` typer app (``app.command()(fn)`` or ``app.add_typer``).
    Import heavy libraries inside the command function, not at module import."""

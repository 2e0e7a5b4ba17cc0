"""Where output goes: results on stdout, progress, warnings and errors on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


#: width of result tables written to a file or a pipe (rich's default there is 80 columns,
#: which folded the demo's comparison table into four lines a row); $COLUMNS still rules
PIPE_WIDTH = 160


def out():
    """The stdout console (results only)."""
    import os

    from rich.console import Console

    piped = not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty())
    width = PIPE_WIDTH if piped and not os.environ.get("COLUMNS") else None
    return Console(file=sys.stdout, soft_wrap=True, width=width)


def err():
    """The stderr console (progress, warnings)."""
    from rich.console import Console

    return Console(file=sys.stderr, soft_wrap=True)


def warn(message: str) -> None:
    """A one-line warning on stderr (shown even with --quiet: warnings matter)."""
    print(f"warning: {message}", file=sys.stderr)


def info(message: str) -> None:
    if not _state["quiet"]:
        print(message, file=sys.stderr)


def print_json(obj: Any) -> None:
    from .io import jsonable

    sys.stdout.write(json.dumps(obj, indent=2, default=jsonable) + "\n")


def print_summary(title: str, summary: dict[str, Any], json_out: bool) -> None:
    """A command's summary on stdout: JSON with ``--json``, else a two-column rich table."""
    if json_out:
        print_json(summary)
        return
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column("key")
    t.add_column("value")
    for k, v in summary.items():
        t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    out().print(t)


def progress_enabled() -> bool:
    return not _state["quiet"] and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: float | None) -> Iterator[Any]:
    """A rich progress bar on stderr, or a no-op when quiet / --json / stderr is not a TTY.

    Yields an object with ``advance(n)`` and ``update(**fields)``.
    """
    if not progress_enabled():
        yield _NullBar()
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    cols = [TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}")]
    with Progress(*cols, console=err(), transient=False) as prog:
        task = prog.add_task(description, total=total, status="")
        yield _Bar(prog, task)


class _NullBar:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


class _Bar:
    def __init__(self, prog: Any, task: Any) -> None:
        self.prog, self.task = prog, task

    def advance(self, n: float = 1) -> None:
        self.prog.advance(self.task, n)

    def update(self, **fields: Any) -> None:
        self.prog.update(self.task, **fields)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    with progress(description, total) as bar:
        for item in items:
            yield item
            bar.advance(1)

"""The stx error family.

Every error a user can cause is a :class:`StxError`. The CLI's single error boundary
(:func:`stxcli.cli.main.main`) turns one into a one-line ``error: ...`` message on stderr and
its ``exit_code``; ``STX_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

from pathlib import Path


class StxError(Exception):
    """A data or runtime error: bad input, missing file, inconsistent model... (exit 1)."""

    exit_code: int = 1


class UsageError(StxError):
    """The command line itself is wrong: unknown option value, missing argument (exit 2)."""

    exit_code = 2


class FormatError(StxError):
    """A file could not be identified, or is not what its format promises."""


class UnknownFormat(FormatError):
    """No installed reader recognises the file at ``path``."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class PluginError(StxError):
    """A plugin is missing, broken, or registers a name another plugin already has."""


class ModelFileError(StxError):
    """A model directory is missing, tampered with, or inconsistent with its inputs."""

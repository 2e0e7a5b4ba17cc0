"""``python -m stxcli`` runs the CLI."""

from .cli.main import run

run()

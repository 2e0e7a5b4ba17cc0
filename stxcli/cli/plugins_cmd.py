"""``stx plugins``: every plugin by kind, name, distribution, version and status."""

from __future__ import annotations

import typer

from .. import console


def plugin_rows() -> list[dict[str, str | None]]:
    from ..registry import get_registry

    reg = get_registry()
    rows: list[dict[str, str | None]] = []
    for info in reg.plugins.infos.values():
        provided = list(info.provides) or [("-", info.name)]
        for kind, name in provided:
            obj_version = None
            if kind in reg.items and name in reg.items[kind]:
                obj_version = reg.items[kind][name].version
            rows.append({
                "kind": kind, "name": name, "plugin": info.name, "distribution": info.distribution,
                "version": info.version, "component_version": obj_version,
                "status": info.status, "error": info.error,
            })
    return sorted(rows, key=lambda r: (r["kind"] or "", r["name"] or ""))


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
        """List installed plugins: kind, name, distribution, version and status (ok/broken/disabled)."""
        rows = plugin_rows()
        if json_out:
            console.print_json(rows)
            return
        from rich.table import Table

        table = Table(title="stx plugins")
        for col in ("kind", "name", "distribution", "version", "status"):
            table.add_column(col)
        for r in rows:
            status = r["status"] if not r["error"] else f"{r['status']}: {r['error']}"
            table.add_row(r["kind"], r["name"], r["distribution"], r["component_version"] or r["version"], status)
        console.out().print(table)

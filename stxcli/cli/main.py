"""The ``stx`` typer app and its single error boundary."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import typer

from .. import __version__
from ..errors import StxError

#: Core command modules; each defines ``register(app)``. Plugins add more via register_commands.
CORE_COMMANDS = ("plugins_cmd", "featurize", "evaluate", "pretrain", "finetune", "predict")

HELP = """stx: carry a stellar-parameter model from one spectroscopic survey to another.

Typical flow: featurize survey files into a feature store, pretrain a head on the source
survey, finetune it on a few hundred labelled target stars, predict, evaluate.
Results go to stdout (a table, or JSON with --json); progress and errors go to stderr.
Set STX_DEBUG=1 to see tracebacks.
"""


def _version(value: bool) -> None:
    if value:
        print(f"stx {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False, rich_markup_mode=None)

    @app.callback()
    def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="Print the stx version and exit.")) -> None:
        pass

    for mod in CORE_COMMANDS:
        importlib.import_module(f"{__package__}.{mod}").register(app)
    _plugin_commands(app)
    return app


def _plugin_commands(app: typer.Typer) -> None:
    from ..registry import get_registry

    try:
        reg = get_registry()
    except StxError as exc:  # e.g. a duplicate name: still let `stx plugins` and --help work
        print(f"warning: {exc}", file=sys.stderr)
        return
    for impl in reg.plugins.pm.hook.register_commands.get_hookimpls():
        info = reg.plugins.infos[impl.plugin_name]
        before = _command_names(app)
        try:
            impl.function(app=app)
        except Exception as exc:
            info.status, info.error = "broken", f"register_commands failed: {exc}"
            continue
        info.provides.extend(("command", n) for n in sorted(_command_names(app) - before))


def _command_names(app: typer.Typer) -> set[str]:
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    return names | {g.name or "?" for g in app.registered_groups}


def _click_kind(exc: BaseException) -> str | None:
    """'exit', 'usage' or 'abort' for click's exceptions (typer may vendor its own click, so
    match on the class hierarchy's names rather than on one module's classes)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "Exit" in names:
        return "exit"
    if "ClickException" in names:
        return "usage"
    if "Abort" in names:
        return "abort"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 data error, 2 usage, 130 interrupted)."""
    debug = os.environ.get("STX_DEBUG", "") not in ("", "0")
    from .. import console

    console.set_quiet(False)  # each call starts afresh (in-process callers run several commands)
    try:
        app = build_app()
        typer.main.get_command(app).main(args=argv, prog_name="stx", standalone_mode=False)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except StxError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        kind = _click_kind(exc)
        if kind == "exit":
            return int(getattr(exc, "exit_code", 0))
        if kind == "usage":  # bad command line: click's own message, exit 2
            exc.show()  # type: ignore[attr-defined]
            return int(getattr(exc, "exit_code", 2))
        if kind == "abort":
            print("error: interrupted", file=sys.stderr)
            return 130
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {type(exc).__name__}: {exc} (set STX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def run() -> None:  # console-script entry point
    sys.exit(main())

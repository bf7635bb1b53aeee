"""The ``evomerge`` command line.

Import-light: no torch / transformers at import time; each command imports what it needs.
Sub-commands live next to the code they drive and are registered here.
"""

from __future__ import annotations

import sys

import typer

from evomerge.errors import EvomergeError


def _register_zoo(app: typer.Typer) -> None:
    from evomerge.zoo.cli import app as zoo_app

    app.add_typer(zoo_app, name="zoo")


def _module(name: str):
    """The registration of a module that owns commands: its ``register(app)``, imported when called."""
    def register(app: typer.Typer) -> None:
        import importlib

        importlib.import_module(name).register(app)
    return register


_SEARCH = _module("evomerge.search.cli")

# --- command registration: top-level command name -> the function that registers it (one per
# module that owns commands; a module registering several is listed under each name)
_COMMANDS = {
    "merge": _module("evomerge.merge_cli"),
    "zoo": _register_zoo,
    "irt": _module("evomerge.irt_cli"),
    "search": _SEARCH,
    "report": _SEARCH,
    "eval": _module("evomerge.eval_cli"),
    "stats": _module("evomerge.stats_cli"),
    "nino-convert": _module("evomerge.nino_cli"),
    "align": _module("evomerge.align_cli"),
    "adamerge": _module("evomerge.learned_cli"),
    "metamerge": _module("evomerge.metamerge_cli"),
    "route": _module("evomerge.route_cli"),
}


def build_app(command: str | None = None) -> typer.Typer:
    """The CLI app: with ``command`` (a top-level command name) only the module that owns it is
    imported (``evomerge merge`` does not pay for the search / IRT / zoo modules); otherwise all."""
    app = typer.Typer(
        name="evomerge",
        help="Evolutionary model merging with IRT-estimated fitness.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(_root)
    registers = [_COMMANDS[command]] if command in _COMMANDS else list(dict.fromkeys(_COMMANDS.values()))
    for register in registers:
        register(app)
    return app


def __getattr__(name: str):
    if name == "app":  # the full app, built on first use
        return build_app()
    raise AttributeError(name)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("evomerge")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "unknown"


def _version_option(value: bool) -> None:
    if value:
        typer.echo(f"evomerge {_version()}")
        raise typer.Exit(0)


def _root(
    version: bool = typer.Option(False, "--version", help="print the version and exit",
                                 callback=_version_option, is_eager=True),
) -> None:
    """Evolutionary model merging with IRT-estimated fitness."""


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException classes, Abort classes) of the click typer uses: typer >= 0.29 vendors it as
    ``typer._click``; older typer uses the real ``click``."""
    shown: list[type] = []
    abort: list[type] = []
    for mod in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                import importlib

                m = importlib.import_module(mod)
            except ImportError:
                continue
        if hasattr(m, "ClickException"):
            shown.append(m.ClickException)
        if hasattr(m, "Abort"):
            abort.append(m.Abort)
    return tuple(shown), tuple(abort)


def _report(exc: BaseException) -> int:
    """Print one line (or click's usage + error) for ``exc``; returns the exit status."""
    import os

    if isinstance(exc, EvomergeError):
        typer.echo(f"error: {exc}", err=True)
        return 2
    irt_errors = sys.modules.get("irt.errors")  # the standalone irt package's user errors
    if irt_errors is not None and isinstance(exc, irt_errors.IRTError):
        typer.echo(f"error: {exc}", err=True)
        return 2
    shown, abort = _click_exception_types()
    if shown and isinstance(exc, shown):
        exc.show()  # usage line + "Error: ..." for usage errors
        code = getattr(exc, "exit_code", 2)
        return code if isinstance(code, int) and code != 0 else 2
    if abort and isinstance(exc, abort):
        typer.echo("aborted", err=True)
        return 1
    if isinstance(exc, OSError) and exc.strerror:
        # the environment (a file, a permission, a full disk), not a bug in evomerge
        where = f"{exc.filename}: " if exc.filename is not None else ""
        typer.echo(f"error: {where}{exc.strerror}", err=True)
        return 2
    debug = os.environ.get("EVOMERGE_DEBUG", "") not in ("", "0")
    if debug:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    typer.echo(f"internal error (a bug in evomerge {_version()}): {type(exc).__name__}"
               + (f": {msg}" if msg else "")
               + "; please report it with the command line you ran"
               + ("" if debug else " (set EVOMERGE_DEBUG=1 to see the traceback)"), err=True)
    return 1


def _sigterm_as_interrupt() -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends a command as Ctrl-C does: cleanup runs, a search
    says how to resume, exit status 130. Only where Python lets us (the main thread)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning user errors into one clear line.

    Exit status: 0 success; 2 an input or usage error (one line, no traceback); 1 an internal
    error (a bug: one line asking to report it; the traceback only with EVOMERGE_DEBUG=1);
    130 interrupted."""
    _sigterm_as_interrupt()
    args = sys.argv[1:] if argv is None else list(argv)
    # the command is the first argument when no root option precedes it (else: build them all)
    command = args[0] if args and not args[0].startswith("-") else None
    app = build_app(command)
    try:
        rv = app(args=args, prog_name="evomerge", standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - every error ends here as one line
        sys.exit(_report(exc))
    if isinstance(rv, int) and rv != 0:
        sys.exit(rv)
    if argv is None and command in _EXIT_WITHOUT_TEARDOWN:
        _exit_now()


_EXIT_WITHOUT_TEARDOWN = frozenset({"merge"})
"""Commands that end the process without the interpreter's teardown once they succeed, when run as
a program (not when ``main`` is called with ``argv``): with torch loaded the teardown takes ~0.3 s,
and ``evomerge merge`` has by then renamed its fsynced output into place and holds nothing that
needs finalizing."""


def _exit_now() -> None:
    """Flush stdout / stderr and end the process with status 0 at once (``os._exit``)."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to say
            pass
    os._exit(0)


if __name__ == "__main__":
    main()

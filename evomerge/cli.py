"""The ``evomerge`` command line.

Import-light: no torch / transformers at import time; each command imports what it needs.
Sub-commands live next to the code they drive and are registered here.
"""

from __future__ import annotations

import sys

import typer

from evomerge.errors import EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Evolutionary model merging with IRT-estimated fitness.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- command registration (one line per module that owns a command) ---
# (registered below)
from evomerge import merge_cli as _merge_cli  # noqa: E402

_merge_cli.register(app)
from evomerge.zoo.cli import app as _zoo_app  # noqa: E402

app.add_typer(_zoo_app, name="zoo")
from evomerge import irt_cli as _irt_cli  # noqa: E402

_irt_cli.register(app)
from evomerge.search import cli as _search_cli  # noqa: E402

_search_cli.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning user errors into one clear line."""
    try:
        rv = app(args=argv, standalone_mode=False)
        if isinstance(rv, int) and rv != 0:
            sys.exit(rv)
    except EvomergeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        irt_errors = sys.modules.get("irt.errors")  # the standalone irt package's user errors
        if irt_errors is not None and isinstance(exc, irt_errors.IRTError):
            typer.echo(f"error: {exc}", err=True)
            sys.exit(2)

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

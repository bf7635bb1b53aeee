"""``evomerge zoo`` commands (import-light: torch is imported inside the command)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from evomerge.errors import EvomergeError

app = typer.Typer(name="zoo", help="The embedded demo zoo: tiny real models and tasks.",
                  no_args_is_help=True, add_completion=False)


@app.command("build")
def build_cmd(
    root: Optional[Path] = typer.Option(
        None, "--root", help="Where to build (default: $EVOMERGE_ZOO or "
        "~/.cache/evomerge/zoo/<version>)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if already built."),
) -> None:
    """Build the zoo (base model, experts, tasks) on the CPU, or report the cached one."""
    from evomerge.fsutil import check_output_target, output_error
    from evomerge.zoo import _is_current, build_zoo, default_root

    target = Path(root).expanduser() if root else default_root()
    what = "--root" if root else ("$EVOMERGE_ZOO" if os.environ.get("EVOMERGE_ZOO") else "zoo folder")
    cached = not force and _is_current(target)
    if not cached:
        if target.exists() and not target.is_dir():
            raise EvomergeError(f"{what} {target} is a file, not a folder; choose another place for the zoo")
        check_output_target(target, what, folder=True)
    try:
        zoo = build_zoo(root=root, force=force, verbose=True)
    except OSError as exc:  # the build cleans up its temporary folder
        raise output_error(target, exc, what) from None
    if cached:
        typer.echo(zoo.report.rstrip())
    typer.echo(f"zoo ready at {zoo.root}")

"""``evomerge zoo`` commands (import-light: torch is imported inside the command)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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
    from evomerge.zoo import _is_current, build_zoo, default_root

    cached = not force and _is_current(Path(root).expanduser() if root else default_root())
    zoo = build_zoo(root=root, force=force, verbose=True)
    if cached:
        typer.echo(zoo.report.rstrip())
    typer.echo(f"zoo ready at {zoo.root}")

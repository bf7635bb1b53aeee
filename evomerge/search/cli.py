"""``evomerge search`` and ``evomerge report`` (import-light: heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def search(
    config: Optional[Path] = typer.Argument(None, help="run config (YAML); default: configs/demo.yaml "
                                            "on the embedded zoo"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="resume this run directory "
                                          "(a CONFIG given too may change only safe fields)"),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="where to write the run "
                                          "(default: config's run_dir or populations/NAME-TIME)"),
    generations: Optional[int] = typer.Option(None, "--generations", min=1,
                                              help="override optimizer.generations"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="override the config's seed (>= 0)"),
    backend: Optional[str] = typer.Option(None, "--backend", help="override evaluator.backend: hf "
                                          "(transformers) or vllm"),
    check: bool = typer.Option(False, "--check", help="check the config, models, vocabularies, tasks and "
                               "devices, try the prompts (the base and each endpoint answer a few search "
                               "items, shown next to the references), print what the run would answer and "
                               "how long it should take, and stop (writes nothing)"),
    trial_items: int = typer.Option(8, "--trial-items", min=0, help="with --check: search items per task "
                                    "each model answers in the trial (0: no trial)"),
) -> None:
    """Search a merge recipe by evolution, judging each candidate on a few IRT-chosen items."""
    from evomerge.config import demo_config_path, load_config
    from evomerge.search.loop import run_search

    cfg = None
    if config is not None or resume is None:
        cfg = load_config(config or demo_config_path())
        updates = {}
        if generations is not None:
            updates["optimizer"] = cfg.optimizer.model_copy(update={"generations": generations})
        if seed is not None:
            updates["seed"] = seed
        if backend is not None:
            from evomerge.config import parse_config

            data = cfg.to_dict()
            data["evaluator"]["backend"] = backend
            updates["evaluator"] = parse_config(data, "--backend").evaluator
        if updates:
            cfg = cfg.model_copy(update=updates)
    elif generations is not None:
        from evomerge.search.rundir import open_run_dir

        _, frozen = open_run_dir(resume)
        cfg = frozen.model_copy(update={"optimizer": frozen.optimizer.model_copy(
            update={"generations": generations})})
    if check:
        from evomerge.errors import EvomergeError
        from evomerge.search.plan import check_run

        if resume is not None:
            raise EvomergeError("--check is for a new run; a run directory is resumed with --resume alone")
        check_run(cfg, run_dir=run_dir, log=_log, trial_items=trial_items)
        return
    from evomerge.report import write_report

    rd = run_search(cfg, resume=resume, run_dir=run_dir, log=_log)
    _log(f"report: {write_report(rd)}")


def report(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """Redraw a run's report (report.md and PNG plots) from its run directory."""
    from evomerge.report import write_report

    path = write_report(run_dir)
    typer.echo(f"wrote {path}")


def _log(msg: str) -> None:
    typer.echo(msg)


def register(app: typer.Typer) -> None:
    app.command("search")(search)
    app.command("report")(report)

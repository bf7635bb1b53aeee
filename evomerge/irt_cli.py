"""``evomerge irt ...``: fit item banks, choose anchors, estimate accuracies (wraps :mod:`irt`).

Response files (RESPONSES, ANSWERS, --endpoint-answers) are CSV / JSONL / npz as defined in
:mod:`irt.io`; RESPONSES may also be a search's run directory (its calibration answers to one
task, ``--task``: :mod:`evomerge.search.responses`). Banks are ``.safetensors`` files (:mod:`irt.bank`); anchors are JSON
(:class:`irt.anchors.Anchors`). Import-light: numpy / scipy / sklearn load inside the commands.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from evomerge.errors import EvomergeError
from evomerge.fsutil import atomic_output, check_output_target, refuse_input, write_text_atomic

app = typer.Typer(help="Item banks, anchor items and few-item accuracy estimates (IRT).", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@contextmanager
def _user_errors():
    from irt.errors import IRTError

    try:
        yield
    except IRTError as exc:
        raise EvomergeError(str(exc)) from None


def _check_out(out: Path, inputs: dict, example: str) -> None:
    """Before any work: ``--out`` is not one of the inputs, not a folder, and can be written."""
    refuse_input(out, inputs)
    if out.is_dir():
        raise EvomergeError(f"--out {out} is a folder; give a file path inside it (e.g. {out / example})")
    check_output_target(out)


def _csv_list(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


RESPONSES_HELP = ("subjects × items answers: .csv / .jsonl / .npz (see irt.io), or a search's run directory "
                  "(its calibration answers to --task)")


def _run_responses(run_dir: Path, task: str | None):
    """:func:`evomerge.search.responses.run_responses`, with anything the zoo prints (a zoo task's
    folder) on stderr, not in the command's output."""
    import contextlib
    import sys

    from evomerge.search.responses import run_responses

    with contextlib.redirect_stdout(sys.stderr):
        return run_responses(run_dir, task)


def _read_responses(responses: Path, task: str | None):
    """(Y, item ids, subject names, subgroups or None, the run's endpoints) from a response file or
    a run directory (then ``task`` picks the task; subgroups and endpoints come from the run)."""
    from evomerge.search.responses import is_run_dir

    if is_run_dir(responses):
        r = _run_responses(responses, task)
        return r.Y, r.item_ids, r.subject_names, r.subgroups, r.endpoints
    if responses.is_dir():
        raise EvomergeError(f"{responses}: a folder but not a run directory (no config.yaml); give a response "
                            "file (.csv / .jsonl / .npz) or a search's run directory")
    from irt.io import read_responses

    Y, item_ids, names = read_responses(responses)
    return Y, item_ids, names, None, []


@app.command("fit")
def fit_cmd(
    responses: Path = typer.Argument(..., help=RESPONSES_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="item bank to write (.safetensors)"),
    dim: Optional[int] = typer.Option(None, "--dim", "-d", min=1, help="dimension d (default: chosen by validation)"),
    dims: str = typer.Option("1,2,3,5", "--dims", help="candidate dimensions when --dim is not given"),
    seed: int = typer.Option(0, "--seed"),
    task: Optional[str] = typer.Option(None, "--task", help="task name stored in the bank (and, for a run "
                                       "directory, the task whose answers to read)"),
    items: Optional[Path] = typer.Option(None, "--items", help="task items JSONL ({id, subgroup}) for subgroups "
                                         "(a run directory brings its items' subgroups)"),
) -> None:
    """Calibrate an item bank on a response matrix."""
    _check_out(out, {"RESPONSES": responses, "--items": items}, "bank.safetensors")
    with _user_errors():
        from irt import ItemBank
        from irt.errors import IRTError

        Y, item_ids, names, subgroups, _ = _read_responses(responses, task)
        if items is not None:
            groups = {}
            try:
                for ln, line in enumerate(items.read_text().splitlines(), start=1):
                    if line.strip():
                        rec = json.loads(line)
                        groups[str(rec["id"])] = str(rec.get("subgroup", ""))
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise IRTError(f"{items}: cannot read item ids / subgroups ({exc})") from None
            unknown = [i for i in item_ids if i not in groups]
            if unknown:
                raise IRTError(f"{items}: no entry for item ids {unknown[:5]} of {responses}")
            subgroups = [groups[i] for i in item_ids]
        try:
            dims_t = tuple(int(x) for x in _csv_list(dims))
        except ValueError:
            raise IRTError(f"--dims: expected comma-separated integers, got {dims!r}") from None
        if not dims_t or min(dims_t) < 1:
            raise IRTError(f"--dims: expected comma-separated integers >= 1, got {dims!r}")
        from irt.bank import check_calibration_data, constant_items

        check_calibration_data(Y, name=str(responses))
        bank = ItemBank.fit(Y, item_ids, names, dim=dim, seed=seed, dims=dims_t, subgroups=subgroups, task=task)

        same = constant_items(Y)
        if same:  # kept: a run's bank must hold every item; their parameters rest on the prior
            typer.echo(f"warning: {len(same)} of {len(item_ids)} items (e.g. {item_ids[same[0]]}) get the same "
                       "answer from every subject; kept, but they tell nothing about differences between "
                       "subjects (their difficulty rests on the prior)", err=True)
        with atomic_output(out) as tmp:
            bank.save(tmp)
        q = bank.meta["quality"]
        typer.echo(f"wrote {out}: {len(names)} subjects × {len(item_ids)} items, d = {bank.dim}, "
                   f"train log-loss {q['train_logloss']:.4f}, fit {q['fit_seconds']:.1f} s")


@app.command("anchors")
def anchors_cmd(
    bank_path: Path = typer.Argument(..., metavar="BANK", help="item bank (.safetensors)"),
    n: int = typer.Option(20, "-n", "--n", min=1, help="number of anchor items"),
    method: str = typer.Option("info", "--method", "-m", help="random | correctness | irt | info | strata (default: info, "
                               "as the search)"),
    seed: int = typer.Option(0, "--seed"),
    stratify: bool = typer.Option(False, "--stratify", help="split anchors over the items' subgroups"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write anchors JSON here (default: stdout)"),
) -> None:
    """Choose anchor items (and weights) from a bank."""
    if out is not None:
        _check_out(out, {"BANK": bank_path}, "anchors.json")
    with _user_errors():
        from irt import ItemBank, select_anchors

        bank = ItemBank.load(bank_path)
        if n > bank.n_items:
            typer.echo(f"warning: -n {n} but {bank_path} holds {bank.n_items} items; every item is an anchor "
                       f"(capped at {bank.n_items})", err=True)
        anc = select_anchors(bank, n=n, method=method, seed=seed, stratify=stratify)
        if out is None:
            typer.echo(json.dumps(anc.to_dict(), indent=1))
        else:
            write_text_atomic(out, json.dumps(anc.to_dict(), indent=1) + "\n")
            typer.echo(f"wrote {out}: {len(anc)} anchors ({method}), gp_lambda = {anc.gp_lambda}")


@app.command("estimate")
def estimate_cmd(
    bank_path: Path = typer.Argument(..., metavar="BANK", help="item bank (.safetensors)"),
    answers: Path = typer.Argument(..., help="answers of the subject(s) to estimate: .csv / .jsonl / .npz"),
    anchors: Optional[Path] = typer.Option(None, "--anchors", "-a",
                                           help="anchors JSON (default: every item in ANSWERS, uniform weights)"),
    estimator: str = typer.Option("pirt", "--estimator", "-e", help="mean | cmean | pirt | gpirt | mpirt | gmpirt (default: "
                                  "pirt; the search uses mpirt, which needs --endpoints)"),
    endpoints: Optional[str] = typer.Option(None, "--endpoints",
                                            help="comma-separated calibration subjects of the bank that are the endpoints"),
    endpoint_answers: Optional[Path] = typer.Option(None, "--endpoint-answers",
                                                    help="full answers of the endpoints (response file); abilities are fitted"),
    gp_lambda: Optional[float] = typer.Option(None, "--gp-lambda", min=0.0, max=1.0,
                                              help="override the gp mixing weight (0..1)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per subject"),
) -> None:
    """Estimate full accuracy from anchor answers, one line per subject in ANSWERS."""
    with _user_errors():
        import numpy as np

        from irt import Anchors, ItemBank
        from irt.errors import IRTError
        from irt.estimators import estimate_accuracy_batch
        from irt.io import read_responses

        bank = ItemBank.load(bank_path)
        Y, item_ids, names = read_responses(answers)
        col = bank.index(item_ids)  # unknown ids → clear error
        if anchors is not None:
            anc = Anchors.load(anchors, bank)
        else:
            anc = Anchors(idx=col, weights=np.full(len(col), 1.0 / len(col)), item_ids=item_ids, method="given")
        pos = {int(c): k for k, c in enumerate(col)}
        absent = [anc.item_ids[k] for k, i in enumerate(anc.idx) if int(i) not in pos]
        if absent:
            raise IRTError(f"{answers}: no answers for anchor items {absent[:5]}")
        A = Y[:, [pos[int(i)] for i in anc.idx]]
        E = None
        if estimator in ("mpirt", "gmpirt"):
            if endpoint_answers is not None:
                Ye, ids_e, _ = read_responses(endpoint_answers)
                E = bank.fit_ability(Ye, item_ids=ids_e)
            elif endpoints:
                E = bank.subject_theta(_csv_list(endpoints))
            else:
                raise IRTError(f"estimator {estimator!r} needs --endpoints NAME,... (calibration subjects of the "
                               "bank) or --endpoint-answers FILE")
        est = estimate_accuracy_batch(estimator, bank, anc.idx, anc.weights, A, endpoint_theta=E,
                                      gp_lambda=gp_lambda if gp_lambda is not None else anc.gp_lambda,
                                      random_anchors=anc.random)
        for name, z in zip(names, est):
            if as_json:
                typer.echo(json.dumps({"subject": name, "estimator": estimator, "accuracy": float(z),
                                       "n_anchors": len(anc)}))
            else:
                typer.echo(f"{name}\t{z:.4f}")


@app.command("next")
def next_cmd(
    bank_path: Path = typer.Argument(..., metavar="BANK", help="item bank (.safetensors)"),
    answers: Path = typer.Argument(..., help="answers so far, one subject per row (.csv / .jsonl / .npz); "
                                             "items a subject has not been asked are missing"),
    k: int = typer.Option(5, "-k", "--k", min=1, help="how many items to ask next (>= 1)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per subject"),
) -> None:
    """Adaptive testing: the K items to ask each subject next, given its answers so far.

    Ask them, add the answers to the file and repeat; finally estimate with
    `evomerge irt estimate BANK ANSWERS -e pirt`.

    First round (no answers yet): `evomerge irt anchors BANK --method info -n K`."""
    with _user_errors():
        import numpy as np

        from irt import ItemBank, next_items
        from irt.io import read_responses

        bank = ItemBank.load(bank_path)
        Y, item_ids, names = read_responses(answers)
        col = bank.index(item_ids)  # unknown ids → clear error
        for name, row in zip(names, Y):
            seen = ~np.isnan(row)
            nxt = next_items(bank, col[seen], row[seen], k)
            ids = [bank.item_ids[i] for i in nxt]
            if as_json:
                typer.echo(json.dumps({"subject": name, "asked": int(seen.sum()), "next": ids}))
            else:
                typer.echo(f"{name}\t" + ",".join(ids))


@app.command("check")
def check_cmd(
    responses: Path = typer.Argument(..., help=RESPONSES_HELP),
    task: Optional[str] = typer.Option(None, "--task", help="for a run directory: the task whose answers to check"),
    n: int = typer.Option(20, "-n", "--n", min=1, help="items each subject answers"),
    estimator: str = typer.Option("pirt", "--estimator", "-e", help="mean | cmean | pirt | gpirt | mpirt | gmpirt (default: "
                                  "pirt; mpirt needs --endpoints, which a run directory brings)"),
    method: str = typer.Option("info", "--method", "-m", help="anchor selection: random | correctness | irt | info | strata"),
    rounds: int = typer.Option(1, "--rounds", "-r", min=1, help="1 = fixed anchors; R > 1 = adaptive test in R "
                                                                   "rounds (pirt / mpirt)"),
    endpoints: Optional[str] = typer.Option(None, "--endpoints", help="comma-separated subject names mp-IRT "
                                                                       "combines (kept in every training fold; "
                                                                       "default for a run directory: its endpoints)"),
    folds: int = typer.Option(4, "--folds", "-k", min=2, help="cross-fitting folds"),
    dim: Optional[int] = typer.Option(None, "--dim", "-d", help="bank dimension (default: chosen per fold)"),
    seed: int = typer.Option(0, "--seed"),
    auto: bool = typer.Option(False, "--auto", help="try every candidate procedure (irt.choose_procedure: "
                                                    "estimators × anchor designs × rounds × dimension) and "
                                                    "report the one with the smallest cross-fitted error; "
                                                    "--estimator/--method/--rounds/--dim then name the "
                                                    "default it must beat"),
    se: float = typer.Option(0.0, "--se", min=0.0, help="with --auto: keep the default unless a candidate "
                                                       "beats it by more than this many standard errors of the "
                                                       "paired per-subject difference, then cmean/strata likewise (1 = the "
                                                       "one-standard-error rule that fitness.estimator auto uses; 0 = "
                                                       "smallest error)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """How accurate would N-item estimates be on this data? Cross-fits the whole procedure
    (bank, anchors or adaptive test, estimator) on the subjects of RESPONSES."""
    with _user_errors():
        from irt.validate import cross_validate_estimates

        Y, item_ids, names, _, run_endpoints = _read_responses(responses, task)
        endpoints = endpoints or ",".join(run_endpoints) or None
        if estimator in ("mpirt", "gmpirt") and not endpoints and not auto:
            raise EvomergeError(f"--estimator {estimator} combines the endpoints' abilities: name them with "
                                "--endpoints NAME,... (subjects of RESPONSES), or use -e pirt")
        if n > len(item_ids):
            typer.echo(f"warning: -n {n} but {responses} holds {len(item_ids)} items; capped at "
                       f"{len(item_ids)}", err=True)
        if auto:
            from irt.choose import Procedure, choose_procedure

            eps = _csv_list(endpoints)
            ch = choose_procedure(Y, item_ids, names, n=n, endpoints=eps, folds=folds, seed=seed,
                                  default=Procedure(estimator, method, rounds, dim), se=se,
                                  prefer=[Procedure("cmean", "strata", 1)] if se > 0 else [])
            if as_json:
                typer.echo(json.dumps(ch.to_dict()))
                return
            typer.echo(f"{ch.folds}-fold cross-fit on {ch.n_subjects} subjects, {ch.n} items each; "
                       f"plain mean of {ch.n} random items: {ch.plain_mean_mae:.4f}")
            typer.echo(f"{'procedure':<34} {'error':>7} {'bias':>8}")
            for r in ch.table:
                mark = " <- chosen" if r["name"] == ch.name else (" (default)" if r["name"] == ch.default else "")
                typer.echo(f"{r['name']:<34} {r['mae']:7.4f} {r['bias']:+8.4f}{mark}")
            typer.echo(f"chosen: {ch.name} (error {ch.mae:.4f}; default {ch.default}: {ch.default_mae:.4f})")
            _few_subjects_note(len(names))
            return
        c = cross_validate_estimates(Y, item_ids, names, n=n, estimator=estimator, anchor_method=method,
                                     rounds=rounds, endpoints=_csv_list(endpoints), folds=folds, dim=dim, seed=seed)
        if as_json:
            typer.echo(json.dumps(c.to_dict()))
            return
        how = f"adaptive, {c.rounds} rounds" if c.rounds > 1 else f"{c.anchor_method} anchors"
        typer.echo(f"{c.estimator} on {c.n} items ({how}), {c.folds}-fold cross-fit on {c.n_subjects} subjects:\n"
                   f"  mean absolute error {c.mae:.4f}, bias {c.bias:+.4f}\n"
                   f"  plain mean of {c.n} random items: {c.plain_mean_mae:.4f}\n"
                   f"  sd of the subjects' accuracies: {c.accuracy_sd:.4f}")
        _few_subjects_note(len(names))


FEW_SUBJECTS = 40


def _few_subjects_note(n_subjects: int) -> None:
    """Below ~40 calibration subjects the bank, not the procedure, limits few-item estimates
    (benchmarks/irt_calibration_size.py): say so next to the error."""
    if n_subjects < FEW_SUBJECTS:
        typer.echo(f"note: {n_subjects} calibration subjects. Below ~{FEW_SUBJECTS} the error is mostly that of "
                   "item parameters fitted on so few subjects, not of the procedure: more subjects lower it most "
                   "(at 20 items even a correct model leaves ~0.035 with 18 subjects and ~0.02 with 40; "
                   "docs/irt_real.md)")


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="a search's run directory"),
    task: Optional[str] = typer.Option(None, "--task", help="the task (may be omitted when the run has one)"),
    out: Path = typer.Option(..., "--out", "-o", help="response file to write: .csv / .jsonl / .npz (see irt.io)"),
    items: Optional[Path] = typer.Option(None, "--items", help="also write the items' ids and subgroups here "
                                         "(JSONL, the --items format of `irt fit`)"),
) -> None:
    """Write a run's calibration answers to one task as a subjects × items response file."""
    _check_out(out, {"RUN_DIR": run_dir}, "responses.csv")
    if items is not None:
        _check_out(items, {"RUN_DIR": run_dir, "--out": out}, "items.jsonl")
    with _user_errors():
        from irt.io import FORMATS, write_responses

        if out.suffix.lower() not in FORMATS:
            raise EvomergeError(f"--out {out}: give a file ending in {' / '.join(FORMATS)}")
        r = _run_responses(run_dir, task)
        with atomic_output(out) as tmp:
            typed = tmp.parent / (tmp.name + out.suffix)  # irt.io picks the format by the extension
            write_responses(typed, r.Y, r.item_ids, r.subject_names)
            typed.replace(tmp)
        if items is not None:
            write_text_atomic(items, "".join(json.dumps({"id": i, **({"subgroup": g} if r.subgroups else {})}) + "\n"
                                             for i, g in zip(r.item_ids, r.subgroups or r.item_ids)))
        typer.echo(f"wrote {out}: task {r.task}, {len(r.subject_names)} subjects × {len(r.item_ids)} items "
                   f"(endpoints: {', '.join(r.endpoints)})" + (f"; items: {items}" if items is not None else ""))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="irt")

"""The run directory: everything needed to resume or audit a run.

Layout of ``populations/NAME/``::

    config.yaml             frozen config of the run (the one resume uses)
    state.json              stage reached (calibrating / searching / finishing / done)
    calibration.jsonl       one line per calibration model: its answers to every search item
    banks/<task>.bank.safetensors  fitted item banks (irt format)
    banks/<task>.anchors.json       the anchors chosen from each bank
    evaluations.jsonl       one line per evaluated candidate (append-only)
    racing.jsonl            one line per sharpening stage of a contender (more items; search.racing)
    heldout.jsonl           one line per candidate re-evaluated on the held-out items
    best/                   best recipe (native JSON, mergekit YAML) and the merged model
    report.md, *.png        the report

Crash safety: JSONL files are appended line by line with flush + fsync, so a kill -9 can at
worst leave one partial last line, which :func:`read_jsonl` drops (and :func:`repair_jsonl`
cuts off before the next append). Every other file is written to a temporary name and
renamed into place (:func:`atomic_write_text`). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from evomerge.config import SAFE_ON_RESUME, RunConfig, diff_configs, parse_config
from evomerge.errors import EvomergeError, yaml_error_message
from evomerge.fsutil import check_output_target, fsync_dir, make_dirs, output_error, remove_dirs


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file + fsync + rename. An OS error (full
    disk, read-only file system) removes the temporary file and becomes an :class:`EvomergeError`
    naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise output_error(path, exc, "run file") from None
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and make it durable before returning (an OS error becomes an
    :class:`EvomergeError`; a partial line is cut off on resume by :func:`repair_jsonl`)."""
    line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
    try:
        with open(path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise output_error(path, exc, "run file") from None


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines of a JSONL log; a partial last line (killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for i, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError:
            raise EvomergeError(f"{path}: line {i} is not valid JSON; the log was edited or "
                                "corrupted — restore it or start a new run") from None
    del tail  # no newline yet: an append that was cut off
    return out


def repair_jsonl(path: Path) -> int:
    """Cut a partial last line (from a kill mid-append) so the next append starts clean; returns
    the number of bytes cut (0: the file was whole)."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
        return len(data) - keep
    return 0


class RunDir:
    """Paths and small helpers for one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    state_file = property(lambda self: self.root / "state.json")
    calibration = property(lambda self: self.root / "calibration.jsonl")
    banks = property(lambda self: self.root / "banks")
    evaluations = property(lambda self: self.root / "evaluations.jsonl")
    heldout = property(lambda self: self.root / "heldout.jsonl")
    racing = property(lambda self: self.root / "racing.jsonl")
    best = property(lambda self: self.root / "best")
    report = property(lambda self: self.root / "report.md")

    def bank_path(self, task: str) -> Path:
        return self.banks / f"{task}.bank.safetensors"

    def exists(self) -> bool:
        return self.config.exists()

    def state(self) -> dict:
        if not self.state_file.exists():
            return {"stage": "new"}
        return json.loads(self.state_file.read_text())

    def set_state(self, **fields) -> None:
        st = self.state()
        st.update(fields)
        atomic_write_json(self.state_file, st)

    def iter_logs(self) -> Iterator[Path]:
        yield from (self.calibration, self.evaluations, self.racing, self.heldout)

    def repair(self) -> list[str]:
        """Drop partial last lines and stray temp files left by a kill; returns one note per log
        whose torn last line was cut (that record is computed again)."""
        notes = []
        for log in self.iter_logs():
            cut = repair_jsonl(log)
            if cut:
                notes.append(f"{log.name}: dropped a partial last line ({cut} bytes, written when the run was "
                             "killed); that result is computed again")
        for tmp in self.root.rglob(".*.tmp-*"):
            if tmp.is_file():
                tmp.unlink()
        return notes


# ----------------------------------------------------------------------------- a run's folder


def target_run_dir(cfg: RunConfig, run_dir: str | None = None) -> RunDir:
    """Where a new run goes; refuses a folder that already holds something, or one that cannot
    be created (a parent is a file, no write permission, read-only file system)."""
    given = run_dir is not None
    if run_dir is None:
        run_dir = cfg.run_dir or f"populations/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    what = "--run-dir" if given else ("run_dir" if cfg.run_dir else "run directory")
    rd = RunDir(run_dir)
    if rd.root.exists() and not rd.root.is_dir():
        raise EvomergeError(f"{what} {rd.root} is a file, not a folder; choose another run directory")
    try:
        busy = rd.root.is_dir() and any(rd.root.iterdir())
    except OSError as exc:
        raise EvomergeError(f"{what} {rd.root}: cannot read it ({exc.strerror or exc})") from None
    if busy:
        raise EvomergeError(f"{rd.root}: run directory exists and is not empty; resume it with "
                            f"`evomerge search --resume {rd.root}` or choose another run_dir")
    check_output_target(rd.root, what, folder=True)
    return rd


def new_run_dir(cfg: RunConfig, run_dir: str | None = None) -> RunDir:
    """Create the run directory and freeze the config in it (on an OS error, whatever it
    created is removed again)."""
    rd = target_run_dir(cfg, run_dir)
    created: list[Path] = []
    try:
        created = make_dirs(rd.root)
        frozen = cfg.to_dict()
        frozen["run_dir"] = str(rd.root)
        atomic_write_text(rd.config, yaml.safe_dump(frozen, sort_keys=False))
        rd.set_state(stage="calibrating")
    except (OSError, EvomergeError) as exc:
        for f in (rd.state_file, rd.config):
            try:
                f.unlink()
            except OSError:
                pass
        remove_dirs(created)
        if isinstance(exc, OSError):
            raise output_error(rd.root, exc, "run directory") from None
        raise
    return rd


def open_run_dir(run_dir: str | Path, new_cfg: RunConfig | None = None) -> tuple[RunDir, RunConfig]:
    """Open a run for resume; refuse a changed config unless only safe fields changed. Its logs
    are repaired by the resume itself (:meth:`RunDir.repair`)."""
    rd = RunDir(run_dir)
    if not rd.exists():
        raise EvomergeError(f"{rd.root}: not a run directory (no config.yaml); start a run with "
                            "`evomerge search CONFIG`")

    try:
        frozen = yaml.safe_load(rd.config.read_text())
    except yaml.YAMLError as exc:
        raise EvomergeError(yaml_error_message(rd.config, exc) + " — the run's frozen config is damaged; "
                            "restore it, or start a new run") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"{rd.config}: cannot read the run's frozen config ({exc})") from None
    cfg = parse_config(frozen, str(rd.config))
    if new_cfg is not None:
        new = new_cfg.to_dict()
        new["run_dir"] = frozen.get("run_dir")
        changed = diff_configs(cfg.to_dict(), new)
        unsafe = [c for c in changed if not any(c == s or c.startswith(s + ".") for s in SAFE_ON_RESUME)]
        if unsafe:
            raise EvomergeError(
                f"{rd.root}: the config differs from the run's frozen config in "
                f"{', '.join(unsafe)}; resuming would mix two different searches. Resume "
                f"without a config, or start a new run (safe to change: "
                f"{', '.join(SAFE_ON_RESUME)})")
        if changed:
            cfg = new_cfg.model_copy(update={"run_dir": frozen.get("run_dir")})
            atomic_write_text(rd.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return rd, cfg

"""Small file-system helpers shared by the checkpoint writer, the run directory and the irt
commands (no torch).

Output errors: every place that writes a user-chosen output (``--out``, ``--run-dir``) turns an
``OSError`` into an :class:`~evomerge.errors.EvomergeError` naming the path and the OS reason
(:func:`output_error`), after removing what it had begun to write (temporary files, folders it
created). :func:`check_output_target` catches the common cases (a parent that is a regular file,
a folder without write permission) before any work starts.
"""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from evomerge.errors import EvomergeError


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable (best effort: not every OS allows it)."""
    try:
        fd = os.open(Path(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_ADVICE = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space or write somewhere else",
    errno.EROFS: "write somewhere else",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def output_error(path: str | os.PathLike, exc: OSError, what: str = "--out") -> EvomergeError:
    """One clear line for an OS error while writing the output ``path``."""
    reason = exc.strerror or str(exc)
    advice = _ADVICE.get(exc.errno or 0, "check the path and try again")
    return EvomergeError(f"{what} {path}: cannot write there ({reason}); {advice}")


def check_output_target(path: str | os.PathLike, what: str = "--out", folder: bool = False) -> None:
    """Fail early (before any work) if ``path`` cannot be created: one of its parents is a regular
    file, or the nearest existing parent folder is not writable (permissions, read-only mount).
    ``folder``: ``path`` is an output folder that may exist already (then it must be writable)."""
    p = Path(path).absolute()
    for anc in ([p] if folder else []) + list(p.parents):
        if not anc.exists():
            continue  # missing (created later) or below a file (caught at the file itself)
        if not anc.is_dir():
            raise EvomergeError(f"{what} {path}: {anc} is a file, not a folder; choose another path")
        if not os.access(anc, os.W_OK | os.X_OK):
            ro = False
            try:
                ro = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
            except (OSError, AttributeError):
                pass
            why = "it is on a read-only file system" if ro else "you have no write permission there"
            raise EvomergeError(f"{what} {path}: cannot write in {anc} ({why}); choose another place")
        return


def refuse_input(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                 what: str = "--out") -> None:
    """Refuse an output path that is one of the command's inputs (``label -> path``)."""
    target = os.path.realpath(out)
    for label, src in inputs.items():
        if src is None:
            continue
        same = os.path.realpath(src) == target
        if not same:
            try:
                same = os.path.samefile(src, out)
            except OSError:
                same = False
        if same:
            raise EvomergeError(f"{what} {out} is the input {label}; writing there would destroy it — "
                                "choose another output path")


def check_model_folder_output(out: Path, inputs, overwrite: bool, what: str = "--out") -> None:
    """Refuse an output folder that is, holds or lies inside an input model, that exists and is
    not a folder, cannot be written, or holds files (unless ``overwrite``)."""
    op = os.path.realpath(out)
    for p in inputs:
        ip = os.path.realpath(p)
        if op == ip or ip.startswith(op.rstrip(os.sep) + os.sep) or op.startswith(ip.rstrip(os.sep) + os.sep):
            raise EvomergeError(f"{what} {out} is, holds or lies inside the input model {p}; choose another folder")
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"{what} {out} exists and is not a folder; choose another path")
    check_output_target(out, what)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EvomergeError(f"{what} {out} exists and is not empty; choose a new folder, or pass --overwrite to "
                            "replace it and everything in it")


def make_dirs(folder: str | os.PathLike) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created (outermost first), for :func:`remove_dirs`."""
    folder = Path(folder)
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    created = []
    for p in reversed(missing):
        try:
            os.mkdir(p)
        except FileExistsError:
            if not p.is_dir():
                raise
            continue
        created.append(p)
    return created


def remove_dirs(created: list[Path]) -> None:
    """Remove folders :func:`make_dirs` created (innermost first) if they are still empty."""
    for p in reversed(created):
        try:
            os.rmdir(p)
        except OSError:
            pass


def unique_sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name next to ``path`` (``.NAME.TAG-PID-RANDOM``)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def mkdir_sibling(path: Path, tag: str) -> Path:
    """Create a new empty folder next to ``path`` (mode 0777 less the umask, like ``mkdir``)."""
    for _ in range(100):
        cand = unique_sibling(path, tag)
        try:
            os.mkdir(cand)
        except FileExistsError:
            continue
        return cand
    raise FileExistsError(errno.EEXIST, "cannot find a free temporary name", str(path))


@contextmanager
def atomic_output(path: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """Write one output file atomically: yields a temporary path next to ``path``; when the block
    ends it is renamed over ``path``. On any error, the temporary file (and anything named after
    it), and the folders created for it, are removed and ``path`` is left as it was; an
    ``OSError`` becomes an :class:`EvomergeError` naming ``path`` and the OS reason."""
    path = Path(path)
    if path.is_dir():
        raise EvomergeError(f"{what} {path} is a folder; give a file path (e.g. {path / 'out'}…)")
    created: list[Path] = []
    tmp = unique_sibling(path, "tmp")

    def cleanup() -> None:
        try:
            for f in tmp.parent.glob(tmp.name + "*"):
                try:
                    f.unlink()
                except OSError:
                    pass
        except OSError:
            pass
        remove_dirs(created)

    try:
        created = make_dirs(path.parent)
        yield tmp
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        cleanup()
        raise output_error(path, exc, what) from None
    except BaseException:
        cleanup()
        raise


@contextmanager
def atomic_folder(out: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """Write one output folder atomically: yields a new empty folder next to ``out``; when the block
    ends it replaces ``out`` (an existing ``out`` — the caller has checked it may go — is moved aside
    and removed once replaced, or put back if the rename fails). On any error the temporary folder
    and the parent folders created for it are removed and ``out`` is left as it was; an ``OSError``
    becomes an :class:`EvomergeError` naming ``out``."""
    import shutil

    out = Path(out)
    created: list[Path] = []
    tmp: Path | None = None
    done = False
    try:
        created = make_dirs(out.parent)
        tmp = mkdir_sibling(out, "tmp")
        yield tmp
        old = None
        if out.exists():
            old = unique_sibling(out, "old")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)  # put the previous folder back
            raise
        tmp, done = None, True
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise output_error(out, exc, what) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            remove_dirs(created)


def write_json_synced(path: str | os.PathLike, doc) -> None:
    """``doc`` as indented JSON in ``path``, flushed to disk (inside a folder written atomically)."""
    import json

    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, what: str = "--out") -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_output` (fsync before the rename)."""
    with atomic_output(path, what) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)

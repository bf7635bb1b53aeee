"""A table-driven harness for the bad-input corpus: run the ``evomerge`` CLI in process on one bad
input and check the error contract.

The contract (README, "Errors"): an input or usage error prints one clear message, exits with
status 2 and leaves nothing half-written; no Python traceback reaches the user; an internal error
exits with 1 and asks to report it; 0 only on success.

A :class:`Case` names the command line (``{tmp}`` is replaced by the case's own folder, ``{zoo}``
by the test zoo's root), an optional ``setup(tmp)`` that writes the bad input, the expected exit
status, words the message must contain (case-insensitive), and an optional ``after(tmp)`` that
checks what the output location holds afterwards.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


@dataclass
class Case:
    id: str
    args: Sequence[str]
    setup: Callable[[Path], None] | None = None
    exit: int = 2
    words: Sequence[str] = ()
    after: Callable[[Path], None] | None = None
    env: dict = field(default_factory=dict)


def run_cli(args: Sequence[str], capsys) -> tuple[int, str]:
    """Run ``evomerge ARGS`` in this process; returns (exit status, stdout + stderr). An exception
    escaping ``main`` (a traceback the user would see) fails the test."""
    from evomerge.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - this is what the contract forbids
        raise AssertionError(f"evomerge {' '.join(args)}: an exception reached the user:\n"
                             + traceback.format_exc()) from None
    out = capsys.readouterr()
    return code, out.out + out.err


def check_case(case: Case, tmp: Path, capsys, monkeypatch, zoo_root: Path | None = None) -> str:
    """Set up ``case`` in ``tmp``, run it, and check exit status, message and aftermath."""
    tmp.mkdir(parents=True, exist_ok=True)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    if case.setup is not None:
        case.setup(tmp)
    args = [a.replace("{tmp}", str(tmp)).replace("{zoo}", str(zoo_root or "")) for a in case.args]
    code, out = run_cli(args, capsys)
    assert "Traceback (most recent call last)" not in out, out
    assert code == case.exit, f"exit {code}, expected {case.exit}; output:\n{out}"
    low = out.lower()
    for w in case.words:
        assert w.lower() in low, f"{w!r} not in the message:\n{out}"
    if case.after is not None:
        case.after(tmp)
    return out

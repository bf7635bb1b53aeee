"""User-facing errors.

Raise :class:`EvomergeError` for anything a user can fix (bad file, bad field, bad tensor).
The CLI prints its message as one line prefixed with ``error:`` and exits with status 2; no
traceback. The message must name the file / field / tensor at fault and say what to do.
"""

from __future__ import annotations

import os


class EvomergeError(Exception):
    """An error caused by user input, reported without a traceback."""


def yaml_error_message(path: str | os.PathLike, exc: Exception) -> str:
    """A YAML syntax error as one line naming the file, line and column (not '<unicode string>')."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")

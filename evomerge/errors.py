"""User-facing errors.

Raise :class:`EvomergeError` for anything a user can fix (bad file, bad field, bad tensor).
The CLI prints its message as one line prefixed with ``error:`` and exits with status 2; no
traceback. The message must name the file / field / tensor at fault and say what to do.
"""


class EvomergeError(Exception):
    """An error caused by user input, reported without a traceback."""

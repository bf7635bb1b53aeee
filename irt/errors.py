"""Errors raised by :mod:`irt`."""


class IRTError(ValueError):
    """Bad input to an :mod:`irt` function (wrong shape, non-binary answers, unknown items, ...).

    The message says what is wrong and where (which subject / item / field / file), so that a
    caller can show it as is. :mod:`irt` never imports evomerge; evomerge wraps these errors into
    its own user-error type at the CLI boundary.
    """

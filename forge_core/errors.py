"""One exception type for every mistake a user can fix.

The CLI catches `ForgeError` and prints its message as one line (no traceback), exit code 2.
Messages name the file, line or key and say what to do.
"""


class ForgeError(Exception):
    """A user-facing error: bad input, a missing file, a config key that does not exist."""


def located(path, line, what: str) -> str:
    """`path:line: what` - the message shape for errors inside a data or config file."""
    return f"{path}:{line}: {what}" if line is not None else f"{path}: {what}"

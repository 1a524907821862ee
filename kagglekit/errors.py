"""The one exception type that the CLI turns into a single clear line.

Anything a user can get wrong (a missing file, a bad row, a config typo, a fold
that does not exist) raises :class:`KKError` with a message that names the file,
row or key. The CLI prints ``error: <message>`` on stderr and exits non-zero;
library callers get an ordinary exception they can catch.
"""

from __future__ import annotations


class KKError(Exception):
    """A user-facing error: its message is the whole explanation."""

    exit_code = 1


class ConfigError(KKError):
    """A config file or ``--set`` override is not valid."""

    def __str__(self) -> str:  # keeps the "config error:" prefix in one place
        return f"config error: {super().__str__()}"

"""The one exception type that the CLI turns into a single clear line (``error: <message>`` on stderr, a non-zero
exit); anything a user can get wrong raises it with a message that names the file, row or key."""

from __future__ import annotations


class KKError(Exception):
    """A user-facing error: its message is the whole explanation."""

    exit_code = 1


class ConfigError(KKError):
    """A config file or ``--set`` override is not valid."""

    def __str__(self) -> str:  # keeps the "config error:" prefix in one place
        return f"config error: {super().__str__()}"

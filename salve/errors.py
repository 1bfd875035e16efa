"""The one base class of salve's user-facing errors."""

from __future__ import annotations


class SalveUserError(Exception):
    """An error whose message already names the problem and the fix (a bad parameter, a missing
    or stale artifact, a refused download): the command line shows it as one line, with no
    traceback. Each subclass keeps the builtin base its callers catch (ValueError,
    RuntimeError)."""

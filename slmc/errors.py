"""Errors meant for people: one line saying what went wrong and where.

The CLI turns every `SlmcError` into that line on stderr and exit code 2.
Anything else escaping is a bug in slmc and keeps its traceback.
"""


class SlmcError(Exception):
    """Bad input or an impossible request. `where` names the file/field/option."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class UnsupportedError(SlmcError):
    """A valid request that this build of slmc (or this machine) cannot serve."""


class ValidationFailed(SlmcError):
    """An artifact ran but disagreed with the reference executor beyond tolerance."""

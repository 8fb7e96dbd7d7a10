"""Errors meant for people: one line saying what went wrong and where.

The CLI turns every `SlmcError` into that line on stderr and its `exit_code`: 2, except
validation verdicts: FAIL exits 1, INCONCLUSIVE exits 3.
Anything else escaping is a bug in slmc and keeps its traceback.
"""


class SlmcError(Exception):
    """Bad input or an impossible request. `where` names the file/field/option."""

    exit_code = 2

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class UnsupportedError(SlmcError):
    """A valid request that this build of slmc (or this machine) cannot serve."""


class ValidationFailed(SlmcError):
    """An artifact ran but disagreed with the reference executor beyond its flow's bound."""

    exit_code = 1


class ValidationInconclusive(SlmcError):
    """An artifact ran but its flow's bound cannot judge it: no published bound for the flow,
    the reference's own rounding noise already exceeds the bound, or too few positions."""

    exit_code = 3

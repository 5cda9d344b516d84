"""The one error type the CLI turns into a one-line message and a non-zero exit code."""

from __future__ import annotations


class BmmError(Exception):
    """A user-facing error: one line that names the file/tensor and, where there is one, the fix.

    ``exit_code`` lets callers tell classes of failure apart in scripts:
    2 = bad input (paths, options, checkpoints), 3 = stage state conflict (changed inputs, lock held),
    4 = numerical failure, 1 = anything else.
    """

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

    def __str__(self) -> str:  # always one line
        return " ".join(str(self.args[0]).split("\n"))


class InputError(BmmError):
    """Bad input: a missing path, a mismatching checkpoint, a refused format."""


class StateError(BmmError):
    """The work directory disagrees with the request (changed inputs, lock held by another process)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=3)


class NumericError(BmmError):
    """A computation produced NaN/Inf or could not be made well posed."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=4)

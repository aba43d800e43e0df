"""Errors a user can cause. The CLI turns any `UserError` into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: a file, a name, a value, a path. Never a bug in hybridnas."""


class SpecError(UserError, ValueError):
    """An invalid architecture, search space or experiment file.

    The message names the key path (``stages[2].mixer``), the bad value and what is allowed.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def did_you_mean(value: object, allowed: Iterable[str]) -> str:
    """' (did you mean 'window'?)' when a close match exists, else ''."""
    matches = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def not_one_of(path: str, value: object, allowed: Iterable[str]) -> SpecError:
    allowed = list(allowed)
    return SpecError(
        path, f"{value!r} is not one of {', '.join(map(str, allowed))}{did_you_mean(value, allowed)}"
    )

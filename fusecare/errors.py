"""Exceptions for expected failures.

Every ``FuseCareError`` carries a one-line message meant for the user; entry points print it
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FuseCareError(Exception):
    """An expected failure whose message is one line for the user."""


class ConfigError(FuseCareError, ValueError):
    """A configuration has an unknown key or a value of the wrong type or out of range."""


class InputError(FuseCareError):
    """An input file cannot be used (unreadable, wrong dimensionality, too large, ...)."""


class WeightsError(FuseCareError):
    """Model weights are missing, corrupt or do not match their manifest."""


class TrainingError(FuseCareError):
    """Training cannot write what was asked (an existing ensemble, an untrained member, ...)."""


class ExportError(FuseCareError):
    """A model cannot be exported (nothing to export, not expressible, output folder in the way)."""


class UsageError(FuseCareError):
    """A command line asks for something impossible (a missing path, a folder with no TIFF, ...).

    Raised by the argument checks that run before torch is imported, so a typo costs a fraction
    of a second, not the seconds torch takes to load; entry points turn it into exit status 2.
    """


def one_line(exc: BaseException, *, limit: int = 200) -> str:
    """An exception as one line for a FAILED/FALLBACK message: our own errors by their message,
    anything else (a library's, often cryptic) prefixed with its type and cut to ``limit`` chars."""
    text = " ".join(str(exc).split())
    if isinstance(exc, FuseCareError):
        return text or type(exc).__name__
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

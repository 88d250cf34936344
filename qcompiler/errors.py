"""User-facing errors: one line that names the problem; the CLI turns them into exit code 2."""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit`` chars."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


class QCompilerError(Exception):
    """Bad input or an impossible request. The message is shown to the user as one line."""

    exit_code = 2


class ModelLoadError(QCompilerError):
    """The model could not be found, read or exported."""


class ConfigError(QCompilerError):
    """An option has an invalid value."""


class NothingToQuantizeError(QCompilerError):
    """The matcher found no weight it may quantize."""


class OutputError(QCompilerError):
    """The output cannot be written."""


class InvalidWeightsError(QCompilerError):
    """A weight to quantize holds NaN or Inf values."""


class ValidationFailed(QCompilerError):
    """The compiled model's outputs are not finite, or farther from the original's than --max-error."""

    exit_code = 3

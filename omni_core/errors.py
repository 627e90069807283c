"""Errors that reach users. Each names the input at fault and, where it can, what would be valid."""

from __future__ import annotations

from collections.abc import Iterable


class OmniError(Exception):
    """Base of every error omni_core raises on purpose."""


class InvalidInput(OmniError, ValueError):
    """A value the user chose cannot work. Raised before any expensive work starts."""

    def __init__(self, input_name: str, problem: str, valid: str | Iterable[str] | None = None):
        self.input_name = input_name
        self.problem = problem
        if valid is not None and not isinstance(valid, str):
            valid = ", ".join(str(v) for v in valid)
        self.valid = valid
        message = f"{input_name}: {problem}"
        if valid:
            message += f" Valid: {valid}."
        super().__init__(message)


class IncompatibleStack(OmniError, ValueError):
    """Two acceleration nodes that cannot be combined, or a node that cannot serve the loaded model."""


class ModelLoadError(OmniError, RuntimeError):
    """A model folder or file could not be loaded; the message names the file."""

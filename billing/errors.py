"""Typed errors of the simulator (the CLI prints `error[code]: message`, exit status 2)."""

from __future__ import annotations

from turboflow.errors import ConfigError, TurboflowError

__all__ = ["ConfigError", "InvalidTraceError"]


class InvalidTraceError(TurboflowError):
    """A request trace (CSV file or generator parameters) cannot be replayed; the message names the line."""

    code = "invalid_trace"

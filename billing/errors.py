"""Typed errors of the simulator (the CLI prints `error[code]: message`, exit status 2)."""

from __future__ import annotations

from turboflow.errors import ConfigError, TurboflowError

__all__ = ["ConfigError", "InvalidTraceError", "InvalidUsageEventError", "LedgerUnavailableError"]


class InvalidTraceError(TurboflowError):
    """A request trace (CSV file or generator parameters) cannot be replayed; the message names the line."""

    code = "invalid_trace"


class InvalidUsageEventError(TurboflowError):
    """A CloudEvent given to the usage ledger is not one it records (wrong type, no id/source, data not an object)."""

    code = "invalid_usage_event"


class LedgerUnavailableError(TurboflowError):
    """The ledger database URL is malformed, or the database cannot be reached or migrated."""

    code = "ledger_unavailable"

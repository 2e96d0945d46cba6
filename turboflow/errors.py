"""Typed errors. Every failure a user can cause or meet carries a stable `code` and a human message.

Functions map these to `io.turboflow.video.failed` events; the CLI prints `error[code]: message`.
"""

from __future__ import annotations


class TurboflowError(Exception):
    """Base class. `code` is stable (part of the event contract); `retryable` says whether trying the
    same request again later can succeed."""

    code = "internal_error"
    retryable = False

    def __init__(
        self, message: str, *, code: str | None = None, field: str | None = None, retryable: bool | None = None
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.field = field

    def to_dict(self) -> dict:
        d = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.field:
            d["field"] = self.field
        return d

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(TurboflowError):
    """The request itself is wrong (bad steps, frames, resolution, ...). Never retryable."""

    code = "invalid_request"


class ImageError(InvalidRequestError):
    """The I2V conditioning image cannot be read or is not an image."""

    code = "invalid_image"


class UnsupportedOptionError(InvalidRequestError):
    """A recognised option this build or device cannot honour (e.g. an upstream attention type not implemented)."""

    code = "unsupported_option"


class ModelCacheError(TurboflowError):
    """The model cache directory is missing files, has a bad manifest or fails verification."""

    code = "model_cache_error"


class ChecksumMismatchError(ModelCacheError):
    code = "checksum_mismatch"


class CheckpointError(TurboflowError):
    """A checkpoint file does not match the architecture (missing/unexpected keys, wrong shapes)."""

    code = "checkpoint_mismatch"


class OutOfMemoryError(TurboflowError):
    """The device ran out of memory for this request; a smaller request may succeed."""

    code = "out_of_memory"


class ConfigError(TurboflowError, ValueError):
    """A deployment setting (environment variable, load option) has a value the engine cannot use."""

    code = "invalid_config"


class DeviceUnavailableError(ConfigError):
    """The device asked for (e.g. `cuda` on a CPU-only torch build, `cuda:3` on a one-GPU host) cannot be used."""

    code = "device_unavailable"


class WorkerLostError(TurboflowError):
    """A worker process of a multi-device pipeline (engine/parallel.py) died, failed or stopped answering (a
    collective timed out). The pipeline is unusable from then on (the pod goes not-ready and restarts); the request
    itself may succeed on another pod, so it is retryable (the function answers 503 and the broker retries)."""

    code = "device_unavailable"
    retryable = True


class RequestCancelled(TurboflowError):
    """The request was cancelled (before it reached the device, or at a step boundary while it ran). Not a
    failure: the function answers with an `io.turboflow.video.cancelled` event."""

    code = "cancelled"

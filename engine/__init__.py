"""Generation core: model loading, rCM sampler, attention, video encoding. Knows nothing of events or S3."""

from turboflow.errors import (  # noqa: F401
    CheckpointError,
    ChecksumMismatchError,
    ImageError,
    InvalidRequestError,
    ModelCacheError,
    OutOfMemoryError,
    TurboflowError,
    UnsupportedOptionError,
)

from .request import FPS, RESOLUTIONS, GenerationRequest, GenerationResult  # noqa: F401

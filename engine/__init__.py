"""Generation core: model loading, rCM sampler, attention, video encoding. Knows nothing of events or S3."""
from .errors import (CheckpointError, ChecksumMismatchError, ImageError, InvalidRequestError,  # noqa: F401
                     ModelCacheError, OutOfMemoryError, TurboflowError, UnsupportedOptionError)
from .request import FPS, RESOLUTIONS, GenerationRequest, GenerationResult  # noqa: F401

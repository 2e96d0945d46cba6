"""Generation core: model loading, rCM sampler, attention, video encoding. Knows nothing of events or S3.

Architecture facts live in model-family specs (`engine/families`: wan2.1, wan2.2), named by the model cache's
manifest; the rest of the engine is family-generic.
"""

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

from .request import RESOLUTIONS, GenerationRequest, GenerationResult, ValidatedRequest  # noqa: F401

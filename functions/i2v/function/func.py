"""Knative function (func-python, CloudEvents): I2V video generation.

Build/deploy with the knative func Python template: the scaffolding calls `func_python.cloudevent.serve(new)`.
Everything lives in turboflow.functions.common.VideoFunction; this file only picks the kind.
Configuration (environment): MODEL_DIR (the model cache PVC mount), TURBOFLOW_BUCKET, S3_ENDPOINT_URL, AWS_*,
see turboflow/functions/common.py and turboflow/storage/s3.py.
"""

from turboflow.functions.app import install
from turboflow.functions.common import VideoFunction

install()  # func-python's serve() then also answers GET /metrics on the same port


def new() -> VideoFunction:
    """Called once per pod by func-python; start(cfg) loads the model in the background."""
    return VideoFunction("i2v")

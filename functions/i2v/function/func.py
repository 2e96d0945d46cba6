"""Knative function (func-python, CloudEvents): I2V video generation.

func-python's contract: `new()` returns the function instance (start, stop, alive, ready, handle); everything
lives in turboflow.functions (video.py wires settings.py, slot.py, job.py, replies.py). Served with /metrics and
the request guard in front by `turboflow serve i2v` (the image's entry point) or
`python -m turboflow.functions.i2v.function`; func-python's stock `serve(new)` serves it bare (no /metrics).
Configuration: the environment, every variable in turboflow/settings.py (docs/functions.md).
"""

from turboflow.functions.video import VideoFunction


def new() -> VideoFunction:
    """Called once per pod; start(cfg) builds the settings and loads the model in the background."""
    return VideoFunction("i2v")

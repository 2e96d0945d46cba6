"""The repository root as a Knative function project (func.yaml beside this package): one image, both tasks.

func's Python scaffolding imports `new` from this package and calls func-python's `serve(new)`; `new()` returns the
function of the task that TURBOFLOW_TASK names, which is exactly what that task's own function root serves
(`functions/t2v/function`, `functions/i2v/function`, installed as `turboflow.functions.<task>.function`). Each
Knative Service picks its task with that one variable; the image is the same.
"""

from __future__ import annotations

import importlib
import os

from turboflow.errors import ConfigError

TASK_VARIABLE = "TURBOFLOW_TASK"
TASKS = ("t2v", "i2v")


def task_from(environ) -> str:
    """The task named by TURBOFLOW_TASK; a missing or unknown value is a ConfigError naming the variable."""
    task = environ.get(TASK_VARIABLE, "")
    if task not in TASKS:
        raise ConfigError(f"{TASK_VARIABLE}: expected one of {', '.join(TASKS)}, got {task!r}")
    return task


def new():
    """Called once per process by func-python: the task's own function (its `new()`), chosen by TURBOFLOW_TASK."""
    return importlib.import_module(f"turboflow.functions.{task_from(os.environ)}.function").new()

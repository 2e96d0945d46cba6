"""GPU benchmark harness (not part of the installed package): `python -m bench.run --help` from the repo root.

On a machine where turboflow is not pip-installed (the GPU box gets a bare copy of the tree), map the repo's
package directories onto the `turboflow` namespace the way pyproject.toml's package-dir does."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import turboflow.engine  # noqa: F401  (installed, e.g. the dev venv)
except ImportError:
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    import turboflow

    if _ROOT not in turboflow.__path__:
        turboflow.__path__.append(_ROOT)  # turboflow.engine -> engine/, turboflow.storage -> storage/, ...

"""`turboflow` command line. Each package registers its own verbs; this module only dispatches.

Verbs: generate, model (engine); serve (functions); dev, submit, events, demo (eventing); manifests (infra).
A typed TurboflowError becomes `error[code]: message` and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module path -> it defines register(subparsers); imported lazily so `turboflow --help` stays fast
_REGISTRARS = (
    "turboflow.engine.cli",
    "turboflow.functions.cli",
    "turboflow.eventing.cli",
    "turboflow.storage.cli",
    "turboflow.manifests",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _REGISTRARS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that package has no CLI yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from turboflow.engine.errors import TurboflowError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except TurboflowError as e:
        print(f"error[{e.code}]: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`turboflow` command line. Each package registers its own verbs; this module only dispatches.

(Developer note: the user-facing text of `turboflow --help` is DESCRIPTION and the epilog below, not this docstring.)

Verbs: generate, model (engine); model-cache (storage); serve (functions); events, deadletter, s3source (eventing);
dev, submit, demo, gateway, keys (gateway); simulate, billing (billing); manifests (infra).
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
    "turboflow.billing.cli",
    "turboflow.gateway.devcli",  # dev, submit, demo: they start or go through the gateway
    "turboflow.gateway.cli",  # gateway serve, keys
)


DESCRIPTION = (
    "Generate videos with TurboDiffusion-class models (Wan2.1 text-to-video, Wan2.2\n"
    "image-to-video, 1-4 rCM steps) on this machine, or run them as event-driven\n"
    "functions, locally and on Knative."
)
# verbs grouped for the epilog of `turboflow --help`; a registered verb missing here is listed under "more"
_VERB_GROUPS = (
    ("make videos here", ("model", "generate")),
    ("the event flow on this machine", ("dev", "submit", "events", "demo")),
    ("the front door", ("gateway", "keys")),
    ("cluster roles", ("serve", "deadletter", "s3source", "model-cache", "manifests")),
    ("usage and capacity", ("billing", "simulate")),
)
# libraries that log request URLs (presigned, with credentials in the query) and credential lookups at INFO
_CHATTY_LIBRARIES = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer")


def package_version() -> str:
    """turboflow's version (the distribution is named `function` for Knative func; see pyproject.toml)."""
    from turboflow import __version__

    return __version__


def _epilog(verbs: list[str]) -> str:
    lines, listed = [], set()
    for title, group in _VERB_GROUPS:
        present = [v for v in group if v in verbs]
        listed.update(present)
        if present:
            lines.append(f"  {title + ':':32} {', '.join(present)}")
    more = [v for v in verbs if v not in listed]
    if more:
        lines.append(f"  {'more:':32} {', '.join(more)}")
    return "\n".join(
        [
            "commands by task:",
            *lines,
            "",
            "`turboflow COMMAND --help` describes a command. Errors print",
            "`error[code]: message` and exit with status 2.",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turboflow", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, including the HTTP/S3 libraries' own logs"
    )
    parser.add_argument("--version", action="version", version=f"turboflow {package_version()}")
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
    parser.epilog = _epilog(list(sub.choices))
    return parser


def configure_logging(verbose: bool) -> None:
    """INFO for turboflow (DEBUG with -v); the HTTP/S3 libraries only from WARNING unless -v: at INFO they log
    every request URL, presigned query strings included, and where credentials were found."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    from turboflow.errors import TurboflowError

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except TurboflowError as e:
        print(f"error[{e.code}]: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

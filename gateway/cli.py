"""`turboflow gateway serve`: the gateway as a server (the cluster's turboflow-gateway Service runs it).
`turboflow keys create|list|revoke`: the gateway's API keys (gateway/keys.py), in TURBOFLOW_GATEWAY_DATABASE_URL
or `--database URL`. `create` prints the key once; nothing can show it again."""

from __future__ import annotations

import argparse
import json

from turboflow.errors import InvalidRequestError


def register(sub: argparse._SubParsersAction) -> None:
    gateway = sub.add_parser("gateway", help="the gateway: the HTTP front door, request state, webhooks, console")
    gateway_verbs = gateway.add_subparsers(dest="gateway_command", metavar="VERB")
    gateway_verbs.required = True
    serve = gateway_verbs.add_parser(
        "serve",
        help="serve the gateway (settings from the environment: docs/functions.md, group gateway)",
        description="Serve the gateway: /v1 API, /console, /internal/events (the Trigger's), /metrics, /healthz.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="the gateway's API keys: create, list, revoke")
    verbs = keys.add_subparsers(dest="keys_command", metavar="VERB")
    verbs.required = True

    def common(parser):
        parser.add_argument(
            "--database",
            metavar="URL",
            help="SQLAlchemy URL of the gateway database (default: TURBOFLOW_GATEWAY_DATABASE_URL, else "
            "sqlite:///~/.cache/turboflow/gateway.db)",
        )
        parser.add_argument("--json", action="store_true", help="print JSON")

    create = verbs.add_parser("create", help="create a key for a tenant and print it (once)")
    create.add_argument("--tenant", required=True, help="the tenant the key acts as (a DNS label)")
    create.add_argument("--label", default="", help="a note to recognise the key by")
    common(create)
    create.set_defaults(func=_create)

    listing = verbs.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    common(listing)
    listing.set_defaults(func=_list)

    revoke = verbs.add_parser("revoke", help="revoke a key: it answers 401 from then on")
    revoke.add_argument("key_id", help="the key id (the part after `tf_`), or the whole key")
    revoke.add_argument("--tenant", help="refuse unless the key belongs to this tenant")
    common(revoke)
    revoke.set_defaults(func=_revoke)


def _serve(args) -> int:
    """Connect first (a bad setting or an unreachable NATS is a CLI error, not a half-started server), then serve
    until SIGINT/SIGTERM."""
    import asyncio
    import signal

    from turboflow.eventing.asgi import serve_asgi
    from turboflow.eventing.natsserver import bind_listener
    from turboflow.settings import current

    from .app import build_gateway

    settings = current()
    if not 0 <= args.port < 65536:
        raise InvalidRequestError(f"--port {args.port} is not a TCP port", code="invalid_config", field="port")

    async def main() -> None:
        service = build_gateway(settings)
        listener = bind_listener("gateway", args.host, args.port)
        await service.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"gateway listening on http://{args.host}:{listener.getsockname()[1]}", flush=True)
        try:
            await serve_asgi(service.app, args.host, args.port, stop, sock=listener)
        finally:
            await service.stop()

    asyncio.run(main())
    return 0


def _store(args):
    from turboflow.settings import current

    from .keys import KeyStore

    return KeyStore.open(args.database or current().gateway_database_url)


def _create(args) -> int:
    store = _store(args)
    try:
        key, token = store.create(args.tenant, args.label)
    finally:
        store.close()
    if args.json:
        print(json.dumps({**key.to_dict(), "key": token}))
    else:
        print(token)
        print(f"# key {key.key_id} for tenant {key.tenant}: store it now, it is not shown again")
    return 0


def _list(args) -> int:
    store = _store(args)
    try:
        keys = store.list(args.tenant)
    finally:
        store.close()
    if args.json:
        print(json.dumps([k.to_dict() for k in keys]))
        return 0
    print(f"{'KEY ID':16}  {'TENANT':24}  {'CREATED':20}  {'REVOKED':20}  LABEL")
    for k in keys:
        d = k.to_dict()
        print(f"{d['key_id']:16}  {d['tenant']:24}  {d['created_at']:20}  {d['revoked_at'] or '-':20}  {d['label']}")
    return 0


def _revoke(args) -> int:
    store = _store(args)
    try:
        known = {k.key_id: k for k in store.list(args.tenant)} if args.tenant else None
        from .keys import parse_token

        key_id = (parse_token(args.key_id) or (args.key_id,))[0]
        if known is not None and key_id not in known:
            raise InvalidRequestError(f"tenant {args.tenant!r} has no key {key_id!r}", code="unknown_key")
        key = store.revoke(key_id)
    finally:
        store.close()
    if key is None:
        raise InvalidRequestError(f"no key {key_id!r}", code="unknown_key")
    print(json.dumps(key.to_dict()) if args.json else f"revoked {key.key_id} (tenant {key.tenant})")
    return 0

"""`turboflow simulate`: replay a request trace through the KPA model and report latency, GPU-hours and cost.
`turboflow billing record|report`: the usage ledger (billing/ledger.py) and its per-tenant report."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import random
import re
import sys
from pathlib import Path

from .errors import ConfigError
from .knative import SETTINGS, load_scaling_config, parse_duration, with_settings
from .profiles import DEFAULT_POD_START_S, DEFAULT_VARIANTS, EXAMPLE_GPU_PRICES, SERVICE_DISTRIBUTIONS, load_profiles
from .report import metrics, plot_sweep, summary_markdown, sweep_points, write_json
from .simulator import Simulation
from .traces import DAY_S, bursty, diurnal, parse_mix, parse_rate, poisson, read_csv, write_csv

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACE_KINDS = ("poisson", "bursty", "diurnal")

EPILOG = f"""\
examples:
  turboflow simulate                                   # 1,000 videos/day, diurnal, 1.3B 480p, infra/ as deployed
  turboflow simulate --model 1.3b-480p=0.7,14b-720p=0.3 --sweep retention=0,60,600 --sweep min-scale=0,1 --out out/sim
  turboflow simulate --trace csv:arrivals.csv --set max-scale=8

settings for --set / --sweep (override what infra/ sets, for every service): {", ".join(SETTINGS)}
CSV trace: header arrival_s,task,model,resolution; e.g. 12.5,t2v,1.3b,480p or 30,i2v,a14b,720p
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="capacity planning: replay a request trace through the Knative autoscaler "
        "model (latency, GPU-hours, cost)",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t = p.add_argument_group("trace")
    t.add_argument(
        "--trace", default="diurnal", metavar="KIND", help="poisson | bursty | diurnal | csv:PATH (default diurnal)"
    )
    t.add_argument("--rate", default="1000/day", help="mean arrival rate: N/s, N/min, N/h, N/day (default 1000/day)")
    t.add_argument(
        "--duration",
        default=None,
        help="trace length: seconds or 90m, 24h, 1d (default 1d; csv: at least the last arrival)",
    )
    t.add_argument(
        "--model",
        default="1.3b-480p",
        metavar="MIX",
        help="model key or weighted mix, e.g. 1.3b-480p=0.7,14b-720p=0.3 (default 1.3b-480p)",
    )
    t.add_argument("--seed", default="0", help="random seed; the same seed gives the same result (default 0)")
    t.add_argument("--burst-size", default="8", help="bursty: mean requests per burst (default 8)")
    t.add_argument("--burst-spread", default="60", help="bursty: seconds a burst spreads over (default 60)")
    t.add_argument(
        "--amplitude",
        default="0.8",
        help="diurnal: relative swing around the mean rate, 0..1 (default 0.8: peak 9x the trough)",
    )
    t.add_argument("--peak-hour", default="15", help="diurnal: hour of the peak, 0..24 (default 15)")
    s = p.add_argument_group("scaling (default: what infra/overlays/OVERLAY deploys)")
    s.add_argument("--infra", default=str(REPO_ROOT / "infra"), help="infra/ directory (default: the repository's)")
    s.add_argument("--overlay", default="gpu", help="kustomize overlay under infra/overlays (default gpu)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    s.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="run every combination of these values (repeatable); writes plots with --out",
    )
    m = p.add_argument_group("service times and cold starts (default: bench/results/*.json)")
    m.add_argument("--bench", default=str(REPO_ROOT / "bench" / "results"), help="benchmark JSON directory")
    m.add_argument(
        "--variant",
        default=",".join(DEFAULT_VARIANTS),
        help=f"bench variants in order of preference (default {','.join(DEFAULT_VARIANTS)})",
    )
    m.add_argument(
        "--service-time",
        action="append",
        default=[],
        metavar="MODEL=SECONDS",
        help="override or add a model's service time (median)",
    )
    m.add_argument(
        "--service-dist",
        default="lognormal",
        choices=SERVICE_DISTRIBUTIONS,
        help="service-time distribution around the measured value (default lognormal)",
    )
    m.add_argument("--service-cv", default="0.1", help="lognormal coefficient of variation (default 0.1)")
    m.add_argument(
        "--cold-start",
        action="append",
        default=[],
        metavar="MODEL=SECONDS",
        help="fixed cold start instead of the measured ones",
    )
    m.add_argument(
        "--pod-start",
        default=str(DEFAULT_POD_START_S),
        help=f"seconds added to measured cold starts for scheduling + container start (default "
        f"{DEFAULT_POD_START_S:g}; add GPU node provisioning here if nodes scale too)",
    )
    c = p.add_argument_group("cost and SLO")
    c.add_argument("--gpu", default="H200", help="GPU type priced (default H200)")
    c.add_argument(
        "--gpu-price",
        action="append",
        default=[],
        metavar="TYPE=USD",
        help="price per GPU-hour; examples built in: "
        + ", ".join(f"{k} ${v:.2f}" for k, v in EXAMPLE_GPU_PRICES.items())
        + " (placeholders, not quotes)",
    )
    c.add_argument("--slo-p95", default="120", help="P95 end-to-end latency objective in seconds (default 120)")
    p.add_argument("--out", metavar="DIR", help="write summary.md, results.json, trace.csv and sweep plots here")
    p.set_defaults(func=_simulate)
    _register_billing(sub)


LEDGER_EPILOG = """\
examples:
  turboflow billing record events.jsonl                # one structured-mode CloudEvent (JSON) per line
  turboflow billing report --tenant acme --from 2026-11-01 --to 2026-11-30 --format csv
  turboflow billing report --tenant acme --from 2026-11-01 --to 2026-11-30 --ledger postgresql+psycopg://u@db/ledger

the ledger is TURBOFLOW_LEDGER_URL (default sqlite:///~/.cache/turboflow/ledger.db); prices per GPU-hour come from
TURBOFLOW_GPU_PRICES (TYPE=USD,...) and --gpu-price; the attribution rule is in docs/billing.md.
"""


def _register_billing(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "billing",
        help="usage ledger: record completion/failure events, report GPU-seconds and cost per tenant",
        description="The usage ledger: an append-only record of CloudEvents and the per-tenant GPU-second report.",
        epilog=LEDGER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="billing_command", metavar="VERB")
    verbs.required = True
    record = verbs.add_parser("record", help="store the events of a JSON-lines file (redelivered ones once)")
    record.add_argument("file", help="JSON lines: one structured-mode CloudEvent per line; - for stdin")
    record.add_argument("--ledger", metavar="URL", help="SQLAlchemy URL (default TURBOFLOW_LEDGER_URL or SQLite)")
    record.add_argument(
        "--skip-other-types",
        action="store_true",
        help="pass over event types the ledger does not record (requests, on a whole event stream) instead of failing",
    )
    record.set_defaults(func=_billing_record)
    consume = verbs.add_parser(
        "consume",
        help="store the broker stream's usage events as they come (signatures checked; each event once)",
        description="The metering consumer (billing/consumer.py): a durable JetStream consumer on the broker's "
        "event stream that stores completed, failed, cancelled, started and pod events in the ledger, each once.",
    )
    consume.add_argument("--nats", metavar="URL", help="NATS with the broker's stream (default TURBOFLOW_NATS_URL)")
    consume.add_argument("--ledger", metavar="URL", help="SQLAlchemy URL (default TURBOFLOW_LEDGER_URL or SQLite)")
    consume.add_argument("--durable", default="turboflow-billing", help="consumer name (default turboflow-billing)")
    consume.add_argument("--once", action="store_true", help="store what is there now, then exit")
    consume.add_argument(
        "--accept-unsigned",
        action="store_true",
        help="without TURBOFLOW_EVENT_SIGNING_KEY, store unsigned events too (a development stack only)",
    )
    consume.set_defaults(func=_billing_consume)
    report = verbs.add_parser(
        "report",
        help="GPU-seconds and cost per day and model for one tenant (--platform: the overhead no request pays)",
    )
    report.add_argument("--tenant", help="the tenant billed (required unless --platform)")
    report.add_argument(
        "--platform",
        action="store_true",
        help="platform overhead per model and GPU type instead: model loads no request paid and warm idle time "
        "(pod.ready / pod.stopped facts of every tenant's pods), priced per GPU type",
    )
    report.add_argument("--from", dest="start", required=True, metavar="YYYY-MM-DD", help="first day (UTC)")
    report.add_argument("--to", dest="end", required=True, metavar="YYYY-MM-DD", help="last day (UTC), included")
    report.add_argument("--format", default="table", help="table | csv | json (default table)")
    report.add_argument("--ledger", metavar="URL", help="SQLAlchemy URL (default TURBOFLOW_LEDGER_URL or SQLite)")
    report.add_argument("--gpu", default="H200", help="GPU type priced (default H200)")
    report.add_argument("--gpu-price", action="append", default=[], metavar="TYPE=USD", help="price per GPU-hour")
    report.add_argument(
        "--charge-load-to",
        default="waited",
        help="who pays a cold start's model load: waited (the request, only if it waited for it; default), "
        "request, platform",
    )
    report.set_defaults(func=_billing_report)


def _quiet_migrations(args) -> None:
    """Alembic logs every plugin and migration step at INFO; a report's stderr shows them only with -v."""
    if not getattr(args, "verbose", False):
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _billing_record(args) -> int:
    """Store events as they are read, so `turboflow events tail --all --json | turboflow billing record -` follows
    the stream; a bad line stops there, and running again stores only what is missing (the ledger is idempotent)."""
    _quiet_migrations(args)
    from .errors import InvalidUsageEventError
    from .ledger import RECORDED_TYPES, open_ledger

    try:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {args.file}: {e.strerror}") from None
    ledger = open_ledger(args.ledger)
    stored = repeated = 0
    try:
        with stream:
            for number, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    if args.skip_other_types and isinstance(event, dict) and event.get("type") not in RECORDED_TYPES:
                        continue
                    new = ledger.record(event)
                except json.JSONDecodeError as e:
                    raise InvalidUsageEventError(f"{args.file}:{number}: not JSON ({e.msg})") from None
                except InvalidUsageEventError as e:
                    raise InvalidUsageEventError(f"{args.file}:{number}: {e.message}", field=e.field) from None
                stored, repeated = stored + new, repeated + (not new)
    finally:
        ledger.close()
        print(f"recorded {stored} new event(s), {repeated} already in the ledger")
    return 0


def _billing_consume(args) -> int:
    _quiet_migrations(args)
    import asyncio
    import signal

    from turboflow.errors import TurboflowError
    from turboflow.settings import current

    from .consumer import LedgerConsumer
    from .ledger import open_ledger

    settings = current()
    nats_url = args.nats or settings.nats_url
    if not nats_url:
        raise ConfigError("no NATS URL: pass --nats URL or set TURBOFLOW_NATS_URL")
    key = settings.event_signing_key
    if key is None and not args.accept_unsigned:
        raise ConfigError(
            "no TURBOFLOW_EVENT_SIGNING_KEY: without it forged usage events cannot be told apart "
            "(pass --accept-unsigned on a development stack)"
        )
    ledger = open_ledger(args.ledger)

    async def main() -> None:
        consumer = LedgerConsumer(nats_url, ledger, signing_key=key, durable=args.durable)
        try:
            await asyncio.wait_for(consumer.connect(), 10)
        except Exception as e:  # noqa: BLE001 - nats-py raises many kinds; all mean "not reachable"
            await consumer.close()
            raise TurboflowError(
                f"cannot reach NATS at {nats_url} or its event stream ({type(e).__name__}: {e or 'no answer'})",
                code="no_nats",
            ) from None
        try:
            if args.once:
                await consumer.consume_available(timeout=1.0)
            else:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await consumer.run(stop)
        finally:
            await consumer.close()
            print(consumer.stats.line())

    try:
        asyncio.run(main())
    finally:
        ledger.close()
    return 0


def _billing_report(args) -> int:
    _quiet_migrations(args)
    from turboflow.eventing.types import POD_READY

    from .attribution import LOAD_RULES, charges, platform_overhead
    from .ledger import open_ledger
    from .usage_report import FORMATS, render, summarize

    start, end = _day(args.start, "--from"), _day(args.end, "--to")
    if end < start:
        raise ConfigError(f"--to {args.end} is before --from {args.start}")
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}")
    if args.charge_load_to not in LOAD_RULES:
        raise ConfigError(f"--charge-load-to {args.charge_load_to!r} is not one of {', '.join(LOAD_RULES)}")
    prices = gpu_prices(os.environ.get("TURBOFLOW_GPU_PRICES", ""), args.gpu_price)
    if args.gpu not in prices:
        raise ConfigError(f"no price for GPU {args.gpu!r}: pass --gpu-price {args.gpu}=USD")
    if not args.platform and not args.tenant:
        raise ConfigError("pass --tenant TENANT (a tenant's bill) or --platform (the overhead no request pays)")
    period = (
        datetime.datetime.combine(start, datetime.time()),
        datetime.datetime.combine(end + datetime.timedelta(days=1), datetime.time()),
    )
    ledger = open_ledger(args.ledger)
    try:
        facts = ledger.facts(tenant=None if args.platform else args.tenant, start=period[0], end=period[1])
        # the pods that served the period's first requests may have turned ready a while before it began
        pod_facts = ledger.facts(start=period[0] - POD_READY_LOOKBACK, end=period[1], types=(POD_READY,))
    finally:
        ledger.close()
    request_charges = charges(facts, pod_facts=pod_facts, charge_load_to=args.charge_load_to)
    if args.platform:
        from .usage_report import render_platform, summarize_platform

        overhead = platform_overhead(facts, request_charges)
        rows = summarize_platform(overhead, prices=prices, default_gpu=args.gpu)
        meta = {
            "scope": "platform",
            "from": start.isoformat(),
            "to": end.isoformat(),
            "default_gpu": args.gpu,
            "charge_load_to": args.charge_load_to,
        }
        print(render_platform(rows, args.format, meta=meta))
        return 0
    rows = summarize(request_charges, price_per_gpu_hour=prices[args.gpu])
    meta = {
        "tenant": args.tenant,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "gpu": args.gpu,
        "price_per_gpu_hour": prices[args.gpu],
        "charge_load_to": args.charge_load_to,
    }
    print(render(rows, args.format, meta=meta))
    return 0


POD_READY_LOOKBACK = datetime.timedelta(days=2)  # pods live hours, not days: a ready this old cannot matter


def gpu_prices(setting: str, overrides: list[str]) -> dict[str, float]:
    """The example price table, then TURBOFLOW_GPU_PRICES (`TYPE=USD,...`), then --gpu-price flags."""
    prices = dict(EXAMPLE_GPU_PRICES)
    items = [item for item in setting.split(",") if item.strip()]
    prices.update({k: _number(v, f"GPU price {k}") for k, v in _pairs(items, "GPU price").items()})
    prices.update({k: _number(v, f"--gpu-price {k}") for k, v in _pairs(overrides, "--gpu-price").items()})
    return prices


def _day(text: str, flag: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text) if len(text) == 10 else _not_a_day(text, flag)
    except ValueError:
        return _not_a_day(text, flag)


def _not_a_day(text: str, flag: str):
    raise ConfigError(f"{flag} {text!r} is not a date (YYYY-MM-DD)", field=flag)


def _number(text: str, what: str, *, low: float = 0.0, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {text!r} is not a{' whole' if integer else ''} number") from None
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{what} {text!r} must be >= {low:g}")
    return value


def _pairs(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{what} {item!r} is not KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def _duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)d\s*", str(text))
    value = float(match.group(1)) * DAY_S if match else parse_duration(text)
    if value <= 0:
        raise ConfigError(f"duration {text!r} must be > 0")
    return value


def _simulate(args) -> int:
    seed = int(_number(args.seed, "seed", integer=True))
    service_overrides = {
        k: _number(v, f"--service-time {k}", low=1e-6) for k, v in _pairs(args.service_time, "--service-time").items()
    }
    cold_overrides = {k: _number(v, f"--cold-start {k}") for k, v in _pairs(args.cold_start, "--cold-start").items()}
    variants = tuple(v.strip() for v in args.variant.split(",") if v.strip())
    profiles = load_profiles(
        Path(args.bench),
        variants=variants,
        service_overrides=service_overrides,
        cold_start_overrides=cold_overrides,
        distribution=args.service_dist,
        cv=_number(args.service_cv, "--service-cv"),
        pod_start_s=_number(args.pod_start, "--pod-start"),
    )
    prices = dict(EXAMPLE_GPU_PRICES)
    prices.update({k: _number(v, f"--gpu-price {k}") for k, v in _pairs(args.gpu_price, "--gpu-price").items()})
    if args.gpu not in prices:
        raise ConfigError(f"no price for GPU {args.gpu!r}: pass --gpu-price {args.gpu}=USD")
    slo_s = _number(args.slo_p95, "--slo-p95", low=1e-6)
    requests, duration, trace_text = _trace(args, profiles, seed)
    settings = _pairs(args.set, "--set")
    sweeps = {k: [v.strip() for v in values.split(",")] for k, values in _pairs(args.sweep, "--sweep").items()}
    for key in list(settings) + list(sweeps):
        if key not in SETTINGS:
            raise ConfigError(f"unknown setting {key!r}; known: {', '.join(SETTINGS)}")
    models = sorted({r.model for r in requests})
    base = {key: load_scaling_config(Path(args.infra), profiles[key].kind, args.overlay) for key in models}
    points = []
    first = None
    for point in sweep_points(sweeps):
        configs = {key: with_settings(config, {**settings, **point}) for key, config in base.items()}
        results = Simulation(requests, profiles, configs, seed=seed, duration_s=duration).run()
        price = prices[args.gpu]
        per_service = {key: metrics([r], slo_s=slo_s, price_per_gpu_hour=price) for key, r in results.items()}
        total = metrics(list(results.values()), slo_s=slo_s, price_per_gpu_hour=price)
        points.append((point, total))
        if first is None:
            first = (configs, per_service, total)
    configs, per_service, total = first
    description = [
        f"trace: {trace_text}, {len(requests)} requests over {duration / 3600:g} h, seed {seed}",
        "service times (s): "
        + ", ".join(
            f"{k} {profiles[k].service_s:.2f} ({profiles[k].source}, {profiles[k].distribution})" for k in models
        ),
        "mean cold start (s): " + ", ".join(f"{k} {profiles[k].mean_cold_start():.1f}" for k in models),
        f"GPU {args.gpu} at ${prices[args.gpu]:.2f}/GPU-hour (example price); SLO: P95 < {slo_s:g} s",
        f"infra: {args.infra} overlay {args.overlay}" + (f"; --set {settings}" if settings else ""),
    ]
    if len(points) > 1:
        description.append(
            "the Result table is the first sweep point: " + ", ".join(f"{k}={v}" for k, v in points[0][0].items())
        )
    plots = []
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create {out}: {e}") from None
        if len(points) > 1:
            plots = plot_sweep(out, points)
        write_csv(out / "trace.csv", requests)
        write_json(
            out / "results.json",
            {
                "trace": trace_text,
                "seed": seed,
                "duration_s": duration,
                "requests": len(requests),
                "gpu": args.gpu,
                "price_per_gpu_hour": prices[args.gpu],
                "slo_p95_s": slo_s,
                "configs": configs,
                "per_service": per_service,
                "total": total,
                "sweep": [{"settings": s, "metrics": m} for s, m in points],
            },
        )
    summary = summary_markdown(
        title="turboflow capacity simulation",
        description=description,
        configs=configs,
        per_service=per_service,
        total=total,
        points=points,
        plots=plots,
    )
    if args.out:
        (Path(args.out) / "summary.md").write_text(summary)
    print(summary)
    return 0


def _trace(args, profiles, seed: int):
    known = set(profiles)
    duration = _duration(args.duration or "1d")
    rng = random.Random(f"{seed}:trace")
    if args.trace.startswith("csv:"):
        path = args.trace[4:]
        if not path:
            raise ConfigError("--trace csv:PATH needs a path")
        requests = read_csv(Path(path), known)
        duration = max(duration if args.duration else 0.0, requests[-1].arrival_s)
        return requests, duration, f"csv {path}"
    if args.trace not in TRACE_KINDS:
        raise ConfigError(f"--trace {args.trace!r} is not one of {', '.join(TRACE_KINDS)} or csv:PATH")
    rate = parse_rate(args.rate)
    mix = parse_mix(args.model, known)
    if args.trace == "poisson":
        requests = poisson(rate, duration, mix, rng)
    elif args.trace == "bursty":
        requests = bursty(
            rate,
            duration,
            mix,
            rng,
            burst_size=_number(args.burst_size, "--burst-size", low=1),
            burst_spread_s=_number(args.burst_spread, "--burst-spread"),
        )
    else:
        requests = diurnal(
            rate,
            duration,
            mix,
            rng,
            amplitude=_number(args.amplitude, "--amplitude"),
            peak_hour=_number(args.peak_hour, "--peak-hour"),
        )
    if not requests:
        raise ConfigError(f"the {args.trace} trace at {args.rate} over {duration:g} s has no requests")
    mix_text = ", ".join(f"{k} {w * 100:.0f} %" for k, w in mix.items())
    return requests, duration, f"{args.trace} at {args.rate} ({mix_text})"

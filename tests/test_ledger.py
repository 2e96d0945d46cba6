"""The usage ledger against real databases: a SQLite file and a PostgreSQL server started from Debian's binaries.

Every ledger test runs on both (the `ledger_url` fixture is parametrized); the report goes through the real
`turboflow billing` command line.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from turboflow.billing.attribution import charge, charges
from turboflow.billing.errors import InvalidUsageEventError, LedgerUnavailableError
from turboflow.billing.ledger import open_ledger
from turboflow.cli import main

COMPLETED = "io.turboflow.video.completed"
FAILED = "io.turboflow.video.failed"


# ---- a real PostgreSQL server for the session -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """`postgresql+psycopg://postgres@127.0.0.1:PORT` of a throwaway cluster; FAILS (never skips) without binaries."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail(
            "PostgreSQL binaries are missing (/usr/lib/postgresql/*/bin/initdb): `apt-get install postgresql` "
            "(.ci/run does this on CI)"
        )
    bindir = Path(found[-1]).parent
    # initdb refuses to run as root: run the server as the `postgres` user, in a directory it owns
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="turboflow-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """A fresh, empty ledger database: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    server = request.getfixturevalue("postgres_server")
    name = f"ledger_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**9}"
    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{server}/{name}"


@pytest.fixture
def ledger(ledger_url):
    ledger = open_ledger(ledger_url)
    yield ledger
    ledger.close()


# ---- events shaped like the functions' ----------------------------------------------------------------------------
def completed(
    event_id,
    *,
    tenant="acme",
    model="Wan2.1-T2V-1.3B",
    gpu_seconds=10.0,
    cold_start=False,
    load=8.1,
    queue_wait=0.01,
    at="2026-11-30T12:00:00Z",
    source="/turboflow/t2v",
):
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": COMPLETED,
        "time": at,
        "data": {
            "request_id": event_id,
            "tenant": tenant,
            "kind": "t2v",
            "model": model,
            "timings": {"queue_wait": queue_wait, "total": gpu_seconds + queue_wait},
            "usage": {
                "gpu_seconds": gpu_seconds,
                "cold_start": cold_start,
                "model_load_seconds": load,
                "device": "cuda:0",
            },
            "completed_at": at,
        },
    }


def failed(event_id, *, tenant="acme", at="2026-11-30T13:00:00Z", usage=None):
    data = {"request_id": event_id, "code": "out_of_memory", "message": "oom", "retryable": False, "tenant": tenant}
    if usage is not None:
        data["usage"] = usage
    return {"specversion": "1.0", "id": event_id, "source": "/turboflow/t2v", "type": FAILED, "time": at, "data": data}


# ---- the ledger -------------------------------------------------------------------------------------------------
def test_a_redelivered_event_is_stored_once(ledger):
    event = completed("r1")
    assert ledger.record(event) is True
    assert ledger.record(json.loads(json.dumps(event))) is False
    assert ledger.count() == 1
    # the identity is (source, id): the same id from another source is another event
    assert ledger.record(completed("r1", source="/turboflow/i2v")) is True
    assert ledger.count() == 2


def test_concurrent_redeliveries_store_one_row(ledger):
    """Two consumers handed the same event at once: the unique constraint, not a read-then-write, decides."""
    event = completed("r-concurrent")
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(lambda _: ledger.record(event), range(12)))
    assert outcomes.count(True) == 1
    assert ledger.count() == 1


def test_facts_keep_the_raw_data_and_do_not_depend_on_arrival_order(ledger_url):
    events = [completed("a", gpu_seconds=5.0), failed("b"), completed("c", gpu_seconds=17.0, cold_start=True)]
    results = []
    for order in (events, list(reversed(events)), [events[1], events[0], events[1], events[2], events[0]]):
        ledger = open_ledger(ledger_url)
        with ledger.engine.begin() as connection:  # a fresh table per ordering
            connection.execute(sa.text("DELETE FROM usage_facts"))
        for event in order:
            ledger.record(event)
        facts = ledger.facts(tenant="acme")
        results.append(sorted((f.event_id, f.type, json.dumps(f.data, sort_keys=True)) for f in facts))
        billed = sorted((c.event_id, round(c.billed_s, 6)) for c in charges(facts))
        assert billed == [("a", 5.0), ("b", 0.0), ("c", round(17.0 - 8.1, 6))]
        ledger.close()
    assert results[0] == results[1] == results[2]
    assert json.loads(results[0][0][2]) == events[0]["data"]


def test_reopening_runs_no_migration_twice_and_keeps_rows(ledger_url):
    first = open_ledger(ledger_url)
    first.record(completed("r1"))
    first.close()
    again = open_ledger(ledger_url)
    assert again.count() == 1
    with again.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0001"
    again.close()


@pytest.mark.parametrize(
    "event,field",
    [
        ({"id": "x", "source": "s", "type": "io.turboflow.video.t2v.requested", "data": {}}, "type"),
        ({"source": "s", "type": COMPLETED, "data": {}}, "id"),
        ({"id": "x", "source": "s", "type": FAILED, "data": "not an object"}, "data"),
        ({"id": "x", "source": "s", "type": COMPLETED, "data": {"tenant": "acme"}}, "usage"),
        ({**completed("x"), "time": "yesterday", "data": {**completed("x")["data"], "completed_at": "noon"}}, "time"),
    ],
)
def test_unusable_events_are_typed_errors_and_store_nothing(ledger, event, field):
    with pytest.raises(InvalidUsageEventError) as caught:
        ledger.record(event)
    assert caught.value.code == "invalid_usage_event" and caught.value.field == field
    assert ledger.count() == 0


def test_future_lifecycle_types_are_kept_as_raw_facts(ledger):
    ready = {"id": "p1", "source": "/pods/t2v-abc", "type": "io.turboflow.pod.ready", "data": {"load_seconds": 8.1}}
    assert ledger.record(ready) is True
    (fact,) = ledger.facts()
    assert fact.data == {"load_seconds": 8.1}
    assert charge(fact) is None  # no rule bills pod facts yet


def test_a_bad_ledger_url_is_a_typed_error():
    with pytest.raises(LedgerUnavailableError):
        open_ledger("mysql://nobody@127.0.0.1/ledger")
    with pytest.raises(LedgerUnavailableError):
        open_ledger("not a url")


# ---- attribution --------------------------------------------------------------------------------------------------
def test_the_issue_case_a_load_finished_before_the_request_came_is_not_billed_to_it(ledger):
    """Pod ready 22:54:55, request 22:55:31: billed 58.67 s = 50.6 s of work + 8.1 s of load. The rule: 50.6 s."""
    ledger.record(
        completed("issue15", gpu_seconds=58.67, cold_start=True, load=8.07, queue_wait=0.003, at="2026-11-30T22:56:22Z")
    )
    (fact,) = ledger.facts(tenant="acme")
    billed = charge(fact)
    assert round(billed.billed_s, 1) == 50.6
    assert billed.request_load_s == 0.0 and billed.platform_load_s == pytest.approx(8.07)
    # the other rules, for comparison: the function's own number, and never the load
    assert charge(fact, charge_load_to="request").billed_s == pytest.approx(58.67)
    assert charge(fact, charge_load_to="platform").billed_s == pytest.approx(58.67 - 8.07)


def test_a_request_that_waited_for_the_load_pays_it(ledger):
    ledger.record(completed("woke", gpu_seconds=58.67, cold_start=True, load=8.07, queue_wait=7.9))
    (fact,) = ledger.facts()
    assert charge(fact).billed_s == pytest.approx(58.67)
    assert charge(fact, charge_load_to="platform").billed_s == pytest.approx(50.6)


def test_failed_requests_pay_the_gpu_time_they_report(ledger):
    ledger.record(failed("f0"))
    ledger.record(failed("f1", usage={"gpu_seconds": 3.5, "cold_start": False, "model_load_seconds": 8.0}))
    by_id = {c.event_id: c for c in charges(ledger.facts(tenant="acme"))}
    assert by_id["f0"].billed_s == 0.0 and by_id["f0"].outcome == "failed"
    assert by_id["f1"].billed_s == 3.5


# ---- attribution with the pods' own facts (io.turboflow.pod.ready / .stopped) --------------------------------------
POD_READY = "io.turboflow.pod.ready"
POD_STOPPED = "io.turboflow.pod.stopped"


def pod_ready(pod, *, at, load, model="Wan2.1-T2V-1.3B", gpu_type="H200", started="2026-11-30T22:54:40.000Z"):
    data = {
        "pod": pod, "kind": "t2v", "model": model, "gpu_type": gpu_type, "device": "cuda:0",
        "process_started_at": started, "load_seconds": load, "start_to_ready_seconds": load + 6.0, "ready_at": at,
    }  # fmt: skip
    return {"specversion": "1.0", "id": f"ready-{pod}-{at}", "source": "/turboflow/t2v", "type": POD_READY,
            "time": at, "subject": pod, "data": data}  # fmt: skip


def pod_stopped(pod, *, at, idle, busy=50.6, model="Wan2.1-T2V-1.3B", gpu_type="H200"):
    data = {
        "pod": pod, "kind": "t2v", "model": model, "gpu_type": gpu_type, "device": "cuda:0",
        "process_started_at": "2026-11-30T22:54:40.000Z", "ready_seconds": idle + busy, "busy_seconds": busy,
        "warm_idle_seconds": idle, "requests_served": 1, "ready_at": "2026-11-30T22:54:55Z", "stopped_at": at,
    }  # fmt: skip
    return {"specversion": "1.0", "id": f"stopped-{pod}", "source": "/turboflow/t2v", "type": POD_STOPPED,
            "time": at, "subject": pod, "data": data}  # fmt: skip


def on_pod(event, pod, requested_at=None, gpu_type="H200"):
    """A completion that names the pod that ran it (and when it was requested), as the functions now send."""
    event["data"]["usage"].update(pod=pod, gpu_type=gpu_type)
    if requested_at:
        event["data"]["usage"]["requested_at"] = requested_at
    return event


def test_with_pod_ready_the_issue_case_is_billed_by_the_documented_rule(ledger):
    """Ready 22:54:55, requested 22:55:31 (after): the 8.07 s load is platform overhead, 50.6 s billed."""
    ledger.record(pod_ready("pod-a", at="2026-11-30T22:54:55Z", load=8.07))
    ledger.record(
        on_pod(
            completed("issue15", gpu_seconds=58.67, cold_start=True, load=8.07, queue_wait=0.003,
                      at="2026-11-30T22:56:22Z"),
            "pod-a", requested_at="2026-11-30T22:55:31Z",
        )
    )  # fmt: skip
    (billed,) = charges(ledger.facts(tenant="acme"), pod_facts=ledger.facts(types=(POD_READY,)))
    assert round(billed.billed_s, 1) == 50.6 and billed.platform_load_s == pytest.approx(8.07)
    assert billed.ready_event_id == "ready-pod-a-2026-11-30T22:54:55Z" and billed.gpu_type == "H200"


def test_a_request_the_activator_held_while_the_pod_loaded_pays_the_load(ledger):
    """Requested 22:54:40, before ready at 22:54:55: it waited (outside the pod, queue_wait ~ 0), so it pays the
    load. Without the pod.ready fact the queue_wait fallback cannot see that wait."""
    ledger.record(pod_ready("pod-b", at="2026-11-30T22:54:55Z", load=8.07))
    ledger.record(
        on_pod(
            completed("woken", gpu_seconds=58.67, cold_start=True, load=8.07, queue_wait=0.003,
                      at="2026-11-30T22:55:46Z"),
            "pod-b", requested_at="2026-11-30T22:54:40Z",
        )
    )  # fmt: skip
    facts = ledger.facts()
    (with_ready,) = charges(facts)
    assert with_ready.billed_s == pytest.approx(58.67) and with_ready.request_load_s == pytest.approx(8.07)
    (without,) = charges([f for f in facts if f.type != POD_READY])
    assert without.billed_s == pytest.approx(50.6) and without.ready_event_id is None


def test_platform_report_lists_unpaid_loads_and_warm_idle_per_model_and_gpu_type(ledger_url, tmp_path, capsys):
    small, big = "Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B"
    _record(
        ledger_url,
        tmp_path,
        [
            pod_ready("pod-a", at="2026-11-30T22:54:55Z", load=8.0),  # its request came later: platform pays
            on_pod(completed("late", cold_start=True, load=8.0, at="2026-11-30T22:56:22Z"), "pod-a",
                   requested_at="2026-11-30T22:55:31Z"),
            pod_stopped("pod-a", at="2026-11-30T23:10:00Z", idle=900.0),
            pod_ready("pod-b", at="2026-11-30T10:00:00Z", load=5.0),  # its request waited for it: the tenant pays
            on_pod(completed("early", cold_start=True, load=5.0, at="2026-11-30T10:01:00Z"), "pod-b",
                   requested_at="2026-11-30T09:59:58Z"),
            pod_ready("pod-c", at="2026-11-30T11:00:00Z", load=30.0, model=big, gpu_type="RTX5090"),  # never used
            pod_stopped("pod-c", at="2026-11-30T11:05:00Z", idle=300.0, busy=0.0, model=big, gpu_type="RTX5090"),
            # history from before pods reported themselves: the queue_wait rule leaves this load to the platform
            completed("old", tenant="globex", cold_start=True, load=7.0, at="2026-11-30T09:00:00Z"),
        ],
    )  # fmt: skip
    capsys.readouterr()
    argv = ["billing", "report", "--platform", "--from", "2026-11-30", "--to", "2026-11-30", "--ledger", ledger_url]
    assert main([*argv, "--format", "json", "--gpu-price", "H200=3.6"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["model"], r["gpu_type"]): r for r in report["rows"]}
    assert rows[(small, "H200")]["pods"] == 2
    assert rows[(small, "H200")]["platform_load_s"] == pytest.approx(8.0)  # pod-a's; pod-b's was paid
    assert rows[(small, "H200")]["warm_idle_s"] == pytest.approx(900.0)
    assert rows[(small, "H200")]["cost_usd"] == pytest.approx(908.0 / 3600 * 3.6)
    assert rows[(small, "unknown")]["platform_load_s"] == pytest.approx(7.0)
    assert (rows[(big, "RTX5090")]["platform_load_s"], rows[(big, "RTX5090")]["warm_idle_s"]) == (30.0, 300.0)
    assert rows[(big, "RTX5090")]["price_per_gpu_hour"] == 0.90  # priced at its own GPU type
    assert rows[("*", "*")]["overhead_s"] == pytest.approx(8.0 + 900.0 + 7.0 + 30.0 + 300.0)
    # the tenant's own bill agrees: pod-b's load is charged to acme, pod-a's is not
    acme = json.loads(_report(ledger_url, capsys, "json", "--from", "2026-11-30"))
    assert acme["rows"][-1]["load_charged_s"] == pytest.approx(5.0)
    table = main([*argv, "--format", "table"])
    assert table == 0 and capsys.readouterr().out.splitlines()[-1].split()[:3] == ["total", "*", "*"]


def test_a_report_needs_a_tenant_or_platform(ledger_url, capsys):
    assert main(["billing", "report", "--from", "2026-11-30", "--to", "2026-11-30", "--ledger", ledger_url]) == 2
    assert "--tenant TENANT" in capsys.readouterr().err


# ---- the report, through the command line --------------------------------------------------------------------
def _record(ledger_url, tmp_path, events):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main(["billing", "record", str(path), "--ledger", ledger_url]) == 0


REPORT_EVENTS = [
    completed("d1a", gpu_seconds=10.0, at="2026-11-29T08:00:00Z"),
    completed("d1b", gpu_seconds=20.0, model="Wan2.1-T2V-14B", at="2026-11-29T09:00:00Z"),
    completed("d2a", gpu_seconds=30.0, at="2026-11-30T10:00:00+01:00"),  # 09:00 UTC
    completed("d2b", gpu_seconds=18.1, cold_start=True, load=8.1, at="2026-11-30T11:00:00Z"),  # 10 s billed
    failed("d2c", at="2026-11-30T12:00:00Z", usage={"gpu_seconds": 2.0}),
    completed("other", tenant="globex", gpu_seconds=99.0, at="2026-11-30T12:00:00Z"),
    completed("late", gpu_seconds=99.0, at="2026-12-01T00:00:00Z"),  # after --to
]
SMALL = "Wan2.1-T2V-1.3B"
BIG = "Wan2.1-T2V-14B"
EXPECTED = {  # (scope, day, model) -> (requests, billed GPU-seconds)
    ("line", "2026-11-29", SMALL): (1, 10.0),
    ("line", "2026-11-29", BIG): (1, 20.0),
    ("line", "2026-11-30", SMALL): (2, 40.0),
    ("line", "2026-11-30", "unknown"): (1, 2.0),  # failed events carry no model
    ("day", "2026-11-29", "*"): (2, 30.0),
    ("day", "2026-11-30", "*"): (3, 42.0),
    ("model", "*", SMALL): (3, 50.0),
    ("model", "*", BIG): (1, 20.0),
    ("model", "*", "unknown"): (1, 2.0),
    ("total", "*", "*"): (5, 72.0),
}


def _report(ledger_url, capsys, fmt, *extra):
    argv = ["billing", "report", "--tenant", "acme", "--from", "2026-11-29", "--to", "2026-11-30"]
    assert main([*argv, "--format", fmt, "--ledger", ledger_url, "--gpu-price", "H200=3.6", *extra]) == 0
    return capsys.readouterr().out


def test_report_totals_per_day_and_model_in_every_format(ledger_url, tmp_path, capsys):
    _record(ledger_url, tmp_path, REPORT_EVENTS + REPORT_EVENTS[:2])  # the repeats are redeliveries
    capsys.readouterr()

    report = json.loads(_report(ledger_url, capsys, "json"))
    assert report["tenant"] == "acme" and report["price_per_gpu_hour"] == 3.6
    rows = {(r["scope"], r["day"], r["model"]): r for r in report["rows"]}
    assert {k: (r["requests"], r["billed_gpu_s"]) for k, r in rows.items()} == EXPECTED
    assert rows[("total", "*", "*")]["cost_usd"] == pytest.approx(72.0 / 3600 * 3.6)
    assert rows[("line", "2026-11-30", SMALL)]["platform_load_s"] == pytest.approx(8.1)

    table = list(csv.DictReader(io.StringIO(_report(ledger_url, capsys, "csv"))))
    assert {(r["scope"], r["day"], r["model"]): (int(r["requests"]), float(r["billed_gpu_s"])) for r in table} == (
        EXPECTED
    )

    text = _report(ledger_url, capsys, "table").splitlines()
    assert text[0].startswith("tenant acme, from 2026-11-29, to 2026-11-30")
    total = text[-1].split()
    assert total[:4] == ["total", "*", "*", "5"] and float(total[4]) == 72.0

    # the load rule re-runs over the same raw facts
    reruled = json.loads(_report(ledger_url, capsys, "json", "--charge-load-to", "request"))
    assert reruled["rows"][-1]["billed_gpu_s"] == pytest.approx(80.1)


def test_report_of_an_empty_period_is_a_zero_total(ledger_url, capsys):
    argv = ["billing", "report", "--tenant", "nobody", "--from", "2026-01-01", "--to", "2026-01-31"]
    assert main([*argv, "--format", "json", "--ledger", ledger_url]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [
        {
            "scope": "total",
            "day": "*",
            "model": "*",
            "requests": 0,
            "billed_gpu_s": 0.0,
            "load_charged_s": 0.0,
            "platform_load_s": 0.0,
            "cost_usd": 0.0,
        }
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--from", "2026-13-01", "--to", "2026-12-31"], "--from '2026-13-01' is not a date"),
        (["--from", "yesterday", "--to", "2026-12-31"], "--from 'yesterday' is not a date"),
        (["--from", "2026-12-02", "--to", "2026-12-01"], "is before --from"),
        (["--from", "2026-12-01", "--to", "2026-12-01", "--format", "xml"], "--format 'xml'"),
        (["--from", "2026-12-01", "--to", "2026-12-01", "--charge-load-to", "nobody"], "--charge-load-to"),
        (["--from", "2026-12-01", "--to", "2026-12-01", "--gpu", "TPU"], "no price for GPU 'TPU'"),
    ],
)
def test_bad_report_arguments_are_typed_errors(tmp_path, capsys, args, message):
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert main(["billing", "report", "--tenant", "acme", *args, "--ledger", ledger_url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error[invalid_config]: ") and message in err


def test_record_of_a_bad_file_is_a_typed_error(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(completed("ok")) + "\n{not json\n")
    ledger_url = f"sqlite:///{tmp_path / 'l.db'}"
    assert main(["billing", "record", str(path), "--ledger", ledger_url]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error[invalid_usage_event]: {path}:2: not JSON")
    assert "recorded 1 new event(s), 0 already" in captured.out  # lines before the bad one are kept
    path.write_text(json.dumps(completed("ok")) + "\n" + json.dumps({**completed("x"), "type": "io.example"}) + "\n")
    assert main(["billing", "record", str(path), "--ledger", ledger_url]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error[invalid_usage_event]: {path}:2: event type 'io.example'")
    assert "recorded 0 new event(s), 1 already" in captured.out
    assert main(["billing", "record", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_record_reads_a_stream_from_stdin(ledger_url, monkeypatch, capsys):
    lines = "".join(json.dumps(e) + "\n" for e in [completed("s1"), completed("s2"), completed("s1")])
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["billing", "record", "-", "--ledger", ledger_url]) == 0
    assert "recorded 2 new event(s), 1 already in the ledger" in capsys.readouterr().out
    # a whole event stream also carries requests: skipped on request, an error otherwise
    request = {"id": "q1", "source": "/cli", "type": "io.turboflow.video.t2v.requested", "data": {}}
    stream = json.dumps(request) + "\n" + json.dumps(completed("s3")) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(stream))
    assert main(["billing", "record", "--skip-other-types", "-", "--ledger", ledger_url]) == 0
    assert "recorded 1 new event(s), 0 already in the ledger" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(stream))
    assert main(["billing", "record", "-", "--ledger", ledger_url]) == 2
    assert "error[invalid_usage_event]: -:1: event type 'io.turboflow.video.t2v.requested'" in capsys.readouterr().err


# ---- the metering consumer: the broker's stream -> the ledger, signatures checked ---------------------------------
SIGNING_KEY = b"metering-test-key-0123456789"


def _signed_completed(request_id: str, gpu_seconds: float, *, key: bytes | None = SIGNING_KEY):
    from cloudevents.core.v1.event import CloudEvent

    from turboflow.eventing.contracts import completed_event

    request = CloudEvent(attributes={"type": "x", "source": "/producer", "id": request_id, "tenant": "acme"})
    data = completed(request_id, gpu_seconds=gpu_seconds)["data"]
    return completed_event(request, data, source="/turboflow/functions/t2v", signing_key=key)


def _cancelled(request_id: str, gpu_seconds: float):
    from turboflow.eventing.contracts import lifecycle_event
    from turboflow.eventing.types import CANCELLED

    ctx = {"request_id": request_id, "tenant": "acme", "kind": "t2v", "request_source": "/producer"}
    data = {"while": "running", "gpu_seconds": gpu_seconds, "cancelled_at": "2026-11-30T14:00:00Z"}
    return lifecycle_event(CANCELLED, ctx, data, source="/turboflow/functions/t2v", signing_key=SIGNING_KEY)


async def test_the_metering_consumer_stores_signed_facts_once_and_refuses_forged_ones(ledger_url):
    import nats

    from turboflow.billing.attribution import charges
    from turboflow.billing.consumer import LedgerConsumer
    from turboflow.eventing.jetstream import ensure_stream, publish_event
    from turboflow.eventing.natsserver import NatsServer

    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await ensure_stream(js)
        for event in (
            _signed_completed("r1", 10.0),
            _signed_completed("r2", 4.0),
            _cancelled("r3", 1.5),
            _signed_completed("forged", 9999.0, key=b"someone-elses-key-0123456"),  # signed with another key
            _signed_completed("unsigned", 9999.0, key=None),
        ):
            await publish_event(js, event)
        await nc.close()

        ledger = open_ledger(ledger_url)
        try:
            first = LedgerConsumer(server.url, ledger, signing_key=SIGNING_KEY, durable="billing-a")
            await first.connect()
            stats = await first.consume_available(timeout=0.5)
            await first.close()
            assert (stats.stored, stats.unsigned, stats.repeated) == (3, 2, 0)
            # a second consumer reading the whole stream again (a redelivery of everything) stores nothing new
            again = LedgerConsumer(server.url, ledger, signing_key=SIGNING_KEY, durable="billing-b")
            await again.connect()
            stats = await again.consume_available(timeout=0.5)
            await again.close()
            assert (stats.stored, stats.repeated) == (0, 3)
            assert ledger.count() == 3
            billed = sorted(c.billed_s for c in charges(ledger.facts(tenant="acme")))
            assert billed == [1.5, 4.0, 10.0]  # the cancelled request pays the device time it used
        finally:
            ledger.close()


# ---- monthly quotas ---------------------------------------------------------------------------------------------
def test_month_windows_roll_over_the_year():
    from datetime import UTC, datetime

    from turboflow.billing.quotas import month_window

    assert month_window(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert month_window(datetime(2026, 2, 1, tzinfo=UTC))[1] == datetime(2026, 3, 1, tzinfo=UTC)


def test_monthly_budgets_count_this_months_billed_seconds_only(ledger):
    from datetime import UTC, datetime

    from turboflow.billing.quotas import check_monthly

    ledger.record(completed("old", gpu_seconds=500.0, at="2026-10-31T23:59:59Z"))  # last month: not counted
    ledger.record(completed("a", gpu_seconds=30.0, at="2026-11-02T10:00:00Z"))
    ledger.record(completed("b", gpu_seconds=20.0, at="2026-11-20T10:00:00Z"))
    ledger.record(completed("c", gpu_seconds=99.0, tenant="other", at="2026-11-20T10:00:00Z"))
    now = datetime(2026, 11, 25, tzinfo=UTC)
    verdict = check_monthly(ledger, "acme", {"acme": 50.0, "*": 10.0}, now)
    assert verdict.used == 50.0 and verdict.exceeded and verdict.resets_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert verdict.seconds_until_reset(now) == 6 * 86400
    assert not check_monthly(ledger, "acme", {"acme": 50.01}, now).exceeded
    assert check_monthly(ledger, "newcomer", {"*": 10.0}, now).used == 0.0  # `*` covers unnamed tenants
    assert check_monthly(ledger, "acme", {"other": 1.0}, now) is None  # no budget: unlimited

"""The autoscaling cost simulator (turboflow.billing): closed-form queueing, Knative scale-to-zero rules, the
infra/ and bench/ inputs, the CSV trace reader and the CLI outputs."""

import dataclasses
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from turboflow.billing.erlang import ErlangC
from turboflow.billing.knative import load_scaling_config, with_settings
from turboflow.billing.profiles import ModelProfile, load_profiles
from turboflow.billing.report import metrics
from turboflow.billing.simulator import Simulation
from turboflow.billing.traces import Request, poisson
from turboflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SERVICE_S = 10.0
COLD_S = 50.0


def t2v_config(**settings):
    """The T2V service's KPA settings as the gpu overlay deploys them, with `settings` (--set keys) applied."""
    return with_settings(load_scaling_config(INFRA, "t2v"), {k: str(v) for k, v in settings.items()})


def fixed_profile(key="1.3b-480p"):
    return ModelProfile(key, SERVICE_S, distribution="fixed", fixed_cold_start_s=COLD_S)


def simulate(arrivals, config, duration_s=None):
    requests = [Request(t, "1.3b-480p") for t in arrivals]
    result = Simulation(
        requests, {"1.3b-480p": fixed_profile()}, {"1.3b-480p": config}, seed=0, duration_s=duration_s
    ).run()["1.3b-480p"]
    return result


@pytest.mark.parametrize("servers,utilization,seed", [(1, 0.5, 1), (2, 0.7, 2), (3, 0.8, 3)])
def test_fixed_replicas_match_erlang_c(servers, utilization, seed):
    """min = max = c always-warm replicas with exponential service times are an M/M/c queue."""
    service_rate = 1.0
    arrival_rate = utilization * servers * service_rate
    profile = ModelProfile("m", 1.0 / service_rate, distribution="exponential", fixed_cold_start_s=0.0)
    config = dataclasses.replace(t2v_config(), min_scale=servers, max_scale=servers)
    requests = poisson(arrival_rate, 200_000 / arrival_rate, {"m": 1.0}, random.Random(seed))
    result = Simulation(requests, {"m": profile}, {"m": config}, seed=seed).run()["m"]
    waits = [r.wait for r in result.requests]
    expected = ErlangC(servers, arrival_rate, service_rate)
    mean_wait = sum(waits) / len(waits)
    waited = sum(1 for w in waits if w > 0) / len(waits)
    assert mean_wait == pytest.approx(expected.mean_wait, rel=0.05)
    assert waited == pytest.approx(expected.probability_of_waiting, rel=0.05)
    assert len(result.pods) == servers and all(p.warm_start for p in result.pods)


def test_erlang_c_closed_form_known_value():
    # M/M/1: P(wait) = rho, Wq = rho / (mu - lambda)
    assert ErlangC(1, 0.5, 1.0).probability_of_waiting == pytest.approx(0.5)
    assert ErlangC(1, 0.5, 1.0).mean_wait == pytest.approx(1.0)
    # M/M/2 at a = 1.4: C = 0.5765 (textbook tables)
    assert ErlangC(2, 1.4, 1.0).probability_of_waiting == pytest.approx(0.57647, rel=1e-4)


def test_infra_settings_are_read_from_the_manifests():
    t2v, i2v = load_scaling_config(INFRA, "t2v"), load_scaling_config(INFRA, "i2v")
    assert (t2v.target_value, t2v.container_concurrency, t2v.min_scale, t2v.max_scale, t2v.initial_scale) == (
        1.0,
        1,
        0,
        4,
        0,
    )
    assert t2v.retention_s == 600 and t2v.target_burst_capacity == -1 and t2v.scale_to_zero_grace_s == 30
    assert i2v.max_scale == 2 and i2v.timeout_s == 900


def test_changing_infra_changes_the_simulated_settings(tmp_path):
    infra = tmp_path / "infra"
    shutil.copytree(INFRA, infra)
    shutil.copytree(ROOT / "eventing" / "manifests", tmp_path / "eventing" / "manifests")
    t2v = infra / "base" / "t2v.yaml"
    t2v.write_text(
        t2v.read_text()
        .replace('max-scale: "4"', 'max-scale: "7"')
        .replace('pod-retention-period: "10m"', 'pod-retention-period: "90s"')
    )
    config = load_scaling_config(infra, "t2v")
    assert (config.max_scale, config.retention_s) == (7, 90)


def test_first_request_after_idle_pays_the_cold_start():
    result = simulate([0.0, 5000.0], t2v_config())
    first, late = result.requests
    assert first.cold and first.latency == pytest.approx(COLD_S + SERVICE_S)
    # the pod went away 60 s stable window + 600 s retention after the first request: a new cold start
    assert late.cold and late.latency == pytest.approx(COLD_S + SERVICE_S)
    assert len(result.pods) == 2


def test_request_within_the_retention_period_finds_a_warm_pod():
    result = simulate([0.0, 400.0], t2v_config())  # 400 s < 60 s window + 600 s retention
    assert not result.requests[1].cold
    assert result.requests[1].latency == pytest.approx(SERVICE_S)
    assert len(result.pods) == 1


def test_without_retention_the_pod_goes_after_the_stable_window():
    result = simulate([0.0, 400.0], t2v_config(retention=0))
    assert result.requests[1].cold
    pod = result.pods[0]
    # ready at 50 s, busy until 60 s, then 60 s of zero concurrency (+ up to one 2 s tick) before scale to zero
    assert 60.0 + 60.0 <= pod.ended <= 60.0 + 60.0 + 2.0


def test_min_scale_keeps_a_pod_warm_and_costs_idle_gpu_hours():
    day = 86400.0
    arrivals = [3600.0 * h for h in range(1, 24, 3)]
    cold = simulate(arrivals, t2v_config(), duration_s=day)
    warm = simulate(arrivals, t2v_config(**{"min-scale": 1}), duration_s=day)
    assert all(r.cold for r in cold.requests)
    assert not any(r.cold for r in warm.requests)
    assert all(r.latency == pytest.approx(SERVICE_S) for r in warm.requests)
    cold_m = metrics([cold], slo_s=120, price_per_gpu_hour=3.5)
    warm_m = metrics([warm], slo_s=120, price_per_gpu_hour=3.5)
    assert warm_m.gpu_hours == pytest.approx(24.0)
    assert warm_m.gpu_hours - warm_m.busy_gpu_hours > cold_m.gpu_hours - cold_m.busy_gpu_hours
    assert cold_m.gpu_hours < 24.0 and warm_m.cost == pytest.approx(24.0 * 3.5)


def test_a_burst_from_zero_scales_to_max_scale():
    result = simulate([0.0] * 8 + [1.0] * 4, t2v_config())
    # the activator's poke starts one pod at once; the next 2 s tick sees 10 in flight and asks for max-scale 4
    assert sorted(p.created for p in result.pods) == [0.0, 2.0, 2.0, 2.0]
    # 12 requests on 4 pods: 3 rounds; the last one starts on a pod ready at 2 + 50 s
    assert max(r.start for r in result.requests) == pytest.approx(2.0 + COLD_S + 2 * SERVICE_S)


def test_service_times_and_cold_starts_come_from_the_bench(tmp_path):
    results = ROOT / "bench" / "results"
    profiles = load_profiles(results)
    assert {"1.3b-480p", "14b-720p", "i2v-a14b-720p"} <= set(profiles)

    def profile_from(*names):
        """The 1.3B profile read from a results folder holding only the named (committed) files."""
        folder = tmp_path / "-".join(names)
        folder.mkdir()
        for name in names:
            shutil.copy(results / name, folder)
        return load_profiles(folder)["1.3b-480p"]

    # the preferred variant (turbo) of the newest run that measured it: run 15 over run 10 (H200) over run 9 (H100)
    run9, run10, run15 = "h100-run9-issue7-all.json", "h200-run10-1.3b-pooling.json", "h200-request-run15.json"
    assert profile_from(run9).service_s == pytest.approx(3.448, abs=0.01)
    newer = profile_from(run9, run10)
    assert newer.service_s == pytest.approx(2.359, abs=0.01) and newer.source.startswith("h200-run10")
    newest = profile_from(run9, run10, run15)
    assert newest.service_s == pytest.approx(2.038, abs=0.01) and newest.source.startswith("h200-request-run15")
    assert profiles["1.3b-480p"].cold_starts
    rng = random.Random(0)
    assert min(profiles["1.3b-480p"].sample_cold_start(rng) for _ in range(50)) > 15.0
    assert profiles["i2v-a14b-720p"].mean_cold_start() > profiles["1.3b-480p"].mean_cold_start()


def test_simulation_is_deterministic_for_a_seed():
    def run():
        requests = poisson(0.05, 7200, {"1.3b-480p": 1.0}, random.Random(7))
        profiles = load_profiles(ROOT / "bench" / "results")
        result = Simulation(requests, profiles, {"1.3b-480p": t2v_config()}, seed=7).run()["1.3b-480p"]
        return [(r.start, r.end) for r in result.requests], len(result.pods)

    assert run() == run()


@pytest.mark.parametrize(
    "row,message",
    [
        ("abc,t2v,1.3b,480p", "line 3: arrival_s 'abc' is not a number"),
        ("-1,t2v,1.3b,480p", "line 3: arrival_s '-1' must be a finite number >= 0"),
        ("nan,t2v,1.3b,480p", "line 3: arrival_s 'nan' must be a finite number >= 0"),
        ("5,v2v,1.3b,480p", "line 3: task 'v2v' is not one of t2v, i2v"),
        ("5,t2v,1.3b,1080p", "line 3: resolution '1080p' is not one of 480p, 720p"),
        ("5,t2v,99b,480p", "line 3: no service time for t2v 99b 480p"),
        ("5,t2v,1.3b", "line 3: expected 4 fields"),
    ],
)
def test_csv_trace_rejects_bad_rows(tmp_path, capsys, row, message):
    trace = tmp_path / "trace.csv"
    trace.write_text(f"arrival_s,task,model,resolution\n0,t2v,1.3b,480p\n{row}\n")
    assert main(["simulate", "--trace", f"csv:{trace}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error[invalid_trace]: ") and message in err and "Traceback" not in err


def test_cli_reports_a_bad_trace_and_bad_settings_as_typed_errors(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,task,model,resolution\n1,t2v,1.3b,480p\n2,t2v,1.3b\n")
    cli = [sys.executable, "-m", "turboflow.cli", "simulate"]
    bad_row = subprocess.run([*cli, "--trace", f"csv:{trace}"], capture_output=True, text=True, timeout=120)
    assert bad_row.returncode == 2
    assert (
        bad_row.stderr.strip() == "error[invalid_trace]: line 3: expected 4 fields "
        "(arrival_s,task,model,resolution), got 3"
    )
    bad_header = tmp_path / "header.csv"
    bad_header.write_text("time,model\n1,1.3b\n")
    r = subprocess.run([*cli, "--trace", f"csv:{bad_header}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error[invalid_trace]: line 1: the header must be")
    for args, text in [
        (["--sweep", "retention=ten"], "error[invalid_config]: retention: duration 'ten'"),
        (["--set", "wobble=1"], "error[invalid_config]: unknown setting 'wobble'"),
        (["--rate", "fast"], "error[invalid_config]: rate 'fast'"),
        (["--set", "min-scale=5"], "error[invalid_config]: min-scale 5 is above max-scale 4"),
    ]:
        r = subprocess.run([*cli, "--duration", "1h", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith(text), r.stderr
        assert "Traceback" not in r.stderr


def test_sweep_writes_plots_summary_and_results(tmp_path, capsys):
    out = tmp_path / "sim"
    code = main(
        [
            "simulate",
            "--trace",
            "poisson",
            "--rate",
            "20/h",
            "--duration",
            "2h",
            "--seed",
            "3",
            "--model",
            "1.3b-480p=0.8,14b-720p=0.2",
            "--sweep",
            "retention=0,600",
            "--sweep",
            "min-scale=0,1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in ("sweep-retention.png", "sweep-min-scale.png", "sweep-cost-vs-p95.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "## Sweep" in summary and "| 600 | 1 |" in summary and "Cheapest setting meeting P95" in summary
    assert "![sweep-retention.png](sweep-retention.png)" in summary
    assert (out / "trace.csv").read_text().startswith("arrival_s,task,model,resolution\n")
    assert summary in capsys.readouterr().out
    # the trace it wrote replays to the same result
    again = tmp_path / "again"
    assert (
        main(
            [
                "simulate",
                "--trace",
                f"csv:{out / 'trace.csv'}",
                "--duration",
                "2h",
                "--seed",
                "3",
                "--set",
                "retention=0",
                "--set",
                "min-scale=0",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    first_rows = [line for line in summary.splitlines() if line.startswith("| **all**")]
    again_rows = [line for line in (again / "summary.md").read_text().splitlines() if line.startswith("| **all**")]
    assert first_rows == again_rows


# ---- the simulator against a short replay on the real dev stack ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(360)
async def test_the_queueing_model_matches_a_replay_on_the_dev_stack(tiny_t2v_dir, moto_s3, tmp_path):
    """6 Poisson arrivals (utilization ~0.6 of the one tiny-model function) through gateway -> broker -> function
    -> gateway; the service time fitted from the same run, simulated with one warm replica: mean latency within
    35 % (a sanity check of the queueing model, not a benchmark; numbers in docs/capacity-planning.md)."""
    import asyncio
    import time
    import uuid

    from turboflow.billing.validation import replay_check
    from turboflow.eventing.devstack import DevConfig
    from turboflow.eventing.types import COMPLETED
    from turboflow.gateway.client import GatewayClient
    from turboflow.gateway.devstack import GatewayDevStack

    fields = dict(prompt="a queue of tiny videos", resolution="480p", aspect_ratio="4:3", num_frames=1, num_steps=1)
    cfg = DevConfig(
        s3_endpoint=moto_s3,
        bucket=f"replay-{uuid.uuid4().hex[:8]}",
        kinds=("t2v",),
        models={"t2v": tiny_t2v_dir},
        log_dir=tmp_path / "dev",
    )
    async with GatewayDevStack(cfg) as dev:
        await dev.wait_ready(timeout=120)
        async with GatewayClient(dev.url, dev.api_key, timeout=60) as client:

            async def one(delay: float) -> tuple[str, float, float]:
                await asyncio.sleep(delay)
                sent = time.monotonic()
                video = await client.create("t2v", fields)
                final = await client.wait(video["id"])
                assert final["status"] == "completed", final
                return video["id"], sent, time.monotonic() - sent

            # the cold start and first-request warm-ups are not part of the replay (the model has no cold start)
            for _ in range(2):
                await one(0.0)
            warm = [f for f in dev.service.ledger.facts(tenant=dev.tenant) if f.type == COMPLETED]
            service = max(f.data["usage"]["gpu_seconds"] for f in warm if not f.data["usage"]["cold_start"])
            rng = random.Random(15)
            arrivals, t = [], 0.0
            for _ in range(6):  # the simulation replays these very arrivals and service times: 6 are enough
                t += rng.expovariate(0.6 / service)  # utilization ~0.6 of the device
                arrivals.append(t)
            runs = await asyncio.gather(*(one(a) for a in arrivals))
        by_id = {
            f.data["request_id"]: f.data for f in dev.service.ledger.facts(tenant=dev.tenant) if f.type == COMPLETED
        }
    ids, sent, latencies = zip(*runs)
    held = [by_id[i]["usage"]["gpu_seconds"] for i in ids]
    assert not any(by_id[i]["usage"]["cold_start"] for i in ids)
    waits = [by_id[i]["timings"]["queue_wait"] for i in ids]
    check = replay_check([s - min(sent) for s in sent], list(latencies), held, waits)
    print(
        f"replay: {check.requests} requests, service mean {check.service_mean_s:.3f} s cv {check.service_cv:.2f}, "
        f"fixed path {check.fixed_path_s:.3f} s, mean latency measured {check.measured_mean_s:.3f} s, "
        f"simulated {check.simulated_mean_s:.3f} s ({check.error * 100:+.1f} %)"
    )
    assert abs(check.error) < 0.35

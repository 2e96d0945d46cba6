"""One settings object per process (turboflow/settings.py): every variable in one table, typed, checked all at once,
documented from the table; the engine reads no environment variable; a bad value stops `turboflow serve` and keeps
a live function unready, saying which variable and why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from function_harness import LiveFunction

from turboflow import settings as settings_module
from turboflow.errors import ConfigError
from turboflow.settings import VARIABLES, Settings, render_docs

ROOT = Path(__file__).resolve().parents[1]
BY_NAME = {v.name: v for v in VARIABLES}
SOURCE_PACKAGES = ("engine", "storage", "eventing", "functions", "billing", "turboflow")
# a variable read: environ.get("X"), environ["X"] (not an assignment), getenv("X"), cfg.get("X"), env.get("X"),
# environ.setdefault("X")
_READ_PATTERNS = (
    r"""environ\.get\(\s*["']([A-Z][A-Z0-9_]+)["']""",
    r"""environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\](?!\s*=[^=])""",
    r"""getenv\(\s*["']([A-Z][A-Z0-9_]+)["']""",
    r"""\b(?:cfg|env)\.get\(\s*["']([A-Z][A-Z0-9_]+)["']""",
    r"""environ\.setdefault\(\s*["']([A-Z][A-Z0-9_]+)["']""",
)
_NOT_OURS = re.compile(r"PYTHON[A-Z]*|PIP_[A-Z_]+")  # the image's Python interpreter and pip, at build time


def _python_sources():
    for package in SOURCE_PACKAGES:
        yield from (p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _names_read_in_python() -> dict[str, str]:
    found = {}
    for path in _python_sources():
        text = path.read_text()
        for pattern in _READ_PATTERNS:
            for name in re.findall(pattern, text):
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def _names_in_deployment_files() -> dict[str, str]:
    found = {}
    for path in [*(ROOT / "infra").rglob("*.yaml"), *(ROOT / "functions").rglob("func.yaml")]:
        for name in re.findall(r"^\s*-\s*name:\s*([A-Z][A-Z0-9_]+)\s*$", path.read_text(), re.M):
            found.setdefault(name, str(path.relative_to(ROOT)))
    containerfile = ROOT / "infra" / "Containerfile"
    env_block = re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", containerfile.read_text(), re.M)
    for block in env_block:
        for name in re.findall(r"\b([A-Z][A-Z0-9_]+)=", block):
            found.setdefault(name, "infra/Containerfile")
    return found


# ---- the table --------------------------------------------------------------------------------------------------
def test_defaults_and_typed_values():
    assert Settings.from_env({}) == Settings()
    s = Settings.from_env(
        {
            "TURBOFLOW_MAX_QUEUE": " 0 ",
            "TURBOFLOW_MODEL_ALIASES": "Wan, tiny ,",
            "TURBOFLOW_LOAD_RETRY_SECONDS": "0.5",
            "TURBOFLOW_EVENT_SIGNING_KEY": "k" * 16,
            "TURBOFLOW_INPUT_BUCKETS": "a-bucket,b-bucket",
            "TURBOFLOW_SHARED_IMAGE_PREFIXES": "a-bucket/shared/styles",
            "TURBOFLOW_URL_EXPIRY_SECONDS": "3600",
            "TURBOFLOW_MAX_INLINE_IMAGE_BYTES": "",  # empty = not set
            "UNRELATED": "ignored",
        }
    )
    assert s.max_queue == 0 and s.model_aliases == {"wan", "tiny"} and s.load_retry_seconds == 0.5
    assert s.event_signing_key == b"k" * 16 and "k" * 16 not in repr(s)
    assert s.input_buckets == ("a-bucket", "b-bucket") and s.shared_image_prefixes == (("a-bucket", "shared/styles/"),)
    assert s.url_expiry_seconds == 3600 and s.max_inline_image_bytes == Settings().max_inline_image_bytes
    with pytest.raises(AttributeError):
        s.max_queue = 3  # frozen


@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("TURBOFLOW_MAX_QUEUE", "two", "expected a whole number >= 0, got 'two'"),
        ("TURBOFLOW_MAX_QUEUE", "-1", "expected a whole number >= 0, got '-1'"),
        ("TURBOFLOW_URL_EXPIRY_SECONDS", "1d", "expected a whole number in 1..604800, got '1d'"),
        ("TURBOFLOW_URL_EXPIRY_SECONDS", "9999999", "expected a whole number in 1..604800, got 9999999"),
        ("TURBOFLOW_LOAD_RETRY_SECONDS", "soon", "expected a number of seconds > 0, got 'soon'"),
        ("TURBOFLOW_EVENT_SIGNING_KEY", "short", "must be at least 16 bytes of secret"),
        ("TURBOFLOW_BUCKET", "Bad_Bucket", "'Bad_Bucket' is not a valid bucket name"),
        ("TURBOFLOW_STORE", "nfs", "expected one of s3, local, got 'nfs'"),
        ("TURBOFLOW_FAST_VAE", "maybe", "expected 1 or 0"),
    ],
)
def test_a_bad_value_is_a_config_error_starting_with_the_variable(name, value, reason):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert info.value.code == "invalid_config" and info.value.field == name
    assert info.value.message.startswith(f"{name}: {reason}")


def test_every_bad_variable_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        Settings.from_env(
            {"TURBOFLOW_MAX_QUEUE": "two", "TURBOFLOW_URL_EXPIRY_SECONDS": "1d", "TURBOFLOW_STORE": "local"}
        )
    message = info.value.message
    assert message.startswith("TURBOFLOW_MAX_QUEUE: ")
    assert "; TURBOFLOW_URL_EXPIRY_SECONDS: " in message and "; TURBOFLOW_LOCAL_STORE_DIR: required" in message


def test_table_and_settings_fields_match():
    fields = {f for f in Settings.__dataclass_fields__}
    mapped = [v.field for v in VARIABLES if v.field]
    assert len(mapped) == len(set(mapped)) and set(mapped) == fields
    assert len(BY_NAME) == len(VARIABLES) and all(v.group in settings_module.GROUPS for v in VARIABLES)


def test_choice_lists_and_limits_exist_once():
    """The engine and eventing use the settings' lists and defaults, or equal ones (checked here)."""
    from turboflow.engine import options, request
    from turboflow.eventing.event_schemas import DEFAULT_MAX_INLINE_IMAGE_BYTES

    assert options.COMPILE_MODES is settings_module.COMPILE_MODES
    assert options.OFFLOAD_POLICIES is settings_module.OFFLOAD_POLICIES
    assert tuple(request.QUANT_LINEAR_MODES) == settings_module.QUANT_LINEAR_MODES
    assert request.MAX_FRAMES == settings_module.MAX_WARMUP_FRAMES
    assert Settings().max_inline_image_bytes == DEFAULT_MAX_INLINE_IMAGE_BYTES


# ---- docs and completeness --------------------------------------------------------------------------------------
def test_the_docs_table_is_generated_from_the_settings():
    doc = (ROOT / "docs" / "functions.md").read_text()
    assert render_docs(doc) == doc, "docs/functions.md is stale: run `python -m turboflow.settings --write-docs`"
    for var in VARIABLES:
        assert f"| `{var.name}` |" in doc


def test_every_variable_read_anywhere_is_in_the_table():
    read = {**_names_in_deployment_files(), **_names_read_in_python()}
    assert {"NATS_SERVER_BIN", "K_SINK", "MODEL_DIR", "HF_HUB_OFFLINE"} <= read.keys()  # the scan finds reads
    missing = {name: where for name, where in read.items() if name not in BY_NAME and not _NOT_OURS.fullmatch(name)}
    assert not missing, f"variables read but not in turboflow/settings.py: {missing}"


def test_the_engine_reads_no_environment_variable():
    reads = re.compile(r"os\.getenv|environ\.get|environ\.setdefault|environ\[[^\]]+\](?!\s*=[^=])|environ\.copy")
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if reads.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
    # and importing the engine changes no environment variable (e.g. HF_HUB_OFFLINE used to be set at import)
    code = "import os; before = dict(os.environ); import turboflow.engine.loading; print(dict(os.environ) == before)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_no_torch_in_functions():
    for path in (ROOT / "functions").rglob("*.py"):
        assert not re.search(r"^\s*(import torch|from torch)|torch\.", path.read_text(), re.M), path


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in BY_NAME or k in ("HOME", "PATH")}
    return {**env, **extra}


# ---- a new user's mistakes, through the real entry points -------------------------------------------------------
@pytest.mark.parametrize(
    "name, value",
    [("TURBOFLOW_MAX_QUEUE", "two"), ("TURBOFLOW_URL_EXPIRY_SECONDS", "1d")],
)
def test_turboflow_serve_with_a_bad_value_exits_naming_it(tiny_t2v_dir, name, value):
    proc = subprocess.run(
        [sys.executable, "-m", "turboflow.cli", "serve", "t2v", "--model", str(tiny_t2v_dir), "--port", "1"],
        env=_clean_env(TURBOFLOW_BUCKET="tf-videos", **{name: value}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error[invalid_config]: {name}: expected a whole number" in proc.stderr
    assert "Traceback" not in proc.stderr and "Lifespan" not in proc.stderr


@pytest.mark.parametrize(
    "name, value",
    [("TURBOFLOW_MAX_QUEUE", "two"), ("TURBOFLOW_URL_EXPIRY_SECONDS", "1d")],
)
def test_a_live_function_with_a_bad_value_is_never_ready_and_says_why(tiny_t2v_dir, name, value):
    live = LiveFunction(
        "t2v", {"MODEL_DIR": str(tiny_t2v_dir), "TURBOFLOW_BUCKET": "tf-videos", "TURBOFLOW_DEVICE": "cpu", name: value}
    )
    try:
        r = live.client.get("/health/readiness")
        assert r.status_code == 500 and r.text.startswith(f"not ready: invalid_config: {name}: "), r.text
        assert live.client.get("/health/liveness").status_code == 200
    finally:
        live.close()

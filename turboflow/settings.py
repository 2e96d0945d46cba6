"""Every environment variable turboflow reads, in one table, and the one typed `Settings` object built from it.

A process builds `Settings` once (`Settings.from_env(os.environ)` or from func-python's `cfg`) and hands typed
values down: the engine and storage read no variable themselves (eventing's local tools read a few of their own,
e.g. K_SINK, TURBOFLOW_DEV_STATE, NATS_SERVER_BIN, all in this table). Each `Variable` names its parser, its
`Settings` field (whose dataclass default is the one default), a one-line doc and a group; `docs/functions.md`'s
variable table is rendered from this table (`python -m turboflow.settings --write-docs`, checked by a test).

Bad values never pass silently: `Settings.from_env` checks every variable and raises one `ConfigError`
(`invalid_config`) listing all of them, each as `VARIABLE: what is wrong`, e.g.
`TURBOFLOW_MAX_QUEUE: expected a whole number >= 0, got 'two'`. An empty value means "not set" (the default).

This module sits just above `turboflow.errors` in the package stack: standard library only, so every layer can
import it. Choice lists that are deployment knobs (quantisation modes, offload policies, compile modes) live here
once and the engine imports them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from turboflow.errors import ConfigError

TASKS = ("t2v", "i2v")
QUANT_LINEAR_MODES = ("fp8", "int8", "int8_weight_only")  # engine/linear.py
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # inductor's
AOT_COMPILE = "aot"  # AOTInductor packages of the DiT blocks, built ahead of time (engine/aot_blocks.py)
OFFLOAD_POLICIES = ("auto", "none", "experts")
SLA_BACKENDS = ("auto", "triton", "flex", "gather")  # engine/sla.py: SLA's sparse-branch kernels
# engine/vae_decode.py DecodeVariant's tokens (a test keeps the two lists equal)
VAE_DECODE_TOKENS = ("conv2d", "conv2d_shifted", "upsample", "subpixel", "compile_norm", "compile_block", "graph")
STORES = ("s3", "local")
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit on a presigned URL
MIN_SIGNING_KEY_BYTES = 16
MAX_WARMUP_FRAMES = 241  # engine/request.py MAX_FRAMES; the engine checks sizes against its own table again
GROUPS = {
    "function": "the video functions",
    "storage": "output store and I2V images",
    "engine": "model loading and speed",
    "gateway": "the gateway (front door, request state, webhooks, console)",
    "tools": "command-line tools and the local dev stack (read as defaults of their flags)",
    "external": "read by libraries (boto3, huggingface_hub, torch) or the container, listed so none is a surprise",
}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SEGMENT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_SHARED_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,254}")


# ---- parsers: raw text -> typed value; ValueError(reason) names what is wrong ------------------------------------
def text(raw: str) -> str:
    return raw


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A whole number in [minimum, maximum]."""
    wanted = f"a whole number >= {minimum}" if maximum is None else f"a whole number in {minimum}..{maximum}"

    def parse(raw: str) -> int:
        if not re.fullmatch(r"[0-9]+", raw):
            raise ValueError(f"expected {wanted}, got {raw!r}")
        value = int(raw)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"expected {wanted}, got {value}")
        return value

    return parse


def positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"expected a number of seconds > 0, got {raw!r}")
    return value


def flag(raw: str) -> bool:
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected 1 or 0 (true/false, yes/no, on/off), got {raw!r}")


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def quant_mode(raw: str) -> str | None:
    value = raw.lower()
    if value in ("none", "off"):
        return None
    return choice(*QUANT_LINEAR_MODES)(value)


def compile_mode(raw: str) -> bool | str:
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value in (*COMPILE_MODES, AOT_COMPILE):
        return value
    raise ValueError(f"expected 0, 1, {AOT_COMPILE} or one of {', '.join(COMPILE_MODES)}, got {raw!r}")


def vae_decode_spec(raw: str) -> str:
    """`auto`, `base`, or DecodeVariant tokens joined by `+` (each at most once)."""
    value = raw.lower()
    if value in ("auto", "base"):
        return value
    tokens = value.split("+")
    unknown = [t for t in tokens if t not in VAE_DECODE_TOKENS]
    if unknown or len(set(tokens)) != len(tokens):
        raise ValueError(f"expected auto, base or tokens of {', '.join(VAE_DECODE_TOKENS)} joined by '+', got {raw!r}")
    return value


def warmup_sizes(raw: str) -> tuple[tuple[str, str, int], ...]:
    """'480p:16:9:81,720p:9:16:49' -> (('480p', '16:9', 81), ('720p', '9:16', 49)); frames = 4k+1."""
    sizes = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if (
            len(parts) != 4
            or not all(p.isdigit() for p in parts[1:])
            or (int(parts[3]) - 1) % 4
            or not 1 <= int(parts[3]) <= MAX_WARMUP_FRAMES
        ):
            raise ValueError(
                f"{item!r} is not RESOLUTION:W:H:FRAMES with 4k+1 frames up to {MAX_WARMUP_FRAMES} (e.g. 480p:16:9:81)"
            )
        sizes.append((parts[0], f"{parts[1]}:{parts[2]}", int(parts[3])))
    return tuple(sizes)


def names(raw: str) -> frozenset[str]:
    """Comma list of names, compared case-insensitively."""
    return frozenset(a.strip().lower() for a in raw.split(",") if a.strip())


def bucket(raw: str) -> str:
    if not _BUCKET_RE.fullmatch(raw):
        raise ValueError(f"{raw!r} is not a valid bucket name")
    return raw


def buckets(raw: str) -> tuple[str, ...]:
    return tuple(bucket(b.strip()) for b in raw.split(",") if b.strip())


def key_prefix(raw: str) -> str:
    """1-4 key segments [a-z0-9][a-z0-9_-]*, no slashes at either end."""
    prefix = raw.strip("/")
    for seg in prefix.split("/"):
        if not _SEGMENT_RE.fullmatch(seg):
            raise ValueError(f"{prefix!r}: segment {seg!r} is not [a-z0-9][a-z0-9_-]*")
    return prefix


def shared_prefixes(raw: str) -> tuple[tuple[str, str], ...]:
    """Comma list of `bucket/prefix/` -> ((bucket, 'prefix/'), ...): whole prefixes, no '.', '..' or empty segments."""
    out = []
    for item in (v.strip() for v in raw.split(",")):
        if not item:
            continue
        name, _, prefix = item.partition("/")
        segs = prefix.strip("/").split("/")
        if (
            not _BUCKET_RE.fullmatch(name)
            or not prefix.strip("/")
            or not all(_SHARED_SEGMENT_RE.fullmatch(seg) for seg in segs)
        ):
            raise ValueError(f"entry {item!r} is not bucket/prefix/ (a whole prefix; no '.', '..' or empty segments)")
        out.append((name, "/".join(segs) + "/"))
    return tuple(out)


def http_url(raw: str) -> str:
    """An absolute http(s) URL (no credentials in it: they would end up in logs)."""
    from urllib.parse import urlsplit

    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {raw!r}")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (user:password@)")
    return raw


def nats_url(raw: str) -> str:
    """A NATS server URL (nats://, tls://, ws:// or wss://); a comma list of servers is allowed."""
    for item in (x.strip() for x in raw.split(",")):
        if not re.fullmatch(r"(nats|tls|ws|wss)://[^\s/]+/?", item):
            raise ValueError(f"expected nats://HOST:PORT (or tls://, ws://, wss://), got {item!r}")
    return raw


def duration_seconds(raw: str) -> float:
    """`30d`, `12h`, `90m`, `45s` or plain seconds -> seconds (> 0)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", raw.strip().lower())
    if not match:
        raise ValueError(f"expected a duration like 30d, 12h, 90m, 45s, got {raw!r}")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if value <= 0:
        raise ValueError(f"expected a duration > 0, got {raw!r}")
    return value


def webhook_secret(raw: str) -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of at least 24 random bytes."""
    import base64
    import binascii

    body = raw.removeprefix("whsec_")
    try:
        decoded = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("expected whsec_<base64>, e.g. from `turboflow keys webhook-secret`") from None
    if len(decoded) < 24:
        raise ValueError("must hold at least 24 bytes of secret (base64 after whsec_)")
    return raw


def tenant_budgets(raw: str) -> tuple[tuple[str, float], ...]:
    """'acme=36000,*=3600' -> (('acme', 36000.0), ('*', 3600.0)): GPU-seconds per tenant (`*`: the others)."""
    out = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        tenant, _, amount = item.partition("=")
        tenant = tenant.strip()
        if tenant != "*" and not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", tenant):
            raise ValueError(f"entry {item!r}: {tenant!r} is neither a tenant (a DNS label) nor *")
        try:
            seconds = float(amount)
        except ValueError:
            seconds = float("nan")
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError(f"entry {item!r}: expected TENANT=SECONDS with SECONDS >= 0")
        out.append((tenant, seconds))
    return tuple(out)


def signing_key(raw: str) -> bytes:
    key = raw.encode("utf-8")
    if len(key) < MIN_SIGNING_KEY_BYTES:
        raise ValueError(f"must be at least {MIN_SIGNING_KEY_BYTES} bytes of secret")
    return key


# ---- the table ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variable:
    name: str
    group: str
    doc: str
    parse: Callable[[str], Any] = text
    field: str | None = None  # the Settings attribute; None: read by a tool or a library, listed for completeness
    shown_default: str | None = None  # the docs' "default" column where the field default does not say it


@dataclass(frozen=True)
class Settings:
    """The process's configuration, typed and checked. Built once (`from_env`); frozen."""

    # function
    task: str | None = None
    model_dir: str | None = None
    device: str | None = None
    event_source: str | None = None
    max_queue: int = 2
    max_inline_image_bytes: int = 512 << 10  # eventing/event_schemas.py DEFAULT_MAX_INLINE_IMAGE_BYTES
    model_aliases: frozenset[str] = frozenset()
    load_retry_seconds: float = 15.0
    event_signing_key: bytes | None = field(default=None, repr=False)
    # storage
    store: str = "s3"
    local_store_dir: str | None = None
    local_store_url: str | None = None
    bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    aws_region: str | None = None
    aws_default_region: str | None = None
    output_prefix: str = "videos"
    input_buckets: tuple[str, ...] = ()
    image_prefix: str = "uploads"
    shared_image_prefixes: tuple[tuple[str, str], ...] = ()
    url_expiry_seconds: int = 86400
    multipart_threshold_bytes: int = 64 << 20
    multipart_chunk_bytes: int = 16 << 20
    max_image_bytes: int = 20 << 20
    # engine
    quant_linear: str | None = None
    compile: bool | str = False
    compile_cache: str | None = None
    compile_warmup: tuple[tuple[str, str, int], ...] | None = None
    compile_require_artifacts: bool = False
    compile_save_artifacts: bool = True
    fast_vae: bool = True
    vae_chunk: int | None = None
    vae_decode: str = "auto"
    prompt_cache: int = 32
    sla_backend: str = "auto"
    offload: str = "auto"
    load_threads: int | None = None
    warmup: bool = True
    gpus: int = 1
    collective_timeout_seconds: float = 300.0
    gpu_type: str | None = None
    # -- events and request state (functions and gateway)
    sink_url: str | None = None
    nats_url: str | None = None
    pod_name: str | None = None
    # -- gateway
    gateway_database_url: str | None = None
    gateway_public_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_allow_private: bool = False
    tenant_max_active: int = 8
    tenant_monthly_gpu_seconds: tuple[tuple[str, float], ...] = ()
    request_retention_seconds: float = 30 * 86400.0
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Parse every variable of the table present in `env`; one ConfigError naming all the bad ones."""
        values: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        for var in VARIABLES:
            raw = env.get(var.name)
            if var.field is None or raw is None or not str(raw).strip():
                continue
            try:
                values[var.field] = var.parse(str(raw).strip())
            except ValueError as e:
                problems.append((var.name, str(e)))
        problems += _cross_checks(values)
        if problems:
            raise ConfigError("; ".join(f"{name}: {reason}" for name, reason in problems), field=problems[0][0])
        return cls(**values)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def _cross_checks(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    if values.get("compile_warmup") and not values.get("compile"):
        problems.append(
            (
                "TURBOFLOW_COMPILE_WARMUP",
                "set but TURBOFLOW_COMPILE is off: nothing would be compiled (set TURBOFLOW_COMPILE=1 or drop the "
                "warm-up sizes)",
            )
        )
    if values.get("store") == "local" and not values.get("local_store_dir"):
        problems.append(("TURBOFLOW_LOCAL_STORE_DIR", "required when TURBOFLOW_STORE=local"))
    return problems


def _v(name, group, doc, parse=text, field=None, shown_default=None) -> Variable:
    return Variable(name, group, doc, parse, field, shown_default)


VARIABLES: tuple[Variable, ...] = (
    # -- function
    _v("MODEL_DIR", "function", "model cache directory (the PVC mount)", field="model_dir", shown_default="(required)"),
    _v(
        "TURBOFLOW_TASK",
        "function",
        "which function this process serves (`t2v` or `i2v`) where the entry point does not say it",
        choice(*TASKS),
        "task",
    ),
    _v(
        "TURBOFLOW_DEVICE",
        "function",
        "torch device, e.g. `cuda:0`, `cpu`",
        field="device",
        shown_default="cuda if available",
    ),
    _v(
        "TURBOFLOW_MAX_QUEUE",
        "function",
        "requests allowed to wait behind the running one (beyond: 503 `device_busy`)",
        whole(0),
        "max_queue",
    ),
    _v(
        "TURBOFLOW_MAX_INLINE_IMAGE_BYTES",
        "function",
        "cap on an inline base64 image (events must stay under JetStream's 1 MB)",
        whole(1),
        "max_inline_image_bytes",
        "512 KiB",
    ),
    _v(
        "TURBOFLOW_MODEL_ALIASES",
        "function",
        "comma list of extra names the request's `model` may use (the manifest name always works)",
        names,
        "model_aliases",
        "",
    ),
    _v(
        "TURBOFLOW_EVENT_SOURCE",
        "function",
        "`source` of reply events",
        field="event_source",
        shown_default="`/turboflow/functions/<kind>`",
    ),
    _v(
        "TURBOFLOW_LOAD_RETRY_SECONDS",
        "function",
        "retry period while the model cache is incomplete",
        positive_seconds,
        "load_retry_seconds",
        "15",
    ),
    _v(
        "TURBOFLOW_EVENT_SIGNING_KEY",
        "function",
        f"secret (>= {MIN_SIGNING_KEY_BYTES} bytes) that signs replies "
        "(`turboflowsig`) and derives their ids; an unusable value keeps the pod unready",
        signing_key,
        "event_signing_key",
        "(none)",
    ),
    # -- storage
    _v(
        "TURBOFLOW_STORE",
        "storage",
        "where videos go: `s3`, or `local` (a directory: a workstation or an NFS volume)",
        choice(*STORES),
        "store",
    ),
    _v(
        "TURBOFLOW_LOCAL_STORE_DIR",
        "storage",
        "root directory of the `local` store",
        field="local_store_dir",
        shown_default="(required for local)",
    ),
    _v(
        "TURBOFLOW_LOCAL_STORE_URL",
        "storage",
        "HTTP base URL that serves the local store directory (video URLs become base + key)",
        field="local_store_url",
        shown_default="`file://` URIs",
    ),
    _v("TURBOFLOW_BUCKET", "storage", "output bucket", bucket, "bucket", "(required for s3)"),
    _v(
        "S3_ENDPOINT_URL", "storage", "S3 API endpoint (MinIO, Ceph, ...)", field="s3_endpoint_url", shown_default="AWS"
    ),
    _v(
        "S3_PUBLIC_ENDPOINT_URL",
        "storage",
        "host used in presigned URLs (when clients reach S3 by another name)",
        field="s3_public_endpoint_url",
        shown_default="the endpoint",
    ),
    _v("AWS_REGION", "storage", "S3 region", field="aws_region", shown_default="us-east-1"),
    _v("AWS_DEFAULT_REGION", "storage", "S3 region when `AWS_REGION` is unset", field="aws_default_region"),
    _v("TURBOFLOW_OUTPUT_PREFIX", "storage", "first key segment(s) of every video", key_prefix, "output_prefix"),
    _v(
        "TURBOFLOW_INPUT_BUCKETS",
        "storage",
        "comma list of buckets I2V images may be read from",
        buckets,
        "input_buckets",
        "the output bucket",
    ),
    _v(
        "TURBOFLOW_IMAGE_PREFIX",
        "storage",
        "I2V images of tenant T must be under `<input bucket>/<prefix>/T/` "
        "(also where the S3 source looks for uploads)",
        key_prefix,
        "image_prefix",
    ),
    _v(
        "TURBOFLOW_SHARED_IMAGE_PREFIXES",
        "storage",
        "comma list of `bucket/prefix/` every tenant may read images from",
        shared_prefixes,
        "shared_image_prefixes",
        "(none)",
    ),
    _v(
        "TURBOFLOW_URL_EXPIRY_SECONDS",
        "storage",
        "presigned URL lifetime (at most 7 days)",
        whole(1, MAX_PRESIGN_SECONDS),
        "url_expiry_seconds",
    ),
    _v(
        "TURBOFLOW_MULTIPART_THRESHOLD_BYTES",
        "storage",
        "multipart upload above this size",
        whole(1),
        "multipart_threshold_bytes",
        "64 MiB",
    ),
    _v(
        "TURBOFLOW_MULTIPART_CHUNK_BYTES",
        "storage",
        "multipart part size",
        whole(5 << 20),
        "multipart_chunk_bytes",
        "16 MiB",
    ),
    _v("TURBOFLOW_MAX_IMAGE_BYTES", "storage", "cap on an `s3://` image", whole(1), "max_image_bytes", "20 MiB"),
    _v("AWS_ACCESS_KEY_ID", "external", "S3 credentials (boto3's chain)", shown_default="boto3 chain"),
    _v("AWS_SECRET_ACCESS_KEY", "external", "S3 credentials (boto3's chain)", shown_default="boto3 chain"),
    _v("AWS_SESSION_TOKEN", "external", "S3 credentials (boto3's chain)", shown_default="boto3 chain"),
    # -- engine
    _v(
        "TURBOFLOW_QUANT_LINEAR",
        "engine",
        "DiT linears: `fp8` (W8A8, H100/H200/Ada), `int8` (W8A8), "
        "`int8_weight_only` (TurboDiffusion's `-quant` format, half the memory), or `none`",
        quant_mode,
        "quant_linear",
        "none",
    ),
    _v(
        "TURBOFLOW_COMPILE",
        "engine",
        "`1` or an inductor mode: torch.compile the DiT blocks (the warm-up sizes are "
        "compiled before the pod reports ready); `aot`: AOTInductor packages of the blocks built ahead of time "
        "(`turboflow model compile-artifacts --compile aot`), loaded at start with no trace or compile",
        compile_mode,
        "compile",
        "0",
    ),
    _v(
        "TURBOFLOW_COMPILE_CACHE",
        "engine",
        "Inductor/Triton cache directory; a persistent writable volume lets a scaled-from-zero pod reuse the kernels",
        field="compile_cache",
        shown_default="`<MODEL_DIR>/.compile-cache` if writable, else `~/.cache/turboflow/compile`",
    ),
    _v(
        "TURBOFLOW_COMPILE_WARMUP",
        "engine",
        "comma list `RESOLUTION:W:H:FRAMES` compiled at start (other sizes "
        "compile on first use); needs `TURBOFLOW_COMPILE`",
        warmup_sizes,
        "compile_warmup",
        "`<model resolution>:16:9:81`",
    ),
    _v(
        "TURBOFLOW_COMPILE_REQUIRE_ARTIFACTS",
        "engine",
        "never compile during start: without a matching compile artifact (`turboflow model compile-artifacts`) the "
        "DiT runs eager, with a warning",
        flag,
        "compile_require_artifacts",
    ),
    _v(
        "TURBOFLOW_COMPILE_SAVE_ARTIFACTS",
        "engine",
        "after a start that compiled, save the compile artifact beside the weights for the next pods",
        flag,
        "compile_save_artifacts",
    ),
    _v(
        "TURBOFLOW_FAST_VAE",
        "engine",
        "chunked VAE decode (same output up to rounding); `0` = diffusers' decode",
        flag,
        "fast_vae",
        "1",
    ),
    _v(
        "TURBOFLOW_VAE_CHUNK",
        "engine",
        "latent frames per decoder call (memory vs speed)",
        whole(1),
        "vae_chunk",
        "by frame size",
    ),
    _v(
        "TURBOFLOW_VAE_DECODE",
        "engine",
        "how the fast VAE decode runs: `auto` = `compile_block+upsample` on CUDA when the DiT is compiled, "
        "`subpixel` on CUDA otherwise, `base` on the CPU; or tokens of engine/vae_decode.py joined by `+` "
        "(all compute the same function)",
        vae_decode_spec,
        "vae_decode",
    ),
    _v(
        "TURBOFLOW_PROMPT_CACHE",
        "engine",
        "text embeddings kept per prompt on the device (about 4 MB each for Wan's umT5); `0` = none",
        whole(0, 4096),
        "prompt_cache",
        "32",
    ),
    _v(
        "TURBOFLOW_SLA_BACKEND",
        "engine",
        "SLA's sparse attention kernels: `auto` = Triton on CUDA (else FlexAttention, else gather); `flex` or "
        "`gather` leave the Triton kernels out",
        choice(*SLA_BACKENDS),
        "sla_backend",
    ),
    _v(
        "TURBOFLOW_OFFLOAD",
        "engine",
        "I2V: `none` keeps both experts on the GPU, `experts` parks the idle one in "
        "pinned host memory, `auto` decides from free memory",
        choice(*OFFLOAD_POLICIES),
        "offload",
    ),
    _v(
        "TURBOFLOW_LOAD_THREADS",
        "engine",
        "threads reading safetensors at load",
        whole(1),
        "load_threads",
        "CPU count, 2..16",
    ),
    _v(
        "TURBOFLOW_WARMUP",
        "engine",
        "one tiny generation on CUDA before ready (first-request kernels)",
        flag,
        "warmup",
        "1",
    ),
    _v(
        "TURBOFLOW_GPUS",
        "engine",
        "GPUs one request runs across (context parallelism, one worker process per extra GPU; 1: one GPU)",
        whole(1, 8),
        "gpus",
    ),
    _v(
        "TURBOFLOW_COLLECTIVE_TIMEOUT_SECONDS",
        "engine",
        "with TURBOFLOW_GPUS > 1: a collective (a worker) slower than this takes the pod to not-ready",
        positive_seconds,
        "collective_timeout_seconds",
        "300",
    ),
    _v(
        "TURBOFLOW_GPU_TYPE",
        "function",
        "the GPU type named in usage and pod events (the price table's key, e.g. H200)",
        field="gpu_type",
        shown_default="from the device name",
    ),
    _v(
        "HOSTNAME",
        "function",
        "the pod's name, reported in `started` events (Kubernetes sets it)",
        field="pod_name",
        shown_default="the host name",
    ),
    # -- gateway
    _v(
        "TURBOFLOW_GATEWAY_DATABASE_URL",
        "gateway",
        "SQLAlchemy URL of the gateway's API keys and usage ledger (`sqlite:///PATH` or "
        "`postgresql+psycopg://USER@HOST/DB`)",
        field="gateway_database_url",
        shown_default="`sqlite:///~/.cache/turboflow/gateway.db`",
    ),
    _v(
        "TURBOFLOW_GATEWAY_PUBLIC_URL",
        "gateway",
        "base URL of the gateway as clients reach it (links in responses)",
        http_url,
        "gateway_public_url",
        "the request's own base URL",
    ),
    _v(
        "TURBOFLOW_WEBHOOK_SECRET",
        "gateway",
        "Standard Webhooks signing secret (`whsec_<base64>`) for webhook deliveries",
        webhook_secret,
        "webhook_secret",
        "(none: webhooks refused)",
    ),
    _v(
        "TURBOFLOW_WEBHOOK_ALLOW_PRIVATE",
        "gateway",
        "allow webhook URLs on loopback, private and link-local addresses (the dev stack)",
        flag,
        "webhook_allow_private",
    ),
    _v(
        "TURBOFLOW_TENANT_MAX_ACTIVE",
        "gateway",
        "unfinished requests a tenant may have before new ones get 429",
        whole(1),
        "tenant_max_active",
    ),
    _v(
        "TURBOFLOW_TENANT_MONTHLY_GPU_SECONDS",
        "gateway",
        "monthly GPU-second budgets, `TENANT=SECONDS,...` (`*`: every other tenant); a tenant over its budget gets "
        "429 `quota_exceeded` until the month ends (UTC)",
        tenant_budgets,
        "tenant_monthly_gpu_seconds",
        "(none: unlimited)",
    ),
    _v(
        "TURBOFLOW_REQUEST_RETENTION",
        "gateway",
        "how long request state is kept (`30d`, `12h`, ...)",
        duration_seconds,
        "request_retention_seconds",
        "30d",
    ),
    _v(
        "TURBOFLOW_API_KEY",
        "tools",
        "`turboflow submit`: API key for the gateway",
        field="api_key",
        shown_default="`turboflow dev`'s",
    ),
    _v("TURBOFLOW_GATEWAY_URL", "tools", "`turboflow submit`: the gateway's URL", shown_default="`turboflow dev`'s"),
    # -- tools (the CLI and the dev stack read these as defaults of their flags)
    _v(
        "NATS_URL",
        "tools",
        "`turboflow s3source`: NATS server with the bucket notifications",
        shown_default="nats://127.0.0.1:4222",
    ),
    _v(
        "K_SINK",
        "tools",
        "where the functions (started, progress, cancelled), the gateway (requests), `s3source` and `deadletter` "
        "POST their events (a Knative SinkBinding sets it)",
        http_url,
        "sink_url",
        "(none: no lifecycle events)",
    ),
    _v(
        "TURBOFLOW_S3SOURCE_TENANT",
        "tools",
        "`turboflow s3source`: tenant of the requests it emits",
        shown_default="from the key",
    ),
    _v("TURBOFLOW_BROKER_URL", "tools", "`turboflow submit/events`: broker ingress", shown_default="`turboflow dev`'s"),
    _v(
        "TURBOFLOW_NATS_URL",
        "tools",
        "NATS with the request-state bucket: the gateway keeps request state there, the functions watch it for "
        "cancels (unset: no cancel checks); `turboflow submit/events` read events from it",
        nats_url,
        "nats_url",
        "`turboflow dev`'s",
    ),
    _v(
        "TURBOFLOW_DEV_STATE",
        "tools",
        "where `turboflow dev` writes its endpoints",
        shown_default="`~/.cache/turboflow/dev.json`",
    ),
    _v(
        "TURBOFLOW_TINY_DIR",
        "tools",
        "where `turboflow dev` keeps its tiny models",
        shown_default="`~/.cache/turboflow/tiny`",
    ),
    _v("NATS_SERVER_BIN", "tools", "nats-server binary for `turboflow dev`", shown_default="the bundled one"),
    _v(
        "TURBOFLOW_LEDGER_URL",
        "tools",
        "`turboflow billing`: the usage ledger's SQLAlchemy URL (`sqlite:///PATH` or "
        "`postgresql+psycopg://USER@HOST/DB`)",
        shown_default="`sqlite:///~/.cache/turboflow/ledger.db`",
    ),
    _v(
        "TURBOFLOW_GPU_PRICES",
        "tools",
        "`turboflow billing report`: USD per GPU-hour, `TYPE=USD,...`, over the example table",
        shown_default="H200=3.5,H100=2.5,RTX5090=0.9 (placeholders)",
    ),
    # -- external
    _v(
        "HF_HUB_OFFLINE",
        "external",
        "huggingface_hub never reaches a hub; the functions set it (the pull Job does not)",
        shown_default="1 in the functions",
    ),
    _v("HF_TOKEN", "external", "hub token for `turboflow model pull` (gated repositories)"),
    _v(
        "TORCHINDUCTOR_CACHE_DIR",
        "external",
        "torch Inductor's cache (on CUDA set from `TURBOFLOW_COMPILE_CACHE`, compiled DiT or not)",
    ),
    _v("TRITON_CACHE_DIR", "external", "Triton's kernel cache (set like `TORCHINDUCTOR_CACHE_DIR`)"),
    _v("HOME", "external", "the container user's home; default caches live under it"),
)


@cache
def current() -> Settings:
    """This process's settings from os.environ, built once (tools; the functions build theirs from `cfg`)."""
    return Settings.from_env(os.environ)


def prepare_process_environment() -> None:
    """Environment for the libraries a serving process uses, set once by its entry point (never at import):
    huggingface_hub must not reach a hub (every load is from the model cache; it reads this when imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---- docs ------------------------------------------------------------------------------------------------------
DOCS_PATH = Path(__file__).resolve().parents[1] / "docs" / "functions.md"
_START, _END = "<!-- settings table: generated by `python -m turboflow.settings --write-docs` -->", "<!-- end -->"


def _default_text(var: Variable) -> str:
    if var.shown_default is not None:
        return var.shown_default
    if var.field is None:
        return ""
    default = Settings.__dataclass_fields__[var.field].default
    if default is None or default == () or default == frozenset():
        return ""
    if isinstance(default, bool):
        return "1" if default else "0"
    return f"`{default}`" if isinstance(default, str) else str(default)


def render_table() -> str:
    """The markdown variable table, one section per group."""
    lines = []
    for group, title in GROUPS.items():
        lines += [f"**{group}**: {title}", "", "| variable | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{v.name}` | {_default_text(v)} | {v.doc} |" for v in VARIABLES if v.group == group]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def render_docs(doc: str) -> str:
    """`doc` with the text between the table markers replaced by `render_table()`."""
    start, end = doc.index(_START) + len(_START), doc.index(_END, doc.index(_START))
    return doc[:start] + "\n" + render_table() + "\n" + doc[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turboflow.settings", description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the table in {DOCS_PATH.name}")
    parser.add_argument("--check-env", action="store_true", help="check this environment's values")
    args = parser.parse_args(argv)
    if args.write_docs:
        DOCS_PATH.write_text(render_docs(DOCS_PATH.read_text()))
    elif args.check_env:
        try:
            Settings.from_env(os.environ)
        except ConfigError as e:
            print(f"error[{e.code}]: {e.message}", file=sys.stderr)
            return 2
    else:
        print(render_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())

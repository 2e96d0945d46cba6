"""The event contract: generated files are current, schemas are valid, parsing and reply builders behave."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import yaml
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from jsonschema import Draft202012Validator

from turboflow.errors import InvalidRequestError
from turboflow.eventing import asyncapi
from turboflow.eventing.contracts import (
    SCHEMA_FILES,
    SCHEMAS,
    ContractError,
    completed_event,
    failed_event,
    parse_request,
    validator,
)
from turboflow.eventing.types import COMPLETED, FAILED, I2V_REQUESTED, LIFECYCLE_TYPES, POD_TYPES, T2V_REQUESTED

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _event(data, **attrs):
    base = {
        "type": T2V_REQUESTED,
        "source": "/producer",
        "id": "req-123",
        "tenant": "acme",
        "traceparent": TP,
        "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    base.update(attrs)
    return CloudEvent(attributes={k: v for k, v in base.items() if v is not None}, data=data)


def test_committed_schemas_and_asyncapi_are_up_to_date():
    stale = asyncapi.stale_files()
    assert not stale, f"regenerate with `python -m turboflow.eventing.asyncapi --write`: {stale}"


def test_schema_files_are_the_contract_schemas():
    for event_type, name in SCHEMA_FILES.items():
        on_disk = json.loads((asyncapi.REPO_ROOT / "eventing" / "schemas" / name).read_text())
        assert on_disk == SCHEMAS[event_type]
        Draft202012Validator.check_schema(on_disk)


def test_asyncapi_document_covers_every_event():
    doc = yaml.safe_load((asyncapi.REPO_ROOT / asyncapi.ASYNCAPI_PATH).read_text())
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {T2V_REQUESTED, I2V_REQUESTED, *LIFECYCLE_TYPES, *POD_TYPES}
    for msg in doc["components"]["messages"].values():
        ref = msg["payload"]["$ref"].rsplit("/", 1)[-1]
        assert ref in doc["components"]["schemas"]
    assert "out_of_memory" in doc["info"]["description"]


def test_parse_request_in_both_http_modes():
    event = _event({"prompt": "a cat", "num_frames": 17, "num_steps": 2, "seed": 3, "output_prefix": "promo"})
    for encode in (to_binary_event, to_structured_event):
        msg = encode(event)
        decoded = from_http_event(HTTPMessage(headers={k.lower(): v for k, v in msg.headers.items()}, body=msg.body))
        req = parse_request(decoded)
        assert (req.request_id, req.kind, req.tenant, req.output_prefix, req.traceparent) == (
            "req-123",
            "t2v",
            "acme",
            "promo",
            TP,
        )
        assert req.generation.request.num_frames == 17 and req.generation.request.sigma_max == 80.0
        assert req.time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_defaults_tenant_and_i2v_defaults():
    req = parse_request(_event({"prompt": "x", "image": "s3://bucket-a/in/cat.png"}, type=I2V_REQUESTED, tenant=None))
    assert req.tenant == "default" and req.image.bucket == "bucket-a" and req.image.key == "in/cat.png"
    assert req.generation.request.sigma_max == 200.0 and req.generation.image_pending


@pytest.mark.parametrize(
    "data,attrs,code",
    [
        ({"prompt": "x", "num_steps": 0}, {}, "invalid_num_steps"),
        ({"prompt": "x", "num_frames": 9999}, {}, "invalid_num_frames"),
        ({"prompt": "x", "extra": 1}, {}, "unknown_field"),
        ({"prompt": "x"}, {"type": "com.example.other"}, "unsupported_event_type"),
        ({"prompt": "x"}, {"id": "a b"}, "invalid_request_id"),
        ({"prompt": "x"}, {"tenant": "-acme"}, "invalid_tenant"),
        ("not json", {}, "invalid_data"),
        ({"prompt": "x"}, {"datacontenttype": "text/plain"}, "invalid_data"),
    ],
)
def test_parse_request_rejects_with_codes(data, attrs, code):
    with pytest.raises(InvalidRequestError) as e:
        parse_request(_event(data, **attrs))
    assert e.value.code == code


def test_contract_error_is_an_invalid_request():
    assert issubclass(ContractError, InvalidRequestError) and not ContractError("x").retryable


def test_completed_event_is_deterministic_and_keeps_context():
    request = _event({"prompt": "x"})
    data = {"request_id": "req-123", "tenant": "acme", "completed_at": "2026-01-02T03:05:00Z"}
    a, b = completed_event(request, data), completed_event(request, dict(data))
    assert a.get_type() == COMPLETED and a.get_subject() == "req-123"
    assert a.get_id() == b.get_id() != "req-123"
    assert a.get_time() == b.get_time() == datetime(2026, 1, 2, 3, 5, tzinfo=UTC)
    assert a.get_extension("traceparent") == TP and a.get_extension("tenant") == "acme"
    assert completed_event(parse_request(request), data).get_id() == a.get_id()


def test_failed_event_shape():
    ev = failed_event(
        "req-9", "invalid_num_steps", "num_steps must be 1-4", False, source="/fn/t2v", tenant="acme", traceparent=TP
    )
    assert ev.get_type() == FAILED and ev.get_subject() == "req-9" and ev.get_source() == "/fn/t2v"
    assert ev.get_extension("traceparent") == TP and ev.get_extension("tenant") == "acme"
    validator(FAILED).validate(ev.get_data())
    assert ev.get_data() == {
        "request_id": "req-9",
        "code": "invalid_num_steps",
        "message": "num_steps must be 1-4",
        "retryable": False,
        "tenant": "acme",
    }
    other = failed_event("req-9", "out_of_memory", "oom", False, source="/fn/t2v", subject="custom")
    assert other.get_id() != ev.get_id() and other.get_subject() == "custom"
    assert other.get_extension("tenant") is None and other.get_extension("traceparent") is None
    msg = to_structured_event(ev)  # serialisable by the SDK
    assert json.loads(msg.body)["data"]["code"] == "invalid_num_steps"


# ---------------------------------------------------------------------------------------------------------------
# Issue 10: full matches, ECMA patterns, seeds, attention, time, input hash, signing, registered codes
@pytest.mark.parametrize(
    "data,attrs,code",
    [
        ({"prompt": "x"}, {"id": "req-1\n"}, "invalid_request_id"),
        ({"prompt": "x"}, {"tenant": "acme\n"}, "invalid_tenant"),
        ({"prompt": "x", "output_prefix": "promo\n"}, {}, "invalid_output_prefix"),
        ({"prompt": "x", "model": "tiny\n"}, {}, "invalid_model"),
    ],
)
def test_a_trailing_newline_never_passes_an_identifier(data, attrs, code):
    with pytest.raises(InvalidRequestError) as e:
        parse_request(_event(data, **attrs))
    assert e.value.code == code


def test_schema_patterns_follow_ecma_semantics():
    from turboflow.eventing.event_schemas import ecma_regex, ecma_search

    assert ecma_regex(r"^a[$]\$$") == r"^a[$]\$\Z"
    assert ecma_search(r"^ab$", "ab") and not ecma_search(r"^ab$", "ab\n")
    errors = list(validator(T2V_REQUESTED).iter_errors({"prompt": "x", "output_prefix": "a\n"}))
    assert errors and errors[0].validator == "pattern"


def test_seed_zero_is_a_seed_and_an_omitted_seed_is_derived():
    from turboflow.eventing.contracts import derived_seed

    assert parse_request(_event({"prompt": "x", "seed": 0})).generation.request.seed == 0
    assert parse_request(_event({"prompt": "x"})).generation.request.seed == derived_seed("req-123")
    assert "default" not in SCHEMAS[T2V_REQUESTED]["properties"]["seed"]


def test_sagesla_is_accepted_and_an_unavailable_attention_is_unsupported_with_the_reason(monkeypatch):
    from turboflow.eventing.contracts import UNAVAILABLE_ATTENTION

    assert "sagesla" in SCHEMAS[T2V_REQUESTED]["properties"]["attention"]["enum"]
    assert parse_request(_event({"prompt": "x", "attention": "sagesla"})).generation.request.attention == "sagesla"
    monkeypatch.setitem(UNAVAILABLE_ATTENTION, "flash4", "attention 'flash4' is not in this build")
    with pytest.raises(InvalidRequestError) as e:
        parse_request(_event({"prompt": "x", "attention": "flash4"}))
    assert e.value.code == "unsupported_option" and e.value.message == UNAVAILABLE_ATTENTION["flash4"]
    with pytest.raises(InvalidRequestError) as e:
        parse_request(_event({"prompt": "x", "attention": "flash9"}))
    assert e.value.code == "invalid_attention"


def test_time_is_optional_and_must_parse():
    assert parse_request(_event({"prompt": "x"}), has_time=False).time is None
    with pytest.raises(InvalidRequestError) as e:
        parse_request({"type": T2V_REQUESTED, "source": "/p", "id": "r1", "time": "yesterday", "data": {"prompt": "x"}})
    assert e.value.code == "invalid_time"


def test_input_hash_covers_source_and_data_not_delivery():
    base = parse_request(_event({"prompt": "a cat"})).input_sha256
    assert len(base) == 64 and base == parse_request(_event({"prompt": "a cat"}, time=None)).input_sha256
    assert parse_request(_event({"prompt": "a dog"})).input_sha256 != base
    assert parse_request(_event({"prompt": "a cat"}, source="/other-producer")).input_sha256 != base
    assert parse_request(_event({"prompt": "a cat"}, tenant="globex")).input_sha256 != base


def test_signed_replies_verify_and_ids_depend_on_source_and_key():
    from turboflow.eventing.signing import SIGNATURE_EXTENSION, derive_id, verify_event

    key, other_key = b"k" * 32, b"o" * 32
    request = _event({"prompt": "x"})
    data = {"request_id": "req-123", "tenant": "acme", "completed_at": "2026-01-02T03:05:00Z"}
    signed = completed_event(request, data, signing_key=key)
    assert verify_event(signed, key) and not verify_event(signed, other_key)
    assert signed.get_id() == derive_id(key, "/producer", "req-123", COMPLETED)
    assert signed.get_id() == completed_event(request, dict(data), signing_key=key).get_id()
    assert completed_event(_event({"prompt": "x"}, source="/b"), data, signing_key=key).get_id() != signed.get_id()
    assert completed_event(request, data).get_extension(SIGNATURE_EXTENSION) is None
    failed = failed_event(
        "req-123", "invalid_seed", "bad", False, source="/fn", request_source="/producer", signing_key=key
    )
    assert verify_event(failed, key)
    assert (
        failed.get_id()
        == failed_event(
            "req-123", "invalid_seed", "bad", False, source="/fn", request_source="/producer", signing_key=key
        ).get_id()
    )
    assert (
        failed.get_id()
        != failed_event(
            "req-123", "invalid_seed", "bad", False, source="/fn", request_source="/producer", signing_key=other_key
        ).get_id()
    )


def test_every_emitted_error_code_is_registered():
    """Every `code=` / `code = "..."` in the packages (and the literal codes passed positionally to engine's
    `bad(...)`) is in ERROR_CODES with a description."""
    import re

    from turboflow.eventing.contracts import ERROR_CODES

    root = asyncapi.REPO_ROOT
    found: dict[str, str] = {}
    patterns = [
        re.compile(r"""\bcode\s*=\s*["']([a-z][a-z0-9_]*)["']"""),
        re.compile(r"""\bCODE\s*=\s*["']([a-z][a-z0-9_]*)["']"""),
        re.compile(r"""\bbad\([^()]*?,\s*["']([a-z][a-z0-9_]*)["']\s*,""", re.S),
        re.compile(r"""["']error["']\s*:\s*["']([a-z][a-z0-9_]*)["']"""),
    ]
    for package in ("engine", "eventing", "functions", "storage", "billing", "turboflow"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            for pattern in patterns:
                for code in pattern.findall(text):
                    found.setdefault(code, str(path.relative_to(root)))
    assert len(found) > 30
    missing = {code: where for code, where in found.items() if code not in ERROR_CODES}
    assert not missing, f"register these in eventing/event_schemas.py ERROR_CODES: {missing}"
    assert all(ERROR_CODES.values()), [c for c, text in ERROR_CODES.items() if not text]


def _i2v_event(image: str):
    return _event({"prompt": "the cat turns", "image": image}, type=I2V_REQUESTED)


@pytest.mark.parametrize(
    "uri, path",
    [
        ("file:///srv/turboflow/uploads/acme/cat.png", "/srv/turboflow/uploads/acme/cat.png"),
        ("file://localhost/srv/uploads/acme/a%20b.png", "/srv/uploads/acme/a b.png"),
    ],
)
def test_a_file_reference_is_parsed_for_a_local_store(uri, path):
    req = parse_request(_i2v_event(uri))
    assert req.image.scheme == "file" and req.image.is_reference
    assert req.image.key == path and req.image.bucket is None
    assert req.generation.image_pending  # fetched later, through the store
    assert parse_request(_i2v_event(uri)).input_sha256 == req.input_sha256


@pytest.mark.parametrize(
    "uri",
    [
        "file:///srv/uploads/../other/cat.png",
        "file:///srv//uploads/cat.png",
        "file:///srv/uploads/./cat.png",
        "file:///srv/uploads/%2e%2e/cat.png",
        "file:///srv/uploads/cat%00.png",
        "file://example.com/srv/cat.png",
        "file:///srv/uploads/cat.png\n",
    ],
)
def test_a_file_reference_that_could_escape_is_refused(uri):
    with pytest.raises(ContractError) as err:
        parse_request(_i2v_event(uri))
    assert err.value.code == "invalid_image_reference"

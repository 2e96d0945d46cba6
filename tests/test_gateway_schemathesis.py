"""Schemathesis against the LIVE gateway's own OpenAPI document (fetched over HTTP) with a valid key: whatever
the generated requests hold, no answer is a 5xx and every 4xx is an application/problem+json body with the
problem fields. Hypothesis examples per operation are few (25) so this stays around a minute on 2 cores."""

from __future__ import annotations

import pytest
import schemathesis
from gateway_harness import GatewayStack
from hypothesis import HealthCheck, given, settings

PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}


@pytest.fixture(scope="module")
def fuzzed_gateway(moto_s3, tmp_path_factory):
    # a limit of unfinished requests far above what the run creates: 201s get exercised, not only 429s
    stack = GatewayStack.start(moto_s3, tmp_path_factory.mktemp("fuzz"), tenant_max_active=100_000)
    stack.key = stack.api_key(stack.tenant())
    try:
        yield stack
    finally:
        stack.close()


def header(response, name: str) -> str:
    """A header of schemathesis' Response (lower-case names -> lists of values)."""
    values = {k.lower(): v for k, v in response.headers.items()}.get(name, [""])
    return values[0] if isinstance(values, list) else values


def check_problem(response) -> None:
    """No 5xx; a 4xx is a problem document whose status and code agree with the answer."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        assert header(response, "content-type").startswith("application/problem+json"), response.text[:300]
        body = response.json()
        assert PROBLEM_FIELDS <= set(body), body
        assert body["status"] == status and body["type"].endswith("/" + body["code"]), body
        if status == 422:
            assert isinstance(body.get("errors"), list), body
        if status == 429:
            assert int(header(response, "retry-after")) > 0


def test_no_5xx_and_every_4xx_is_a_problem(fuzzed_gateway):
    schema = schemathesis.openapi.from_url(fuzzed_gateway.url + "/openapi.json")
    headers = fuzzed_gateway.auth(fuzzed_gateway.key)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/videos", "GET /v1/videos", "GET /v1/videos/{id}"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def fuzz(case):
            if case.path.endswith("/events"):  # an unknown id: never an open stream
                case.path_parameters = dict.fromkeys(case.path_parameters or {}, "fuzz-unknown-id")
            check_problem(case.call(base_url=fuzzed_gateway.url, headers=headers, timeout=30))

        fuzz()
    # worth something only if generated bodies got through validation too: some were accepted and emitted
    assert any(e.get_attributes()["source"] == "/turboflow/gateway" for e in fuzzed_gateway.emitted)

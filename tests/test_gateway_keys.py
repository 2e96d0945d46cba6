"""API keys: stored hashed, bound to one tenant, revocable; the gateway answers 401 without a valid one."""

from __future__ import annotations

import argparse
import hashlib
import json

import httpx
import pytest
import sqlalchemy as sa
from gateway_harness import gateway_stack  # noqa: F401 (fixture)

from turboflow.gateway import cli as keys_cli
from turboflow.gateway.keys import KeyStore, parse_token


@pytest.fixture
def store(tmp_path):
    store = KeyStore.open(f"sqlite:///{tmp_path / 'keys.db'}")
    yield store
    store.close()


def test_keys_are_stored_hashed_and_verified(store):
    key, token = store.create("acme", label="ci")
    key_id, secret = parse_token(token)
    assert key_id == key.key_id and token.startswith("tf_")
    assert store.verify(token).tenant == "acme"
    with store.engine.connect() as conn:
        row = conn.execute(sa.text("select * from api_keys")).mappings().one()
    assert secret not in json.dumps({k: str(v) for k, v in row.items()})
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    # a wrong secret for a real key id, garbage, and an unknown id all fail
    assert store.verify(f"tf_{key_id}_{'A' * 43}") is None
    assert store.verify("tf_nothing") is None and store.verify(f"tf_{'0' * 16}_{secret}") is None
    assert store.verify(token + "\n") is None


def test_revoked_keys_stop_working_and_stay_listed(store):
    _, token = store.create("acme")
    other, _ = store.create("globex")
    revoked = store.revoke(parse_token(token)[0])
    assert revoked is not None and not revoked.active
    assert store.verify(token) is None
    assert [k.tenant for k in store.list()] == ["globex", "acme"]
    assert [k.key_id for k in store.list("globex")] == [other.key_id]
    assert store.revoke("0" * 16) is None and store.revoke("../x") is None


def test_bad_tenants_and_urls_are_typed_errors(store, tmp_path):
    from turboflow.errors import ConfigError, InvalidRequestError

    with pytest.raises(InvalidRequestError) as bad:
        store.create("Not A Label")
    assert bad.value.code == "invalid_tenant"
    with pytest.raises(ConfigError):
        KeyStore.open("not a url")


def run_cli(*argv: str, capsys) -> str:
    parser = argparse.ArgumentParser()
    keys_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_creates_lists_and_revokes_without_showing_secrets(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    created = json.loads(
        run_cli("keys", "create", "--tenant", "acme", "--label", "laptop", "--database", db, "--json", capsys=capsys)
    )
    token = created["key"]
    listed = run_cli("keys", "list", "--database", db, capsys=capsys)
    assert created["key_id"] in listed and "laptop" in listed and parse_token(token)[1] not in listed
    assert run_cli("keys", "revoke", token, "--database", db, capsys=capsys).startswith("revoked")
    assert KeyStore.open(db).verify(token) is None


def test_gateway_requires_a_valid_unrevoked_key(gateway_stack):  # noqa: F811
    url = gateway_stack.url + "/v1/videos"
    tenant = gateway_stack.tenant()
    token = gateway_stack.api_key(tenant)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {token}"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.headers["content-type"].startswith("application/problem+json") and r.json()["code"] == "unauthorized"
    assert httpx.get(url, headers=gateway_stack.auth(token)).status_code == 200
    r = httpx.post(url, json={"task": "t2v", "prompt": "x"}, headers={})
    assert r.status_code == 401  # authentication comes before validation: nothing is emitted
    gateway_stack.service.keys.revoke(parse_token(token)[0])
    assert httpx.get(url, headers=gateway_stack.auth(token)).status_code == 401


def test_a_key_only_sees_its_tenant(gateway_stack):  # noqa: F811
    mine = gateway_stack.auth(gateway_stack.api_key(gateway_stack.tenant()))
    theirs = gateway_stack.auth(gateway_stack.api_key(gateway_stack.tenant()))
    video = httpx.post(gateway_stack.url + "/v1/videos", json={"task": "t2v", "prompt": "x"}, headers=mine).json()
    assert httpx.get(video["urls"]["get"], headers=mine).status_code == 200
    assert httpx.get(video["urls"]["get"], headers=theirs).status_code == 404

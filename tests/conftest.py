"""Shared fixtures. Tiny models are built once per test session through the real cache layout."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Fast shapes for CPU tests: 4:3 is the smallest frame in the table; 1 frame decodes in ~1 s, 5 in ~3 s.
FAST = dict(resolution="480p", aspect_ratio="4:3", num_frames=1)


@pytest.fixture(scope="session")
def tiny_t2v_dir(tmp_path_factory):
    from turboflow.engine.tiny import build_tiny

    path = tmp_path_factory.mktemp("tiny-t2v")
    build_tiny(path, kind="t2v", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_i2v_dir(tmp_path_factory):
    from turboflow.engine.tiny import build_tiny

    path = tmp_path_factory.mktemp("tiny-i2v")
    build_tiny(path, kind="i2v", seed=0)
    return path


@pytest.fixture(scope="session")
def t2v_pipeline(tiny_t2v_dir):
    from turboflow.engine.loading import load_pipeline

    return load_pipeline(tiny_t2v_dir, device="cpu")


@pytest.fixture(scope="session")
def i2v_pipeline(tiny_i2v_dir):
    from turboflow.engine.loading import load_pipeline

    return load_pipeline(tiny_i2v_dir, device="cpu")


# ---- S3 (moto over HTTP) for the functions and storage tests ---------------------------------------------------
@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server over real HTTP on a free loopback port; yields its endpoint URL.

    Sets dummy AWS credentials in the environment for the session (boto3's standard chain reads them)."""
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN")
    }
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_SESSION_TOKEN", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_client(moto_s3):
    import boto3

    return boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")

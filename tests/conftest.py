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

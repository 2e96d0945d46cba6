"""`turboflow model-cache warm` (the page-cache DaemonSet's command) on real tiny model caches."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from turboflow.cli import main
from turboflow.engine import modelcache
from turboflow.errors import ModelCacheError
from turboflow.storage.cli import parse_duration, warm


@pytest.fixture
def cache(tiny_t2v_dir, tmp_path):
    dest = tmp_path / "t2v"
    shutil.copytree(tiny_t2v_dir, dest)
    return dest


def test_warm_reads_every_manifest_file(cache):
    manifest = modelcache.read_manifest(cache)
    for block in (4096, 16 << 20):  # small blocks loop many times per file; large ones read a file in one go
        report = warm(cache, block_bytes=block)
        assert report.files == len(manifest.files) > 3
        assert report.bytes == manifest.total_bytes > 0
        assert report.name == manifest.name and report.gb_per_s > 0
        assert "GB/s" in report.line() and manifest.name in report.line()


def test_warm_refuses_an_incomplete_cache(cache):
    manifest = modelcache.read_manifest(cache)
    biggest = max(manifest.files, key=lambda f: f.size)
    with open(cache / biggest.path, "r+b") as fh:
        fh.truncate(biggest.size // 2)
    with pytest.raises(ModelCacheError) as e:
        warm(cache)
    assert e.value.code == "model_cache_incomplete" and biggest.path in e.value.message
    (cache / modelcache.MANIFEST).unlink()  # the pull Job writes the manifest last
    with pytest.raises(ModelCacheError) as e:
        warm(cache)
    assert e.value.code == "model_cache_incomplete"
    with pytest.raises(ModelCacheError, match="too small"):
        warm(cache, block_bytes=512)


def test_cli_once_and_repeated(cache, tmp_path, capsys):
    assert main(["model-cache", "warm", str(cache)]) == 0
    out = capsys.readouterr().out
    total = json.loads((cache / modelcache.MANIFEST).read_text())
    assert f"{len(total['files'])} files" in out and "GB/s" in out
    # once: a missing cache is an error (exit 2, error[code])
    missing = tmp_path / "nothing"
    assert main(["model-cache", "warm", str(missing)]) == 2
    assert "error[model_cache_missing]" in capsys.readouterr().err
    # repeated (DaemonSet): a cache the pull Job has not written yet is reported each round, the good one warmed
    assert main(["model-cache", "warm", "--every", "10ms", "--rounds", "2", str(missing), str(cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("not warmed: error[model_cache_missing]" in ln for ln in lines) == 2
    assert sum(ln.startswith("warm: ") and "GB/s" in ln for ln in lines) == 2


def test_parse_duration():
    assert parse_duration("6h") == 21600 and parse_duration("30m") == 1800
    assert parse_duration("90") == 90 and parse_duration("250ms") == 0.25
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")

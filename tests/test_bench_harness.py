"""bench/ harness logic end to end on the CPU with tiny models (structure, stages, ratios, report); no timing
assertions."""

import json

import pytest

from bench import run as bench_run
from bench.coldstart import drop_page_cache, loader_throughput
from bench.variants import VARIANTS, register


def test_tiny_run_produces_json_and_table(tmp_path, moto_s3):
    out = tmp_path / "out"
    assert bench_run.main(["--tiny", "--models", "tiny-t2v,tiny-i2v", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["device"] == "cpu" and result["environment"]["torch"]
    rows = {r["key"]: r for r in result["models"]}
    assert set(rows) == {"tiny-t2v", "tiny-i2v"}
    for key, row in rows.items():
        assert "ours_error" not in row and "error" not in row["baseline"], row
        ours, base = row["ours"], row["baseline"]
        assert len(ours["steps_s"]) == row["timed_steps"] == len(base["steps_s"]) == 2
        for k in (
            "text_encode_s",
            "vae_decode_s",
            "mp4_encode_s",
            "s3_upload_s",
            "total_s",
            "projected_total_4_steps_s",
        ):
            assert ours[k] is not None and ours[k] > 0, (key, k)
        assert ours["frames"] == [1, 480, 640, 3] and ours["mp4_bytes"] > 0
        assert row["speedup"]["step_median_s"] == pytest.approx(base["step_median_s"] / ours["step_median_s"])
        assert row["published_5090_s"] in (1.9, 38.0)
    assert rows["tiny-i2v"]["ours"]["experts"] == ["high", "low"]  # boundary 0.95: both experts in 2 steps
    assert rows["tiny-i2v"]["ours"]["vae_encode_s"] > 0 and rows["tiny-i2v"]["baseline"]["vae_encode_s"] > 0
    table = (out / "bench.md").read_text()
    assert "| DiT step (median) |" in table and "VAE encode (I2V)" in table and "TurboDiffusion RTX 5090" in table


def test_variants_are_reported_side_by_side_and_errors_do_not_stop_the_run(tmp_path):
    calls = []
    register(
        "test-broken",
        prepare=lambda p: calls.append("prepare") or (_ for _ in ()).throw(RuntimeError("boom")),
        restore=lambda p: calls.append("restore"),
        note="a variant that fails",
    )
    try:
        out = tmp_path / "out"
        assert (
            bench_run.main(
                [
                    "--tiny",
                    "--models",
                    "tiny-t2v",
                    "--variants",
                    "eager,test-broken",
                    "--no-baseline",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        VARIANTS.pop("test-broken")
    rows = json.loads((out / "bench.json").read_text())["models"]
    assert [r["variant"] for r in rows] == ["eager", "test-broken"]
    assert "ours" in rows[0] and "boom" in rows[1]["ours_error"] and calls == ["prepare", "restore"]
    assert rows[0]["baseline"] is None and rows[0]["speedup"] == {}
    assert "boom" in (out / "bench.md").read_text()


def test_unknown_model_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        bench_run.main(["--tiny", "--models", "nope", "--out", str(tmp_path)])


def test_loader_throughput_rows_on_tiny_cache(tiny_t2v_dir):
    rows = loader_throughput(tiny_t2v_dir, tiny=True, log=lambda *a: None)
    methods = {(r["method"].split(" ")[0], r["source"]) for r in rows}
    assert {
        ("safetensors.torch.load_file(device)", "page cache"),
        ("fastload", "page cache"),
        ("fastload", "cold disk"),
    } <= methods
    assert all(r["gb"] > 0 and r["seconds"] > 0 for r in rows)
    drop_page_cache(sorted(tiny_t2v_dir.glob("*/*.safetensors")))  # must not raise


def test_plan_runs_cumulative_variants_and_reports_them_side_by_side(tmp_path):
    out = tmp_path / "bench"
    assert bench_run.main(["--tiny", "--plan", "tiny-t2v=eager,sla-vae", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["models"]
    assert [r["variant"] for r in rows] == ["eager", "sla-vae"] and all(r.get("ours") for r in rows)
    assert rows[0]["baseline"]["step_median_s"] > 0 and rows[0]["dit_weights_gb"] == rows[0]["built_dit_weights_gb"]
    table = (out / "bench.md").read_text()
    assert "| stage | eager | sla-vae | plain diffusers |" in table


def _fp8(pipe):
    from turboflow.engine.linear import quantize_transformer

    for net in (pipe.transformer, pipe.transformer_2):
        if net is not None:
            quantize_transformer(net, "fp8")


def test_quantising_variants_run_after_the_bf16_baseline_and_i2v_experts_are_quantised_at_build(tmp_path):
    register("test-fp8", request={"attention": "sla"}, prepare=_fp8, quant="fp8", note="fp8 without compiling")
    try:
        out = tmp_path / "out"
        assert bench_run.main(["--tiny", "--plan", "tiny-t2v=eager,test-fp8;tiny-i2v=test-fp8", "--out", str(out)]) == 0
    finally:
        VARIANTS.pop("test-fp8")
    t2v_eager, t2v_fp8, i2v = json.loads((out / "bench.json").read_text())["models"]
    # T2V: the baseline ran on the bf16 modules before the variant quantised them in place
    assert t2v_fp8["quantized_at_build"] is None and t2v_fp8["baseline"]["step_median_s"] > 0
    assert t2v_fp8["dit_weights_gb"] < t2v_eager["dit_weights_gb"] == t2v_fp8["built_dit_weights_gb"]
    # I2V with only quantising variants: both experts quantised as built, no bf16 baseline to compare
    assert i2v["quantized_at_build"] == "fp8" and i2v["offload"] == "none" and i2v["ours"]["experts"]
    assert "skipped" in i2v["baseline"]["error"]
    assert i2v["built_dit_weights_gb"] == i2v["dit_weights_gb"] < 2 * t2v_eager["dit_weights_gb"]


def test_plan_items_need_variants(tmp_path):
    with pytest.raises(SystemExit):
        bench_run.main(["--tiny", "--plan", "tiny-t2v", "--out", str(tmp_path)])


# ---- bench/serving_env.py: the serving-only environment of the cold-start measurement ------------------------------
def _dist(site, name, version, requires=(), files=()):
    """A installed distribution as pip leaves it: NAME-VERSION.dist-info with METADATA and RECORD, plus its files."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"] + [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_text("VALUE = 1\n")
    records = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD", "../../bin/a-script"]
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in records))


def test_serving_site_holds_the_requirement_closure_and_nothing_else(tmp_path):
    from bench.serving_env import build_site

    image, carried = tmp_path / "image", tmp_path / "carried"
    _dist(
        image,
        "app-core",
        "1.0",
        ["helper>=2", "extra-only; extra == 'fancy'", "py-old; python_version < '3'"],
        ["app_core/__init__.py", "app_core/sub/mod.py"],
    )
    _dist(image, "helper", "1.5", ["ns-a"], ["helper.py"])  # below the required version: kept, reported
    _dist(image, "ns-a", "1", [], ["ns/a/__init__.py"])
    _dist(image, "ns-b", "1", [], ["ns/b/__init__.py"])  # shares the ns/ namespace, not required
    _dist(image, "extra-only", "1", [], ["extra_only.py"])
    _dist(image, "unrelated", "1", [], ["unrelated/__init__.py"])
    _dist(image, "dup", "1", [], ["dup/__init__.py"])
    _dist(carried, "dup", "2", ["ns-c"], ["dup/__init__.py"])  # the carried wheel wins over the image's copy
    _dist(carried, "ns-c", "1", [], ["ns/c/__init__.py"])  # ns/ now has selected files from both sources
    site = tmp_path / "site"
    env = build_site(site, [carried, image], ["app-core", "dup", "absent>=1"])
    assert set(env["distributions"]) == {"app-core", "helper", "ns-a", "dup", "ns-c"}
    assert env["distributions"]["dup"] == {"version": "2", "from": str(carried)}
    assert env["missing"] == ["absent"] and env["version_conflicts"] == ["helper>=2 (found 1.5)"]
    # whole directories where one distribution owns them, a real directory where the namespace is shared
    assert (site / "app_core").is_symlink() and (site / "helper.py").is_symlink()
    assert not (site / "ns").is_symlink() and (site / "ns/a").is_symlink() and (site / "ns/c").is_symlink()
    assert (site / "dup").resolve() == (carried / "dup").resolve()
    for hidden in ("ns/b", "extra_only.py", "unrelated", "py_old"):
        assert not (site / hidden).exists(), hidden
    assert (site / "app_core/sub/mod.py").read_text() == "VALUE = 1\n"
    assert not (tmp_path / "bin").exists()


def test_containerfile_extras_and_roots_match_the_image():
    from bench.serving_env import containerfile_extras, serving_roots

    assert containerfile_extras('RUN pip install -c c.txt ".[pull,sim]" && x') == ["pull", "sim"]
    roots, extras = serving_roots()
    assert extras == ["pull"] and any(r.startswith("diffusers") for r in roots)
    assert any(r.startswith("huggingface_hub") for r in roots) and not any(r.startswith("pytest") for r in roots)


def test_importtime_summary():
    from bench.serving_env import summarise_importtime

    text = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   _abc\n"
        "import time:      2000 |       2100 | abc\n"
        "import time:      3000 |       3000 |     torch._C\n"
        "import time:       500 |       3500 |   torch.version\n"
        "import time:      1000 |       4500 | torch\n"
    )
    s = summarise_importtime(text, top=2)
    assert s["top_level_cumulative_ms"] == [["torch", 4.5], ["abc", 2.1]]
    assert s["top_cumulative_ms"] == [["torch", 4.5], ["torch.version", 3.5]]
    assert s["self_ms_by_package"] == [["torch", 4.5], ["abc", 2.0]] and s["total_self_ms"] == 6.6


def test_precompile_writes_bytecode_through_symlinked_directories(tmp_path):
    from bench.serving_env import precompile

    (tmp_path / "real/pkg").mkdir(parents=True)
    (tmp_path / "real/pkg/m.py").write_text("X = 1\n")
    (tmp_path / "site").mkdir()
    (tmp_path / "site/pkg").symlink_to(tmp_path / "real/pkg")
    assert precompile([tmp_path / "site"])["modules"] == 1
    assert list((tmp_path / "real/pkg/__pycache__").glob("m.*.pyc"))


def test_tiny_cold_start_in_the_serving_only_environment(tmp_path):
    """The whole measurement on the CPU: the child runs isolated, sees the site and the repo only (pytest and moto,
    installed in this venv, are not importable there), and reports every phase."""
    from bench import serving_env

    out = tmp_path / "out/coldstart.json"
    argv = ["--tiny", "--no-compile", "--runs", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert serving_env.main([*argv, "--site", str(tmp_path / "site")]) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["links"] > 0 and "torch" in result["environment"]["distributions"]
    assert "pytest" not in result["environment"]["distributions"]
    assert [r["label"] for r in result["runs"]] == [
        "warm page cache #1",
        "cold page cache #1",
        "lean, compile off #1",
        "lean, compile+fp8, JIT (empty compile cache)",
        "lean, compile+fp8, artifact loaded #1",
    ]
    for run in [result["importtime_child"], *result["runs"]]:
        assert run["isolated"] and run["sys_path"][:2] == [str(tmp_path / "site"), str(serving_env.REPO)]
        assert not any(run["importable"].values()), run["importable"]
    for run in result["runs"]:
        phases = ("interpreter_s", "import_torch_s", "build_s", "read_s", "ready_s")
        for phase in (*phases, "import_diffusers_s") if run["mode"].startswith("fast") else phases:
            assert run[phase] >= 0, phase
        assert run["ready_s"] >= run["imports_s"]
        compiled = run["label"].startswith("lean, compile+")
        assert (run["compile_artifact"] is not None) == compiled and run["compile_artifact_load_s"] >= 0.0
    # the smoke test never empties the page cache of the machine running it (as root: vm.drop_caches, all of it)
    assert result["runs"][1]["page_cache"].startswith("POSIX_FADV_DONTNEED on the weights")
    lean = result["runs"][2]
    assert lean["mode"] == "lean" and "import_diffusers_s" not in lean  # diffusers loads inside start()
    # the CPU has no warm-up, so nothing compiles at start and no artifact is saved: each pod reports it missing
    assert [r["compile_artifact"]["artifact"] for r in result["runs"][3:]] == ["missing", "missing"]
    assert dict(result["importtime"]["top_level_cumulative_ms"]).keys() >= {"torch", "diffusers"}
    assert out.with_suffix(".importtime.txt").read_text().startswith("import time:")


def test_dit_profile_groups_a_forward_by_category(tmp_path):
    from bench import dit_profile

    assert dit_profile.category("void _sla_forward_kernel") == "attention"
    assert dit_profile.category("sm90_xmma_gemm_e4m3e4m3_bf16") == "fp8 gemm"
    assert dit_profile.category("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_bias_TNT") == "fp8 gemm"
    assert dit_profile.category("triton_red_fused__scaled_mm__to_copy_abs_amax") == "inductor fused"
    assert dit_profile.category("sm90_xmma_gemm_bf16bf16_bf16f32") == "bf16 gemm"
    assert dit_profile.category("triton_per_fused_add_mul_0") == "inductor fused"
    assert dit_profile.category("aten::nothing_known") == "other"
    assert dit_profile.main(["--tiny", "--attention", "sla", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "dit_profile.json").read_text())["rows"]["sla"]
    assert "error" not in row and row["forward_median_s"] > 0 and row["top_kernels"]
    assert sum(row["by_category_ms"].values()) == pytest.approx(row["busy_ms"], abs=0.05)

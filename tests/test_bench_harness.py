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

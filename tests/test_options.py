"""Performance switches from TURBOFLOW_* settings (turboflow/settings.py -> engine/options.py LoadOptions), the
model's own request defaults (attention "sla" for a checkpoint fine-tuned with SLA), and both reaching a real
function: hypercorn on loopback, moto S3, the mp4 decoded."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from function_harness import LiveFunction, reply_event, request_event

from turboflow.engine import modelcache
from turboflow.engine.options import LoadOptions
from turboflow.engine.quant import BlockInt8Linear
from turboflow.engine.video import probe_video
from turboflow.errors import ConfigError
from turboflow.eventing.contracts import validator
from turboflow.eventing.types import COMPLETED
from turboflow.settings import Settings, warmup_sizes

BUCKET = "tf-options"
SMALL = dict(resolution="480p", aspect_ratio="4:3", num_frames=1, num_steps=2)


def _options(env: dict) -> LoadOptions:
    return LoadOptions.from_settings(Settings.from_env(env))


def test_defaults_and_valid_settings():
    assert _options({}) == LoadOptions() and LoadOptions().fast_vae and LoadOptions().offload == "auto"
    opts = _options(
        {
            "TURBOFLOW_QUANT_LINEAR": "FP8",
            "TURBOFLOW_COMPILE": "max-autotune-no-cudagraphs",
            "TURBOFLOW_COMPILE_CACHE": "/cache/compile",
            "TURBOFLOW_FAST_VAE": "0",
            "TURBOFLOW_VAE_CHUNK": "2",
            "TURBOFLOW_VAE_DECODE": "Compile_Block+upsample",
            "TURBOFLOW_OFFLOAD": "experts",
            "TURBOFLOW_COMPILE_WARMUP": "480p:16:9:81, 720p:9:16:49",
            "TURBOFLOW_LOAD_THREADS": "3",
            "TURBOFLOW_WARMUP": "0",
        }
    )
    assert opts == LoadOptions(
        quant_linear="fp8",
        compile="max-autotune-no-cudagraphs",
        compile_cache_dir="/cache/compile",
        fast_vae=False,
        vae_chunk=2,
        vae_decode="compile_block+upsample",
        offload="experts",
        compile_warmup=(("480p", "16:9", 81), ("720p", "9:16", 49)),
        load_threads=3,
        warmup=False,
    )
    assert _options({"TURBOFLOW_COMPILE": "1", "TURBOFLOW_QUANT_LINEAR": "none"}).compile is True
    assert _options({"TURBOFLOW_COMPILE": "off"}).compile is False


@pytest.mark.parametrize(
    "env, field",
    [
        ({"TURBOFLOW_QUANT_LINEAR": "fp4"}, "TURBOFLOW_QUANT_LINEAR"),
        ({"TURBOFLOW_COMPILE": "turbo"}, "TURBOFLOW_COMPILE"),
        ({"TURBOFLOW_FAST_VAE": "maybe"}, "TURBOFLOW_FAST_VAE"),
        ({"TURBOFLOW_VAE_CHUNK": "0"}, "TURBOFLOW_VAE_CHUNK"),
        ({"TURBOFLOW_VAE_DECODE": "conv4d"}, "TURBOFLOW_VAE_DECODE"),
        ({"TURBOFLOW_VAE_DECODE": "subpixel+subpixel"}, "TURBOFLOW_VAE_DECODE"),
        ({"TURBOFLOW_VAE_DECODE": "subpixel;graph"}, "TURBOFLOW_VAE_DECODE"),
        ({"TURBOFLOW_OFFLOAD": "disk"}, "TURBOFLOW_OFFLOAD"),
        ({"TURBOFLOW_LOAD_THREADS": "many"}, "TURBOFLOW_LOAD_THREADS"),
        ({"TURBOFLOW_WARMUP": "sometimes"}, "TURBOFLOW_WARMUP"),
        ({"TURBOFLOW_COMPILE": "1", "TURBOFLOW_COMPILE_WARMUP": "480p:16:9:80"}, "TURBOFLOW_COMPILE_WARMUP"),
        ({"TURBOFLOW_COMPILE": "1", "TURBOFLOW_COMPILE_WARMUP": "1080p:16:9:81"}, "TURBOFLOW_COMPILE_WARMUP"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_variable(env, field):
    with pytest.raises(ConfigError) as info:
        _options(env)
    assert info.value.field == field and info.value.code == "invalid_config"
    assert info.value.message.startswith(f"{field}: ")


def test_warmup_sizes_need_compile_and_a_frame_count_in_range():
    with pytest.raises(ConfigError, match="TURBOFLOW_COMPILE is off"):
        _options({"TURBOFLOW_COMPILE_WARMUP": "480p:16:9:81"})
    with pytest.raises(ConfigError, match="up to"):
        _options({"TURBOFLOW_COMPILE": "1", "TURBOFLOW_COMPILE_WARMUP": "480p:16:9:245"})


def test_a_manifest_default_that_makes_no_valid_request_is_a_model_cache_error(tiny_t2v_dir, tmp_path):
    from turboflow.engine.loading import load_pipeline
    from turboflow.errors import ModelCacheError

    root = tmp_path / "model"
    shutil.copytree(tiny_t2v_dir, root)
    manifest = modelcache.read_manifest(root)
    modelcache.write_manifest(
        root,
        name=manifest.name,
        kind=manifest.kind,
        components=manifest.components,
        defaults={**manifest.defaults, "attention": "flash9"},
    )
    with pytest.raises(ModelCacheError) as info:
        load_pipeline(root, device="cpu")
    assert info.value.code == "model_cache_invalid" and "flash9" in info.value.message
    with pytest.raises(ConfigError, match="vae_chunk"):
        load_pipeline(tiny_t2v_dir, device="cpu", vae_chunk=0)


def test_warmup_sizes_skip_blanks():
    assert warmup_sizes(" ,720p:16:9:81,") == (("720p", "16:9", 81),)


def test_load_pipeline_rejects_unknown_modes(tiny_t2v_dir):
    from turboflow.engine.loading import load_pipeline

    for kwargs in ({"compile": "fastest"}, {"offload": "disk"}, {"quant_linear": "fp4"}, {"load_threads": 0}):
        with pytest.raises(ConfigError):
            load_pipeline(tiny_t2v_dir, device="cpu", **kwargs)


def test_warm_compiled_runs_one_request_per_size_on_both_experts(i2v_pipeline):
    from turboflow.engine.loading import warm_compiled

    seen = []
    original = i2v_pipeline._use

    def spy(expert):
        seen.append(expert)
        return original(expert)

    i2v_pipeline._use = spy
    try:
        assert len(warm_compiled(i2v_pipeline, [("480p", "4:3", 1), ("480p", "3:4", 1)])) == 2
    finally:
        i2v_pipeline._use = original
    assert seen == ["high", "low", "high", "low"]


# ---- the model's defaults and the settings, through a real function --------------------------------------------
@pytest.fixture(scope="module")
def sla_model(tiny_t2v_dir, tmp_path_factory):
    """The tiny model with the defaults `turboflow model import` writes for a checkpoint that has SLA's proj_l."""
    root = tmp_path_factory.mktemp("sla-model") / "model"
    shutil.copytree(tiny_t2v_dir, root)
    manifest = modelcache.read_manifest(root)
    modelcache.write_manifest(
        root,
        name=manifest.name,
        kind=manifest.kind,
        components=manifest.components,
        defaults={**manifest.defaults, "attention": "sla", "sla_topk": 0.25},
    )
    return root


@pytest.fixture(scope="module")
def quantized_fn(sla_model, moto_s3, s3_client):
    try:
        s3_client.create_bucket(Bucket=BUCKET)
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    live = LiveFunction(
        "t2v",
        {
            "MODEL_DIR": str(sla_model),
            "TURBOFLOW_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": moto_s3,
            "TURBOFLOW_DEVICE": "cpu",
            "TURBOFLOW_QUANT_LINEAR": "int8_weight_only",
            "TURBOFLOW_FAST_VAE": "0",
        },
    )
    live.wait_ready()
    yield live
    live.close()


def _completed(live, data, tmp_path):
    response = live.send(request_event("t2v", data))
    assert response.status_code == 200, response.text
    event, body = reply_event(response)
    assert event.get_type() == COMPLETED, body
    validator(COMPLETED).validate(body)
    path = tmp_path / f"{event.get_subject()}.mp4"
    path.write_bytes(httpx.get(body["video"]["url"], timeout=30).content)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (640, 480, 1) and info.sha256 == body["video"]["sha256"]
    return body


def test_function_applies_settings_and_model_defaults(quantized_fn, tmp_path):
    pipe = quantized_fn.fn.pipeline
    linears = [m for m in pipe.transformer.blocks.modules() if isinstance(m, BlockInt8Linear)]
    assert linears and pipe.fast_vae is False
    # no attention in the request: the model's default (SLA at its top-k) is used and reported
    body = _completed(quantized_fn, {"prompt": "a lighthouse at dusk", "seed": 3, **SMALL}, tmp_path)
    assert body["attention"] == "sla" and body["sla_topk"] == 0.25
    assert pipe._attention == ("sla", 0.25, "input", "auto")  # the SLA processors ran, pooling as upstream
    # the request's own choice wins
    body = _completed(
        quantized_fn, {"prompt": "a lighthouse at dusk", "seed": 3, "attention": "original", **SMALL}, tmp_path
    )
    assert body["attention"] == "original" and "sla_topk" not in body


def test_function_with_a_bad_setting_never_becomes_ready(tiny_t2v_dir):
    live = LiveFunction(
        "t2v",
        {
            "MODEL_DIR": str(tiny_t2v_dir),
            "TURBOFLOW_BUCKET": BUCKET,
            "TURBOFLOW_DEVICE": "cpu",
            "TURBOFLOW_COMPILE": "always",
        },
    )
    try:
        r = live.client.get("/health/readiness")
        assert r.status_code != 200 and "TURBOFLOW_COMPILE" in r.text
        assert live.client.get("/health/liveness").status_code == 200
    finally:
        live.close()


def test_cli_generate_takes_performance_flags_and_model_defaults(sla_model, tmp_path, capsys, monkeypatch):
    from turboflow.cli import main
    from turboflow.engine import loading

    seen = {}
    real = loading.load_pipeline

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_pipeline", spy)
    out = tmp_path / "v.mp4"
    assert (
        main(
            [
                "generate",
                "t2v",
                "--model",
                str(sla_model),
                "--prompt",
                "a fox",
                "--resolution",
                "480p",
                "--aspect-ratio",
                "4:3",
                "--frames",
                "1",
                "--steps",
                "1",
                "--seed",
                "5",
                "--device",
                "cpu",
                "--quant-linear",
                "int8",
                "--no-fast-vae",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["attention"] == "sla" and record["sla_topk"] == 0.25 and record["seed"] == 5
    assert seen["quant_linear"] == "int8" and seen["fast_vae"] is False and seen["compile"] is False
    # a bad chunk size is refused by argparse (usage error), before any model is loaded
    with pytest.raises(SystemExit):
        main(["generate", "t2v", "--model", str(sla_model), "--prompt", "a fox", "--vae-chunk", "-1"])
    capsys.readouterr()
    assert probe_video(out).num_frames == 1
    assert (
        main(
            [
                "generate",
                "t2v",
                "--model",
                str(sla_model),
                "--prompt",
                "a fox",
                "--device",
                "cpu",
                "--compile",
                "fastest",
                "--out",
                str(out),
            ]
        )
        != 0
    )
    assert "invalid_config" in capsys.readouterr().err

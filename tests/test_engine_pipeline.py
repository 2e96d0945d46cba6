"""End-to-end engine behaviour on tiny models loaded through the real cache path (CPU)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image

from turboflow.engine import (
    ChecksumMismatchError,
    GenerationRequest,
    ImageError,
    InvalidRequestError,
    ModelCacheError,
)
from turboflow.engine.loading import load_pipeline
from turboflow.engine.modelcache import read_manifest
from turboflow.engine.request import adaptive_frame_size
from turboflow.engine.sampler import rcm_timesteps
from turboflow.engine.video import probe_video, write_mp4


def _image(w=400, h=300, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_same_seed_same_frames_different_seed_different(t2v_pipeline):
    a = t2v_pipeline(t2v_pipeline.request("a red fox", seed=11, **FAST))
    b = t2v_pipeline(t2v_pipeline.request("a red fox", seed=11, **FAST))
    c = t2v_pipeline(t2v_pipeline.request("a red fox", seed=12, **FAST))
    assert a.frames.shape == (1, 480, 640, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    assert a.seed == 11 and set(a.timings) == {"text_encode", "diffusion", "vae_decode"}


def test_no_seed_picks_a_seed_that_reproduces(t2v_pipeline):
    first = t2v_pipeline(t2v_pipeline.request("a boat", **FAST))
    second = t2v_pipeline(t2v_pipeline.request("a boat", seed=None, **FAST))
    assert first.seed != second.seed  # two draws from 2^63 seeds
    again = t2v_pipeline(t2v_pipeline.request("a boat", seed=first.seed, **FAST))
    assert np.array_equal(first.frames, again.frames)


def test_seed_zero_is_seed_zero_like_upstream(t2v_pipeline):
    inputs = []
    hook = t2v_pipeline.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append(kwargs["hidden_states"].clone()), with_kwargs=True
    )
    try:
        result = t2v_pipeline(t2v_pipeline.request("a boat", seed=0, num_steps=1, **FAST))
    finally:
        hook.remove()
    assert result.seed == 0
    # upstream: generator.manual_seed(seed), first noise randn(shape) * t0
    noise = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert torch.allclose(inputs[0], (noise.double() * rcm_timesteps(1, 80.0)[0]).float())
    again = t2v_pipeline(t2v_pipeline.request("a boat", seed=0, num_steps=1, **FAST))
    assert np.array_equal(result.frames, again.frames)


def test_stage_progress_reports_every_stage_and_each_decoded_chunk(t2v_pipeline, i2v_pipeline):
    seen, sunk = [], []
    steps = []
    result = t2v_pipeline(
        t2v_pipeline.request("a boat", seed=1, num_steps=2, **{**FAST, "num_frames": 5}),
        progress=lambda i, n: steps.append((i, n)),
        frame_sink=lambda f: sunk.append(len(f)),
        stage_progress=lambda *event: seen.append(event),
    )
    assert t2v_pipeline.fast_vae and result.frames.shape[0] == 5
    assert seen == [
        ("text_encode", 0, 1),
        ("text_encode", 1, 1),
        ("diffusion", 0, 2),
        ("diffusion", 1, 2),
        ("diffusion", 2, 2),
        ("vae_decode", 0, 5),
        ("vae_decode", 1, 5),
        ("vae_decode", 5, 5),
    ]
    assert steps == [(1, 2), (2, 2)] and sunk == [1, 4]  # the chunked decode: first latent frame alone, then 4
    seen.clear()
    i2v_pipeline(
        i2v_pipeline.request("a boat", image=_image(), seed=1, num_steps=1, **FAST),
        stage_progress=lambda *event: seen.append(event),
    )
    assert [e for e in seen if e[0] == "vae_encode"] == [("vae_encode", 0, 1), ("vae_encode", 1, 1)]


def test_prompt_changes_the_video(t2v_pipeline):
    a = t2v_pipeline(t2v_pipeline.request("a cat in the snow", seed=3, **FAST))
    b = t2v_pipeline(t2v_pipeline.request("a robot on the moon", seed=3, **FAST))
    assert not np.array_equal(a.frames, b.frames)


def test_ode_and_sde_differ(t2v_pipeline):
    sde = t2v_pipeline(t2v_pipeline.request("a fish", seed=5, **FAST))
    ode = t2v_pipeline(t2v_pipeline.request("a fish", seed=5, ode=True, **FAST))
    assert not np.array_equal(sde.frames, ode.frames)


def test_network_gets_t_times_1000_each_step(t2v_pipeline):
    seen = []
    hook = t2v_pipeline.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(float(kwargs["timestep"][0])), with_kwargs=True
    )
    try:
        t2v_pipeline(t2v_pipeline.request("a dog", seed=1, num_steps=3, **FAST))
    finally:
        hook.remove()
    assert seen == pytest.approx([t * 1000 for t in rcm_timesteps(3, 80.0)[:-1].tolist()], rel=1e-6)


@pytest.mark.parametrize(
    "boundary,expected",
    [
        (0.9, ["high", "high", "low", "low"]),
        (0.95, ["high", "low", "low", "low"]),
        (0.0, ["high"] * 4),
        (1.0, ["low"] * 4),
    ],
)
def test_i2v_expert_switch_at_boundary(i2v_pipeline, boundary, expected):
    calls = []
    hooks = [
        i2v_pipeline.transformer.register_forward_pre_hook(lambda m, a: calls.append("high")),
        i2v_pipeline.transformer_2.register_forward_pre_hook(lambda m, a: calls.append("low")),
    ]
    try:
        result = i2v_pipeline(i2v_pipeline.request("a bird", image=_image(), seed=2, boundary=boundary, **FAST))
    finally:
        for h in hooks:
            h.remove()
    # sigma_max 200: t = 0.995, 0.934, 0.853, 0.609; high expert exactly while t >= boundary
    ts = rcm_timesteps(4, 200.0)[:-1].tolist()
    assert calls == expected == ["high" if t >= boundary else "low" for t in ts]
    assert result.experts == expected and result.sigma_max == 200.0


def test_i2v_conditioning_layout_and_adaptive_size(i2v_pipeline):
    inputs = []
    hook = i2v_pipeline.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append(kwargs["hidden_states"].clone()), with_kwargs=True
    )
    try:
        result = i2v_pipeline(
            i2v_pipeline.request(
                "a car",
                image=_image(400, 300),
                seed=4,
                resolution="480p",
                aspect_ratio="16:9",
                num_frames=5,
            )
        )
    finally:
        hook.remove()
    # 832x480 area with the image's 4:3 aspect, sides multiples of 16
    assert (result.width, result.height) == adaptive_frame_size((832, 480), (400, 300)) == (736, 544)
    x = inputs[0]
    assert x.shape == (1, 36, 2, 544 // 8, 736 // 8)  # 16 noise + 4 mask + 16 image latent
    mask = x[:, 16:20]
    assert bool((mask[:, :, 0] == 1).all()) and bool((mask[:, :, 1:] == 0).all())
    fixed = i2v_pipeline(
        i2v_pipeline.request("a car", image=_image(400, 300), seed=4, adaptive_resolution=False, **FAST)
    )
    assert (fixed.width, fixed.height) == (640, 480)


def test_i2v_image_changes_the_video(i2v_pipeline):
    a = i2v_pipeline(i2v_pipeline.request("a car", kind="i2v", image=_image(seed=1), seed=4, **FAST))
    b = i2v_pipeline(i2v_pipeline.request("a car", kind="i2v", image=_image(seed=2), seed=4, **FAST))
    assert not np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize(
    "changes,error,code",
    [
        (dict(num_steps=5), InvalidRequestError, "invalid_num_steps"),
        (dict(num_steps=0), InvalidRequestError, "invalid_num_steps"),
        (dict(num_frames=80), InvalidRequestError, "invalid_num_frames"),
        (dict(num_frames=True), InvalidRequestError, "invalid_num_frames"),
        (dict(resolution="1080p"), InvalidRequestError, "invalid_resolution"),
        (dict(aspect_ratio="21:9"), InvalidRequestError, "invalid_aspect_ratio"),
        (dict(prompt=""), InvalidRequestError, "invalid_prompt"),
        (dict(prompt="x" * 5000), InvalidRequestError, "prompt_too_long"),
        (dict(seed=-1), InvalidRequestError, "invalid_seed"),
        (dict(sigma_max=float("nan")), InvalidRequestError, "invalid_sigma_max"),
        (dict(attention="flash9"), InvalidRequestError, "invalid_attention"),
        (dict(seed=True), InvalidRequestError, "invalid_seed"),
        (dict(seed=2**63), InvalidRequestError, "invalid_seed"),
        (dict(kind="i2v"), ImageError, "invalid_image"),
        (dict(kind="i2v", image=b"not an image at all"), ImageError, "invalid_image"),
        (dict(kind="i2v", image="/nonexistent/picture.png"), ImageError, "invalid_image"),
        (dict(image=b"x"), InvalidRequestError, "unexpected_image"),
    ],
)
def test_bad_requests_raise_typed_errors(changes, error, code):
    request = GenerationRequest(prompt="a cat").replace(**changes)
    with pytest.raises(error) as info:
        request.validated()
    assert info.value.code == code and info.value.message and not info.value.retryable


def test_wrong_kind_for_model(t2v_pipeline):
    with pytest.raises(InvalidRequestError) as info:
        t2v_pipeline(t2v_pipeline.request("a cat", kind="i2v", image=_image(), **FAST))
    assert info.value.code == "wrong_model_kind"


def test_missing_cache_file_and_checksum_mismatch(tiny_t2v_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_t2v_dir, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as info:
        load_pipeline(broken, device="cpu", verify_checksums=True)
    assert "transformer/diffusion_pytorch_model.safetensors" in info.value.message
    weights.unlink()
    with pytest.raises(ModelCacheError) as info:
        load_pipeline(broken, device="cpu")
    assert info.value.code == "model_cache_incomplete" and "diffusion_pytorch_model" in info.value.message
    (broken / "manifest.json").unlink()
    with pytest.raises(ModelCacheError) as info:
        load_pipeline(broken, device="cpu")
    assert info.value.code == "model_cache_incomplete"


def test_manifest_describes_the_cache(tiny_i2v_dir):
    manifest = read_manifest(tiny_i2v_dir)
    assert manifest.kind == "i2v" and manifest.defaults["sigma_max"] == 200.0
    assert set(manifest.components) == {"tokenizer", "text_encoder", "vae", "transformer", "transformer_2"}
    assert all(len(f.sha256) == 64 and f.size > 0 for f in manifest.files)


def test_mp4_has_requested_frames_size_and_fps(t2v_pipeline, tmp_path):
    result = t2v_pipeline(t2v_pipeline.request("a sunset", seed=9, aspect_ratio="4:3", num_frames=9))
    info = write_mp4(result.frames, tmp_path / "v.mp4", fps=result.fps)
    probed, frames = probe_video(info.path, return_frames=True)
    assert (probed.num_frames, probed.width, probed.height, probed.fps) == (9, 640, 480, 16.0)
    assert probed.sha256 == info.sha256 and probed.duration == pytest.approx(9 / 16)
    # lossy, but the decoded video must be the generated one
    err = np.abs(frames.astype(float) - result.frames.astype(float)).mean()
    assert err < 12, err


def test_cli_generate_from_tiny_model(tiny_t2v_dir, tmp_path):
    out = tmp_path / "cli.mp4"
    cli = [sys.executable, "-m", "turboflow.cli"]
    proc = subprocess.run(
        [
            *cli,
            "generate",
            "t2v",
            "--model",
            str(tiny_t2v_dir),
            "--prompt",
            "a slow river",
            "--frames",
            "5",
            "--aspect-ratio",
            "4:3",
            "--seed",
            "42",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["seed"] == 42 and record["video"]["num_frames"] == 5
    assert probe_video(out).num_frames == 5
    bad = subprocess.run(
        [*cli, "generate", "t2v", "--model", str(tiny_t2v_dir), "--prompt", "x", "--steps", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error[invalid_num_steps]" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(
        [*cli, "generate", "t2v", "--model", str(tmp_path / "nope"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "error[model_cache_missing]" in missing.stderr


def test_mp4_stream_rejects_bad_frames_and_cleans_up(tmp_path):
    from turboflow.engine.video import Mp4Stream
    from turboflow.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        Mp4Stream(tmp_path / "odd.mp4", 641, 480, fps=16)
    stream = Mp4Stream(tmp_path / "v.mp4", 64, 48, fps=16, background=True)
    stream.put(np.zeros((2, 48, 64, 3), np.uint8))
    with pytest.raises(InvalidRequestError):
        stream.put(np.zeros((2, 48, 32, 3), np.uint8))
    stream.abort()  # generation failed: nothing is left behind
    assert list(tmp_path.iterdir()) == []


def test_mp4_stream_lifecycle_misuse_is_clear(tmp_path):
    from turboflow.engine.video import Mp4Stream, probe_video
    from turboflow.errors import InvalidRequestError

    empty = Mp4Stream(tmp_path / "empty.mp4", 64, 48, fps=16, background=True)
    with pytest.raises(InvalidRequestError, match="no frames"):
        empty.finish()
    assert list(tmp_path.iterdir()) == []  # the failed finish removed the partial file
    stream = Mp4Stream(tmp_path / "v.mp4", 64, 48, fps=16, background=True)
    stream.put(np.full((3, 48, 64, 3), 128, np.uint8))
    info = stream.finish()
    assert probe_video(info.path).num_frames == 3
    with pytest.raises(RuntimeError, match="finished"):
        stream.put(np.zeros((1, 48, 64, 3), np.uint8))
    with pytest.raises(RuntimeError, match="finished"):
        stream.finish()
    stream.abort()  # a no-op once finished: the video stays
    assert (tmp_path / "v.mp4").is_file()


@pytest.mark.parametrize(
    "placed, wanted, expected",
    [
        ("cuda:0", "cuda", True),  # the pipeline's "cuda" and its parameters' "cuda:0": the case == got wrong
        ("cuda:0", "cuda:0", True),
        ("cuda:1", "cuda:0", False),
        ("cpu", "cuda", False),  # an expert parked on the host
        ("cpu", "cpu", True),
    ],
)
def test_a_device_without_an_index_means_any_of_its_type(placed, wanted, expected):
    from turboflow.engine.pipeline import same_device

    assert same_device(torch.device(placed), torch.device(wanted)) is expected


def test_warmup_runs_each_resident_dit_once(i2v_pipeline):
    """The load's warm-up (on CUDA, before the pod says ready) runs each resident DiT once, so its kernels (cuBLAS,
    SLA's Triton kernels, the FP8 quantizer) are compiled and loaded before the first request, not during it."""
    from turboflow.engine.loading import warmup

    calls = []
    nets = {"high": i2v_pipeline.transformer, "low": i2v_pipeline.transformer_2}
    hooks = [net.register_forward_pre_hook(lambda *_, name=name: calls.append(name)) for name, net in nets.items()]
    try:
        warmup(i2v_pipeline)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["high", "low"]

"""Fast Wan VAE decode (engine/vae_decode.py) equals diffusers' decode up to rounding."""

import numpy as np
import pytest
import torch
from conftest import FAST

from turboflow.engine import vae_decode
from turboflow.engine.vae_decode import DecodeVariant, default_chunk, fast_decode, host_frames, psnr
from turboflow.errors import ConfigError


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLWan

    from turboflow.engine.families.wan import TINY_VAE

    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY_VAE).eval()


@pytest.mark.parametrize("frames,chunk", [(1, 4), (2, 1), (6, 1), (6, 2), (6, 4), (6, 5), (6, 20)])
def test_chunked_decode_equals_diffusers(vae, frames, chunk):
    z = torch.randn(1, 16, frames, 6, 10, generator=torch.Generator().manual_seed(frames * 10 + chunk))
    ref = vae.decode(z, return_dict=False)[0]
    assert ref.std() > 1e-3  # a real signal, not a constant
    out = fast_decode(vae, z, chunk=chunk)
    assert out.shape == ref.shape == (1, 3, 1 + 4 * (frames - 1), 48, 80)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    assert psnr(out, ref) > 90


def test_decode_without_the_causal_cache_would_differ(vae):
    """Guards the test above: decoding chunks independently (no carried cache) is visibly different."""
    z = torch.randn(1, 16, 5, 6, 10, generator=torch.Generator().manual_seed(3))
    ref = vae.decode(z, return_dict=False)[0]
    tail = vae.decode(z[:, :, 1:], return_dict=False)[0]  # restarts the cache at latent frame 1
    assert not torch.allclose(tail[:, :, 1:], ref[:, :, 5:], atol=1e-3)


@pytest.mark.parametrize("spec", ["base", "conv2d"])
def test_bf16_decode_quality(vae, spec):
    z = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(4))
    ref = vae.decode(z, return_dict=False)[0]
    vae16 = type(vae).from_config(vae.config).eval()
    vae16.load_state_dict(vae.state_dict())
    vae16.to(torch.bfloat16)
    out = fast_decode(vae16, z.to(torch.bfloat16), chunk=2, variant=DecodeVariant.parse(spec)).float()
    stock = vae16.decode(z.to(torch.bfloat16), return_dict=False)[0].float()
    assert psnr(out, ref) > 30 and psnr(stock, ref) > 30
    assert abs(psnr(out, ref) - psnr(stock, ref)) < 6


def test_default_chunk_scales_with_frame_size():
    assert default_chunk(480, 832) == 2
    assert default_chunk(720, 1280) == 1
    assert default_chunk(48, 80) == 20
    assert default_chunk(720, 1280) >= 1


def test_pipeline_fast_and_stock_decode_agree(t2v_pipeline):
    req = t2v_pipeline.request("waves", seed=9, **dict(FAST, num_frames=9))
    fast = t2v_pipeline(req)
    t2v_pipeline.fast_vae = False
    try:
        stock = t2v_pipeline(req)
    finally:
        t2v_pipeline.fast_vae = True
    assert fast.frames.shape == stock.frames.shape == (9, 480, 640, 3)
    assert np.abs(fast.frames.astype(int) - stock.frames.astype(int)).max() <= 1


@pytest.mark.parametrize("fast", [True, False])
def test_frame_sink_gets_every_frame_in_order_while_decoding(t2v_pipeline, tmp_path, fast):
    from turboflow.engine.video import Mp4Stream, probe_video, write_mp4

    req = t2v_pipeline.request("waves", seed=9, **dict(FAST, num_frames=9))
    pieces = []
    stream = Mp4Stream(tmp_path / "streamed.mp4", 640, 480, fps=16, background=True)

    def sink(frames):
        pieces.append(frames.shape[0])
        stream.put(frames)

    t2v_pipeline.fast_vae = fast
    try:
        result = t2v_pipeline(req, frame_sink=sink)
    finally:
        t2v_pipeline.fast_vae = True
    # the fast decode hands over the first latent frame alone, then chunks; the stock decode everything at once
    assert pieces == ([1, 8] if fast else [9]) and sum(pieces) == result.frames.shape[0]
    streamed = stream.finish()
    whole = write_mp4(result.frames, tmp_path / "whole.mp4", fps=result.fps)
    (_, a), (_, b) = probe_video(streamed.path, return_frames=True), probe_video(whole.path, return_frames=True)
    assert streamed.num_frames == 9 and np.array_equal(a, b)  # same encoder input, same pictures


# ---- decode variants (engine/vae_decode.py DecodeVariant): each equal to diffusers' decode in float32 ----------


@pytest.fixture
def count_conv3d(monkeypatch):
    """Counts F.conv3d calls (the fast path's and nn.Conv3d's) while the test runs."""
    calls = []
    conv3d = torch.nn.functional.conv3d
    monkeypatch.setattr(torch.nn.functional, "conv3d", lambda *a, **kw: calls.append(1) or conv3d(*a, **kw))
    return calls


@pytest.fixture
def count_upsample(monkeypatch):
    """Counts F.interpolate calls (nn.Upsample's) while the test runs."""
    calls = []
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *a, **kw: calls.append(1) or interpolate(*a, **kw))
    return calls


@pytest.fixture(scope="module")
def reference(vae):
    """diffusers' decode of a seeded latent with `frames` latent frames, computed once per module."""
    done = {}

    def decode(frames: int):
        if frames not in done:
            z = torch.randn(1, 16, frames, 6, 10, generator=torch.Generator().manual_seed(100 + frames))
            done[frames] = z, vae.decode(z, return_dict=False)[0]
        return done[frames]

    return decode


# (latent frames, chunk, channels_last): chunk 1 (720p's), 2 with a capture at chunk 3 and a shorter last chunk,
# 4 with a shorter last chunk
CASES = [(6, 1, False), (8, 2, True), (6, 4, False)]


@pytest.mark.parametrize(
    "spec", ["conv2d", "conv2d_shifted", "upsample", "subpixel", "graph", "conv2d+upsample+graph", "conv2d+subpixel"]
)
@pytest.mark.parametrize("frames,chunk,channels_last", CASES)
def test_variant_equals_diffusers(
    vae, reference, spec, frames, chunk, channels_last, monkeypatch, count_conv3d, count_upsample
):
    # every conv through the variant's kernels, conv_out (3 outputs) included: the tiny VAE's two full-size stages
    # have 8 and 4 channels, below the production threshold
    monkeypatch.setattr(vae_decode, "MIN_CONV2D_OUT_CHANNELS", 1)
    z, ref = reference(frames)
    count_conv3d.clear()
    count_upsample.clear()
    out = fast_decode(vae, z, chunk=chunk, channels_last=channels_last, variant=DecodeVariant.parse(spec))
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    # the variants really ran other kernels: the conv2d ones no conv3d, the subpixel ones no upsampling
    assert (len(count_conv3d) == 0) == spec.startswith("conv2d")
    assert (len(count_upsample) == 0) == ("subpixel" in spec)


def test_conv2d_variant_keeps_conv3d_for_few_output_channels(vae, reference, count_conv3d):
    """With the production threshold, conv_out (3 channels) and the 8- and 4-channel stages stay conv3d, the rest
    is 2-D."""
    z, ref = reference(6)
    count_conv3d.clear()
    out = fast_decode(vae, z, chunk=4, variant=DecodeVariant(conv="conv2d"))
    assert torch.allclose(out, ref, atol=1e-4, rtol=0)
    small = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d) and m.out_channels < 16]
    assert small and len(count_conv3d) == 3 * len(small)  # three decoder calls (chunks of 1, 4 and 1 frames)


@pytest.mark.parametrize("spec", ["conv2d+compile_block", "compile_norm"])
def test_compiled_variant_equals_diffusers(vae, reference, spec):
    """dynamo + AOTAutograd (aot_eager: no C++/Triton build on a CPU machine; Inductor runs on the GPU bench)
    trace the residual blocks as whole graphs (fullgraph=True: a graph break fails)."""
    torch._dynamo.reset()
    vae_decode._COMPILED.clear()
    variant = DecodeVariant(**{**DecodeVariant.parse(spec).__dict__, "compile_backend": "aot_eager"})
    z, ref = reference(4)
    try:
        out = fast_decode(vae, z, chunk=1, variant=variant)  # chunks 2 and 3 have two-frame caches: compiled
        assert list(vae_decode._COMPILED) == [
            ("_residual_core" if variant.compile == "block" else "_norm_silu", "aot_eager", None)
        ]
    finally:
        torch._dynamo.reset()
        vae_decode._COMPILED.clear()
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()


def test_static_cache_slots_update_in_place():
    slots = vae_decode._CacheSlots([None, torch.zeros(2), "Rep"])
    slots[0] = torch.ones(2)  # not static: replaced
    first = slots[0]
    slots.static = True
    slots[0] = torch.full((2,), 3.0)
    assert slots[0] is first and first.tolist() == [3.0, 3.0]  # the captured buffer, updated
    slots[1] = torch.ones(3)  # another shape: replaced even when static
    slots[2] = torch.ones(1)  # a marker string: replaced
    assert slots[1].shape == (3,) and isinstance(slots[2], torch.Tensor)


def test_variant_parse_and_names():
    for spec in ("base", "conv2d", "conv2d_shifted+compile_block+upsample+graph", "compile_norm", "subpixel"):
        assert DecodeVariant.parse(spec).name == spec
    assert DecodeVariant.parse("upsample+conv2d") == DecodeVariant(conv="conv2d", native_upsample=True)
    for bad in ("", "conv2d+", "Conv2d", "conv4d", "conv2d+conv2d_shifted", "base+graph", "conv2d;graph"):
        with pytest.raises(ConfigError) as err:
            DecodeVariant.parse(bad)
        assert err.value.code == "invalid_config"
    with pytest.raises(ConfigError):
        DecodeVariant(compile="all")


def test_auto_variant_by_device_and_compile_and_the_settings_token_list():
    from turboflow.settings import VAE_DECODE_TOKENS

    assert sorted(VAE_DECODE_TOKENS) == sorted(DecodeVariant._TOKENS)  # TURBOFLOW_VAE_DECODE checks the same names
    choose = vae_decode.choose_variant
    assert choose("auto", device_type="cpu", compiled=True) == vae_decode.BASE
    assert choose("auto", device_type="cuda", compiled=False).name == "subpixel"
    assert choose("auto", device_type="cuda", compiled=True).name == "compile_block+upsample"
    compiled_for_tests = choose("compile_block", device_type="cpu", compiled=False, compile_backend="aot_eager")
    assert compiled_for_tests.compile == "block" and compiled_for_tests.compile_backend == "aot_eager"
    with pytest.raises(ConfigError):
        choose("conv5d", device_type="cuda", compiled=False)


def test_load_option_vae_decode_reaches_the_decode(tiny_t2v_dir):
    """A variant chosen at load runs in the pipeline's decode and gives the base decode's frames (float32, CPU)."""
    from turboflow.engine.loading import load_pipeline

    base = load_pipeline(tiny_t2v_dir, device="cpu", warmup=False)
    subpixel = load_pipeline(tiny_t2v_dir, device="cpu", warmup=False, vae_decode="subpixel")
    assert base.vae_variant == vae_decode.BASE and subpixel.vae_variant.subpixel
    req = base.request("waves", seed=3, **dict(FAST, num_frames=5))
    a, b = base(req).frames, subpixel(req).frames
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    with pytest.raises(ConfigError) as err:
        load_pipeline(tiny_t2v_dir, device="cpu", warmup=False, vae_decode="subpixel+graph+conv9d")
    assert err.value.field == "vae_variant"


def test_host_frames_converts_in_order_one_piece_behind():
    from turboflow.engine.pipeline import TurboVideoPipeline

    video = torch.rand(1, 3, 9, 4, 6, generator=torch.Generator().manual_seed(2)) * 2.4 - 1.2  # clamping too
    log = []

    def pieces():
        for start, stop in ((0, 1), (1, 5), (5, 9)):
            log.append(f"made {start}")
            yield video[:, :, start:stop]

    got = []
    for frames in host_frames(pieces()):
        log.append(f"got {len(frames)}")
        got.append(frames)
    # each piece is handed over after the next one was produced (its copy overlaps the next chunk's decode)
    assert log == ["made 0", "made 1", "got 1", "made 5", "got 4", "got 4"]
    assert np.array_equal(np.concatenate(got), TurboVideoPipeline._to_frames(video))

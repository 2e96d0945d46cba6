"""Fast Wan VAE decode (engine/vae_decode.py) equals diffusers' decode up to rounding."""

import numpy as np
import pytest
import torch
from conftest import FAST

from turboflow.engine.vae_decode import default_chunk, fast_decode, psnr


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


def test_bf16_decode_quality(vae):
    z = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(4))
    ref = vae.decode(z, return_dict=False)[0]
    vae16 = type(vae).from_config(vae.config).eval()
    vae16.load_state_dict(vae.state_dict())
    vae16.to(torch.bfloat16)
    out = fast_decode(vae16, z.to(torch.bfloat16), chunk=2).float()
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

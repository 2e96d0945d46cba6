"""Faster Wan2.1 VAE decode: the same network and weights as diffusers' `AutoencoderKLWan.decode`, run differently.

diffusers decodes one latent frame per decoder call (21 calls for 81 frames), concatenates the growing output each
time, pads every causal conv input with an extra full copy (`F.pad`) and runs each RMS norm through a float32 copy of
its input. `fast_decode`:

* decodes the first latent frame alone (it is special: no temporal upsampling) and the rest in chunks of `chunk`
  latent frames. Every temporal operation in the Wan2.1 decoder is a causal conv whose cache holds the last two
  frames, so a chunk of n frames computes exactly what n one-frame calls compute, in fewer, larger kernels;
* gives each causal conv its spatial zero padding inside the convolution (no padded copy); only the causal time
  padding / cache frames are concatenated;
* computes the RMS norm as x * (1 / ||x||) * (sqrt(C) * gamma) with a float32 norm reduction, without materialising
  a float32 copy of x (bf16 rounds once more than upstream's fp32 normalise-then-cast: measured by PSNR);
* writes chunks into one preallocated output instead of re-concatenating it.

In float32 it equals diffusers' decode to rounding (tests/test_vae_decode.py). `channels_last` converts the decoder
to channels_last_3d (cuDNN's preferred layout for bf16 conv3d). Wan2.2's residual VAE (`is_residual`) and
patchified VAEs fall back to diffusers' own decode.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F


def _causal_conv_forward(self, x, cache_x=None):
    """WanCausalConv3d.forward with the spatial padding done by the convolution itself."""
    time_pad = self._padding[4]
    if time_pad > 0:
        if cache_x is not None:
            x = torch.cat([cache_x.to(x.device, x.dtype), x], dim=2)
            time_pad -= cache_x.shape[2]
        if time_pad > 0:
            x = F.pad(x, (0, 0, 0, 0, time_pad, 0))
    return F.conv3d(
        x, self.weight, self.bias, self.stride, (0, self._padding[2], self._padding[0]), self.dilation, self.groups
    )


def _rms_norm_forward(self, x):
    """WanRMS_norm.forward (F.normalize over channels, * sqrt(C) * gamma + bias) without a float32 copy of x."""
    dim = 1 if self.channel_first else -1
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
    out = x * norm.reciprocal().to(x.dtype)
    out = out * (self.gamma * self.scale).to(x.dtype)
    if isinstance(self.bias, torch.Tensor):
        out = out + self.bias.to(x.dtype)
    return out


@contextlib.contextmanager
def _patched(decoder: torch.nn.Module):
    """Swap the forward of the decoder's causal convs and RMS norms (instance attributes, removed afterwards)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

    patched = []
    for m in decoder.modules():
        if isinstance(m, WanCausalConv3d):
            m.forward = types.MethodType(_causal_conv_forward, m)
            patched.append(m)
        elif isinstance(m, WanRMS_norm):
            m.forward = types.MethodType(_rms_norm_forward, m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def supports_fast_decode(vae) -> bool:
    cfg = vae.config
    return not getattr(cfg, "is_residual", False) and getattr(cfg, "patch_size", None) is None


def default_chunk(height: int, width: int) -> int:
    """Latent frames per decoder call: 2 (8 output frames) at 480p, 1 at 720p (H100: chunk 2 is within 2% of chunk 4
    or 10 at 480p and needs 7.6 GB instead of 11.9 / 24.8 GB; memory grows with chunk x pixels)."""
    pixels = height * width
    return max(1, min(20, (2 * 480 * 832) // max(pixels, 1)))


def _fast_path(vae) -> bool:
    return supports_fast_decode(vae) and not getattr(vae, "use_tiling", False)


@torch.no_grad()
def decode_chunks(vae, z: torch.Tensor, *, chunk: int | None = None, channels_last: bool = False):
    """Yield the decoded video [B, 3, n, H, W] piece by piece, in order, not clamped: a consumer (the mp4 encoder)
    can work on one piece while the next decodes. z [B, z_dim, T, h, w] is un-normalised, in the VAE's dtype.
    Without the fast path (Wan2.2 residual VAE, tiling) the one piece is diffusers' whole decode."""
    if not _fast_path(vae):
        yield vae.decode(z, return_dict=False)[0]
        return
    frames, h, w = z.shape[2:]
    scale = vae.spatial_compression_ratio if hasattr(vae, "spatial_compression_ratio") else 8
    chunk = chunk or default_chunk(h * scale, w * scale)
    decoder = vae.decoder
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last_3d)
    vae.clear_cache()
    produced = 0
    try:
        with _patched(decoder):
            x = _causal_conv_forward(vae.post_quant_conv, z)
            start = 0
            while start < frames:
                n = 1 if start == 0 else min(chunk, frames - start)
                vae._conv_idx = [0]
                piece = decoder(
                    x[:, :, start : start + n], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=start == 0
                )
                produced += piece.shape[2]
                yield piece
                start += n
    finally:
        vae.clear_cache()
    expected = decoded_frames(vae, frames)
    if produced != expected:
        raise RuntimeError(f"VAE decode produced {produced} frames, expected {expected}")


def decoded_frames(vae, latent_frames: int) -> int:
    """F = 1 + (T' - 1) * s_t: the first latent frame decodes to 1 frame, each later one to s_t = 2^(temporal
    halvings) frames (4 for the Wan VAE)."""
    return 1 + (latent_frames - 1) * 2 ** sum(vae.config.temperal_downsample)


@torch.no_grad()
def fast_decode(vae, z: torch.Tensor, *, chunk: int | None = None, channels_last: bool = False) -> torch.Tensor:
    """z [B, z_dim, T, h, w] (already un-normalised, in the VAE's dtype) -> video [B, 3, F, H, W] clamped to [-1, 1]."""
    if not _fast_path(vae):
        return vae.decode(z, return_dict=False)[0].clamp_(-1.0, 1.0)
    out, pos = None, 0
    for piece in decode_chunks(vae, z, chunk=chunk, channels_last=channels_last):
        if out is None:  # one preallocated output instead of re-concatenating
            out = piece.new_empty(*piece.shape[:2], decoded_frames(vae, z.shape[2]), *piece.shape[3:])
        out[:, :, pos : pos + piece.shape[2]] = piece
        pos += piece.shape[2]
    return out.clamp_(-1.0, 1.0)


def to_channels_last(vae) -> None:
    """Decoder weights in channels_last_3d (5-D conv weights only; 4-D ones in channels_last)."""
    for m in vae.decoder.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB between two videos in [-1, 1] (data_range 2) or uint8 frames (pass data_range=255)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()

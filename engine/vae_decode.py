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
  a float32 copy of x on CUDA (bf16 rounds once more than upstream's fp32 normalise-then-cast: measured by PSNR;
  the CPU sums squares instead, see `_channel_norm`);
* writes chunks into one preallocated output instead of re-concatenating it.

In float32 it equals diffusers' decode to rounding (tests/test_vae_decode.py). `channels_last` converts the decoder
to channels_last_3d (cuDNN's preferred layout for bf16 conv3d). Wan2.2's residual VAE (`is_residual`) and
patchified VAEs fall back to diffusers' own decode.

Variants (`DecodeVariant`, each the same function; the default is the decode above):

* `conv2d`: a causal k_t x k_h x k_w conv (time padding P = k_t - 1, from zeros or the cache) is a 2-D conv over
  frames stacked on channels: with x_p the padded input and S[t] = concat_k x_p[t + k] (k_t * C channels),
  y[t] = sum_k W[:, :, k] * x_p[t + k] = W2 * S[t], W2[o, k*C + c] = W[o, c, k]: one conv2d of [B*T, k_t*C, H, W]
  (on the bet that cuDNN's conv2d kernels are better tuned than its conv3d ones on Hopper: bench/vae_variants.py
  measures both per stage), built in channels_last memory [B, T, H, W, k_t, C] so the
  conv's input and output need no transposition; a 1 x 1 spatial kernel (the temporal upsampling conv, k_t = 3;
  the 1x1x1 shortcuts) is a matmul. Convs with few outputs (conv_out: 3) stay conv3d: they are memory-bound and
  the stacked copy triples their input traffic.
* `conv2d_shifted`: the same sum as three conv2d over time-shifted frame batches (views, no stacked copy),
  y = W0 * x_p[0:T] + W1 * x_p[1:T+1] + W2 * x_p[2:T+2], at the price of two extra passes over the output.
* `upsample`: nearest-exact 2x upsampling in the activation dtype. diffusers goes through float32 (cast, upsample,
  cast back: 25x the bf16 input's bytes moved, against 5x); copying values is exact in any dtype, so the result is
  bit-identical.
* `subpixel`: the upsamplers' nearest 2x upsampling + 3x3 conv computed from the low-resolution input as four
  2x2 convs, one per output phase (a, b) in {0, 1}^2: with u = up(x), out[2i+a, 2j+b] = sum_{ky,kx} W[ky, kx]
  u[2i+a+ky-1, 2j+b+kx-1], and u's row 2i+a+ky-1 is x's row i + floor((a+ky-1)/2), so rows ky = 0 | 1, 2 meet x
  rows i-1 | i for a = 0 and rows ky = 0, 1 | 2 meet i | i+1 for a = 1 (columns alike): K_ab = R_a W R_b^T with the
  taps summed (in float32, then cast). As one conv2d with 4 x C_out outputs and a 2x2 kernel over x padded by 1,
  output (i + a, j + b) of phase (a, b) is out[2i+a, 2j+b]: 16 instead of 36 multiply-adds per input pixel and
  output channel, no upsampled tensor, one interleaving copy.
* `compile_norm`: RMS norm + SiLU as one torch.compile'd kernel (one read, one write instead of ~7 passes).
* `compile_block`: each residual block (shortcut, norm + SiLU, both causal convs, cache update, residual add) as a
  compiled graph with static shapes per chunk: Inductor fuses the norms, the activation, the cache concatenation or
  stacking and the residual add around cuDNN's convolutions. Only chunks whose caches hold two frames are
  compiled (the first two run eager): one graph per block shape and chunk size, shared by equal blocks.
* `graph`: from the fourth chunk on, the steady chunk (same shapes, caches of two frames) is captured once as a
  CUDA graph and replayed; the caches become static buffers updated in place (`_CacheSlots`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from turboflow.errors import ConfigError

CACHE_FRAMES = 2  # diffusers' CACHE_T: every causal conv of the Wan decoder keeps its input's last two frames
CONV_IMPLS = ("conv3d", "conv2d", "conv2d_shifted")
COMPILE_LEVELS = ("", "norm", "block")
# conv2d variants skip convs with fewer outputs: memory-bound, where the stacked input only adds traffic
MIN_CONV2D_OUT_CHANNELS = 16


@dataclass(frozen=True)
class DecodeVariant:
    """How `fast_decode` runs the decoder. Every variant computes the same function (equal in float32, see the
    module docstring); they differ in kernels and in what a first call costs (compiles, graph capture)."""

    conv: str = "conv3d"
    compile: str = ""  # "" | "norm" | "block"
    native_upsample: bool = False
    subpixel: bool = False
    cuda_graph: bool = False
    compile_backend: str = "inductor"  # tests use "aot_eager" (no C++/Triton build on a CPU machine)
    compile_mode: str | None = None

    def __post_init__(self):
        if self.conv not in CONV_IMPLS:
            raise ConfigError(f"VAE conv must be one of {list(CONV_IMPLS)}, got {self.conv!r}", field="vae_variant")
        if self.compile not in COMPILE_LEVELS:
            raise ConfigError(
                f"VAE compile must be one of {list(COMPILE_LEVELS)}, got {self.compile!r}", field="vae_variant"
            )

    _TOKENS = {
        "conv2d": {"conv": "conv2d"},
        "conv2d_shifted": {"conv": "conv2d_shifted"},
        "upsample": {"native_upsample": True},
        "subpixel": {"subpixel": True},
        "compile_norm": {"compile": "norm"},
        "compile_block": {"compile": "block"},
        "graph": {"cuda_graph": True},
    }

    @classmethod
    def parse(cls, spec: str) -> DecodeVariant:
        """'base' or tokens joined by '+', e.g. 'conv2d+compile_block+upsample' (order-free, each at most once)."""
        if not isinstance(spec, str) or not re.fullmatch(r"base|[a-z0-9_]+(\+[a-z0-9_]+)*", spec):
            raise ConfigError(
                f"VAE decode variant must be 'base' or tokens joined by '+', got {spec!r}", field="vae_variant"
            )
        fields: dict = {}
        for token in [] if spec == "base" else spec.split("+"):
            if token not in cls._TOKENS:
                raise ConfigError(
                    f"unknown VAE decode variant token {token!r}; known: {sorted(cls._TOKENS)}", field="vae_variant"
                )
            overlap = set(fields) & set(cls._TOKENS[token])
            if overlap:
                raise ConfigError(f"VAE decode variant {spec!r} sets {sorted(overlap)} twice", field="vae_variant")
            fields.update(cls._TOKENS[token])
        return cls(**fields)

    @property
    def name(self) -> str:
        tokens = [self.conv] if self.conv != "conv3d" else []
        tokens += [f"compile_{self.compile}"] if self.compile else []
        tokens += ["upsample"] if self.native_upsample else []
        tokens += ["subpixel"] if self.subpixel else []
        tokens += ["graph"] if self.cuda_graph else []
        return "+".join(tokens) or "base"


BASE = DecodeVariant()

# What "auto" runs, by (device type, DiT compiled). Measured on an H200, Wan2.1 VAE at 480p 81 frames, bf16
# (BENCHMARKS.md run 14, bench/vae_variants.py): base 1.10 s, subpixel 1.01 s (no compile), compile_block+upsample
# 0.82 s (its compile, ~13 s, belongs to the start that compiles the DiT and is kept in the compile artifact, so
# it is only chosen when the DiT is compiled too). conv2d (1.21 s) and CUDA graphs (0.84 s on top of
# compile_block) did not pay. Every variant computes the same function (equal in float32); on the CPU the base
# decode runs (no Inductor build on a CPU pod).
AUTO_VARIANTS = {
    ("cuda", True): "compile_block+upsample",
    ("cuda", False): "subpixel",
}


def choose_variant(spec: str, *, device_type: str, compiled: bool, compile_backend: str = "inductor") -> DecodeVariant:
    """The DecodeVariant a load runs: `spec` "auto" picks from AUTO_VARIANTS (base where none is listed), any other
    spec is DecodeVariant.parse'd (ConfigError naming vae_variant if bad); compile_backend goes to the compiled
    parts (aot_eager in CPU tests)."""
    if spec == "auto":
        spec = AUTO_VARIANTS.get((device_type, bool(compiled)), "base")
    variant = DecodeVariant.parse(spec)
    if variant.compile and compile_backend != variant.compile_backend:
        variant = dataclasses.replace(variant, compile_backend=compile_backend)
    return variant


# ---- causal convolutions -------------------------------------------------------------------------------------


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


def _conv2d_eligible(conv) -> bool:
    return (
        tuple(conv.stride) == (1, 1, 1)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.groups == 1
        and conv.out_channels >= MIN_CONV2D_OUT_CHANNELS
        and conv._padding[4] == conv.kernel_size[0] - 1  # causal: output frames = input frames
    )


def _time_stacked(x: torch.Tensor, cache: torch.Tensor | None, kt: int, time_pad: int) -> torch.Tensor:
    """[B, C, T, H, W] (+ cache [B, C, c, H, W]) -> S [B, T_out, H, W, kt, C] with S[:, t, :, :, k] the causally
    padded input frame t + k: the padded sequence is (P - c zero frames, the c cache frames, the T frames of x)."""
    b, c, frames, h, w = x.shape
    cached = 0 if cache is None else cache.shape[2]
    zeros = max(time_pad - cached, 0)
    out_frames = zeros + cached + frames - kt + 1
    stacked = x.new_empty(b, out_frames, h, w, kt, c)
    src = x.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]: a view of channels_last_3d memory
    cache_src = None if cache is None else cache.to(x.dtype).permute(0, 2, 3, 4, 1)
    for k in range(kt):
        # output frame t reads padded frame s = t + k
        zero_end = min(max(zeros - k, 0), out_frames)
        cache_end = min(max(zeros + cached - k, 0), out_frames)
        if zero_end > 0:
            stacked[:, :zero_end, :, :, k].zero_()
        if cache_end > zero_end:
            first = zero_end + k - zeros
            stacked[:, zero_end:cache_end, :, :, k] = cache_src[:, first : first + cache_end - zero_end]
        if out_frames > cache_end:
            first = cache_end + k - zeros - cached
            stacked[:, cache_end:, :, :, k] = src[:, first : first + out_frames - cache_end]
    return stacked


def _stacked_conv(conv, x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
    """The causal conv as one conv2d (or matmul) over frames stacked on channels: y[t] = W2 * S[t] (module doc)."""
    kt, kh, kw = conv.kernel_size
    weight = conv.weight.to(x.dtype)
    cout = weight.shape[0]
    b = x.shape[0]
    stacked = _time_stacked(x, cache, kt, conv._padding[4])
    frames, h, w = stacked.shape[1:4]
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    if kh == kw == 1:  # a matmul over kt * C channels; the output [B, T, H, W, Cout] is channels_last_3d
        y = F.linear(stacked.flatten(-2), weight.permute(0, 2, 1, 3, 4).reshape(cout, -1), bias)
        return y.permute(0, 4, 1, 2, 3)
    w2 = weight.permute(0, 2, 1, 3, 4).reshape(cout, kt * weight.shape[1], kh, kw)
    w2 = w2.contiguous(memory_format=torch.channels_last)
    inp = stacked.view(b * frames, h, w, -1).permute(0, 3, 1, 2)  # [B*T, kt*C, H, W] in channels_last memory
    y = F.conv2d(inp, w2, bias, 1, (conv._padding[2], conv._padding[0]))
    return y.unflatten(0, (b, frames)).permute(0, 2, 1, 3, 4)


def _shifted_conv(conv, x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
    """The causal conv as k_t conv2d over time-shifted frame batches of the padded input, summed."""
    kt = conv.kernel_size[0]
    weight = conv.weight.to(x.dtype)
    time_pad = conv._padding[4]
    if cache is not None:
        x = torch.cat([cache.to(x.dtype), x], dim=2)
        time_pad -= cache.shape[2]
    if time_pad > 0:
        x = F.pad(x, (0, 0, 0, 0, time_pad, 0))
    b, _, padded, h, w = x.shape
    frames = padded - kt + 1
    batch = x.permute(0, 2, 1, 3, 4)  # [B, T+P, C, H, W]
    padding = (conv._padding[2], conv._padding[0])
    y = None
    for k in range(kt):
        inp = batch[:, k : k + frames].reshape(b * frames, *batch.shape[2:])
        w_k = weight[:, :, k].contiguous(memory_format=torch.channels_last)
        part = F.conv2d(inp, w_k, conv.bias.to(x.dtype) if k == 0 and conv.bias is not None else None, 1, padding)
        y = part if y is None else y.add_(part)
    return y.unflatten(0, (b, frames)).permute(0, 2, 1, 3, 4)


def _pointwise_conv(conv, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 conv as a matmul over channels (channels_last_3d in and out)."""
    weight = conv.weight.to(x.dtype).flatten(1)
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return F.linear(x.permute(0, 2, 3, 4, 1), weight, bias).permute(0, 4, 1, 2, 3)


def _causal_conv(conv, x: torch.Tensor, cache: torch.Tensor | None = None, impl: str = "conv3d") -> torch.Tensor:
    """A WanCausalConv3d applied with the chosen kernels; `cache` holds the previous chunk's last input frames."""
    if impl != "conv3d" and _conv2d_eligible(conv):
        if tuple(conv.kernel_size) == (1, 1, 1):
            return _pointwise_conv(conv, x)
        if impl == "conv2d" or conv.kernel_size[1:] == (1, 1):
            return _stacked_conv(conv, x, cache)
        return _shifted_conv(conv, x, cache)
    return _causal_conv_forward(conv, x, cache)


# ---- norm, residual block, upsampling ------------------------------------------------------------------------


def _channel_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """||x||_2 = sqrt(sum_c x_c^2) over `dim` (kept), accumulated in float32.

    On CUDA vector_norm reads x once without a float32 copy. On the CPU it is computed as sqrt(sum(x^2)): torch's CPU
    vector_norm over a channel dim that is not the innermost runs ~15x slower (87 vs 6 ms for [1, 8, 3, 480, 640]
    float32, torch 2.13 on 2 cores), which made it a third of the tiny model's decode in the test suite."""
    if x.device.type == "cpu":
        return x.float().square().sum(dim=dim, keepdim=True).sqrt()
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)


def _rms_norm_forward(self, x):
    """WanRMS_norm.forward (F.normalize over channels, * sqrt(C) * gamma + bias) without a float32 copy of x."""
    dim = 1 if self.channel_first else -1
    norm = _channel_norm(x, dim).clamp_min(1e-12)
    out = x * norm.reciprocal().to(x.dtype)
    out = out * (self.gamma * self.scale).to(x.dtype)
    if isinstance(self.bias, torch.Tensor):
        out = out + self.bias.to(x.dtype)
    return out


def _norm_silu(norm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(RMS norm(x)): the activation in front of every causal conv of a residual block."""
    return F.silu(_rms_norm_forward(norm, x))


def _next_cache(x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
    """The cache the next chunk's conv reads: x's last two frames (with the previous cache's last frame in front
    when x has one frame), as diffusers' residual block keeps it."""
    nxt = x[:, :, -CACHE_FRAMES:].clone()
    if nxt.shape[2] < CACHE_FRAMES and cache is not None:
        nxt = torch.cat([cache[:, :, -1:].to(nxt.dtype), nxt], dim=2)
    return nxt


def _residual_core(block, x, cache1, cache2, impl: str, norm_silu=_norm_silu):
    """WanResidualBlock.forward as a pure function of (x, caches) -> (out, new caches): what torch.compile sees.
    out = conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + shortcut(x), each conv causal over its cache."""
    identity = block.conv_shortcut
    h = x if isinstance(identity, torch.nn.Identity) else _causal_conv(identity, x, None, impl)
    a = norm_silu(block.norm1, x)
    new1 = _next_cache(a, cache1)
    y = _causal_conv(block.conv1, a, cache1, impl)
    a = block.dropout(norm_silu(block.norm2, y))
    new2 = _next_cache(a, cache2)
    y = _causal_conv(block.conv2, a, cache2, impl)
    return y + h, new1, new2


_COMPILED: dict[tuple, object] = {}


def _compiled(fn, variant: DecodeVariant):
    """torch.compile(fn) with static shapes, one compiled callable per (function, backend, mode) per process."""
    key = (fn.__name__, variant.compile_backend, variant.compile_mode)
    if key not in _COMPILED:
        kwargs = {"dynamic": False, "fullgraph": True, "backend": variant.compile_backend}
        if variant.compile_backend == "inductor" and variant.compile_mode:
            kwargs["mode"] = variant.compile_mode
        # one graph per block shape x chunk shape (x the first chunk's one-frame caches): a few dozen at most
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED[key] = torch.compile(fn, **kwargs)
    return _COMPILED[key]


def _residual_block_forward(self, x, feat_cache=None, feat_idx=(0,), *, variant: DecodeVariant):
    """WanResidualBlock.forward through `_residual_core`, compiled per the variant; the feat_cache bookkeeping
    (two slots: conv1, conv2) stays in Python."""
    if feat_cache is None:
        return _residual_core(self, x, None, None, variant.conv)[0]
    idx = feat_idx[0]
    cache1, cache2 = feat_cache[idx], feat_cache[idx + 1]
    # compiled once the caches hold two frames: the first two chunks (no cache, one-frame caches) stay eager
    # rather than compiling a second set of graphs for 1/10 of the work
    steady = cache1 is not None and cache1.shape[2] == CACHE_FRAMES
    if variant.compile == "block" and steady:
        out, new1, new2 = _compiled(_residual_core, variant)(self, x, cache1, cache2, variant.conv)
    elif variant.compile == "norm" and steady:
        out, new1, new2 = _residual_core(self, x, cache1, cache2, variant.conv, _compiled(_norm_silu, variant))
    else:
        out, new1, new2 = _residual_core(self, x, cache1, cache2, variant.conv)
    feat_cache[idx], feat_cache[idx + 1] = new1, new2
    feat_idx[0] += 2
    return out


def _native_upsample_forward(self, x):
    """WanUpsample.forward without the float32 round trip: nearest-exact copies values, exact in any dtype."""
    return F.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners)


def _phase_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum a 3-tap axis of `weight` into the two taps of each output phase: phase 0 (k0 | k1 + k2), phase 1
    (k0 + k1 | k2); the phases form a new leading axis. Plain tensor ops: no host-to-device copy, so it can run
    inside a captured CUDA graph."""
    k0, k1, k2 = weight.unbind(dim)
    return torch.stack([torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)])


def _subpixel_eligible(resample) -> bool:
    up, conv = resample[0], resample[1]
    return (
        up.mode in ("nearest", "nearest-exact")
        and up.size is None
        and tuple(float(f) for f in up.scale_factor) == (2.0, 2.0)
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
    )


def _subpixel_forward(resample, x: torch.Tensor) -> torch.Tensor:
    """Sequential(nearest 2x upsample, 3x3 conv) on x [N, C, h, w] as one 2x2 conv with the four phases' kernels
    stacked on the outputs, interleaved into [N, C_out, 2h, 2w] (channels_last)."""
    conv = resample[1]
    n, _, h, w = x.shape
    cout = conv.out_channels
    rows = _phase_taps(conv.weight.float(), 2)  # [a, Cout, C, 2, 3]
    kernel = _phase_taps(rows, 4).transpose(0, 1)  # [a, b, Cout, C, 2, 2]: float32 sums, then one cast
    kernel = kernel.reshape(4 * cout, -1, 2, 2).to(x.dtype).contiguous(memory_format=torch.channels_last)
    bias = None if conv.bias is None else conv.bias.to(x.dtype).repeat(4)
    phases = F.conv2d(x, kernel, bias, 1, 1)  # [N, 4*Cout, h+1, w+1]
    phases = phases.permute(0, 2, 3, 1).unflatten(-1, (2, 2, cout))  # [N, h+1, w+1, a, b, Cout]
    out = x.new_empty(n, h, 2, w, 2, cout)  # memory of [N, 2h, 2w, Cout]
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a, :, b] = phases[:, a : a + h, b : b + w, a, b]
    return out.view(n, 2 * h, 2 * w, cout).permute(0, 3, 1, 2)


def _bind(fn, module, **kwargs):
    def forward(*args, **kw):
        return fn(module, *args, **kwargs, **kw)

    return forward


@contextlib.contextmanager
def _patched(decoder: torch.nn.Module, variant: DecodeVariant = BASE):
    """Swap the forward of the decoder's causal convs and RMS norms (and, per the variant, residual blocks and
    upsamplers): instance attributes, removed afterwards."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (
        WanCausalConv3d,
        WanResample,
        WanResidualBlock,
        WanRMS_norm,
        WanUpsample,
    )

    patched = []
    for m in decoder.modules():
        if isinstance(m, WanCausalConv3d):
            m.forward = _bind(_causal_conv, m, impl=variant.conv)
        elif isinstance(m, WanRMS_norm):
            m.forward = types.MethodType(_rms_norm_forward, m)
        elif isinstance(m, WanResidualBlock) and variant.compile:
            m.forward = _bind(_residual_block_forward, m, variant=variant)
        elif isinstance(m, WanUpsample) and variant.native_upsample:
            m.forward = types.MethodType(_native_upsample_forward, m)
        elif (
            isinstance(m, WanResample)
            and variant.subpixel
            and m.mode in ("upsample2d", "upsample3d")
            and _subpixel_eligible(m.resample)
        ):
            m = m.resample  # the Sequential(upsample, conv) of the upsampler
            m.forward = _bind(_subpixel_forward, m)
        else:
            continue
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# ---- the chunked decode --------------------------------------------------------------------------------------


class _CacheSlots(list):
    """The decoder's feat_cache list. Once `static`, assigning a tensor of the slot's shape copies it into the
    slot's tensor instead of replacing it, so a captured CUDA graph reads and updates the same buffers every replay
    (every assignment comes after the conv read the old cache, so the in-place update is safe)."""

    static = False

    def __setitem__(self, index, value):
        current = list.__getitem__(self, index)
        if (
            self.static
            and isinstance(current, torch.Tensor)
            and isinstance(value, torch.Tensor)
            and current.shape == value.shape
            and current.dtype == value.dtype
        ):
            current.copy_(value)
        else:
            list.__setitem__(self, index, value)


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


# the chunk from which on a CUDA graph is captured: chunk 1 reads the first chunk's one-frame caches, chunk 2 is the
# first with steady shapes (and compiles them when compiling), chunk 3 is captured and replayed
_CAPTURE_CHUNK = 3


@torch.no_grad()
def decode_chunks(
    vae, z: torch.Tensor, *, chunk: int | None = None, channels_last: bool = False, variant: DecodeVariant = BASE
):
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
    cache = vae._feat_map = _CacheSlots(vae._feat_map)
    graph = None
    produced = 0
    try:
        with _patched(decoder, variant):
            x = _causal_conv(vae.post_quant_conv, z, None, variant.conv)
            start, index = 0, 0
            while start < frames:
                n = 1 if start == 0 else min(chunk, frames - start)
                piece_in = x[:, :, start : start + n]
                if variant.cuda_graph and index >= _CAPTURE_CHUNK and n == chunk:
                    cache.static = True  # from here on the caches are the graph's buffers
                    if graph is None and z.is_cuda:
                        graph = _capture(decoder, vae, piece_in, cache)
                if graph is not None and n == chunk:
                    static_in, static_out, cuda_graph = graph
                    static_in.copy_(piece_in)
                    cuda_graph.replay()
                    piece = static_out.clone()  # the next replay overwrites static_out
                else:
                    vae._conv_idx = [0]
                    piece = decoder(piece_in, feat_cache=cache, feat_idx=vae._conv_idx, first_chunk=start == 0)
                produced += piece.shape[2]
                yield piece
                start += n
                index += 1
    finally:
        graph = None
        vae.clear_cache()
    expected = decoded_frames(vae, frames)
    if produced != expected:
        raise RuntimeError(f"VAE decode produced {produced} frames, expected {expected}")


def _capture(decoder, vae, piece_in: torch.Tensor, cache: _CacheSlots):
    """Capture one steady chunk of the decoder as a CUDA graph (not run: the caller replays it)."""
    static_in = piece_in.clone()
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        vae._conv_idx = [0]
        static_out = decoder(static_in, feat_cache=cache, feat_idx=vae._conv_idx, first_chunk=False)
    return static_in, static_out, cuda_graph


def decoded_frames(vae, latent_frames: int) -> int:
    """F = 1 + (T' - 1) * s_t: the first latent frame decodes to 1 frame, each later one to s_t = 2^(temporal
    halvings) frames (4 for the Wan VAE)."""
    return 1 + (latent_frames - 1) * 2 ** sum(vae.config.temperal_downsample)


@torch.no_grad()
def fast_decode(
    vae, z: torch.Tensor, *, chunk: int | None = None, channels_last: bool = False, variant: DecodeVariant = BASE
) -> torch.Tensor:
    """z [B, z_dim, T, h, w] (already un-normalised, in the VAE's dtype) -> video [B, 3, F, H, W] clamped to [-1, 1]."""
    if not _fast_path(vae):
        return vae.decode(z, return_dict=False)[0].clamp_(-1.0, 1.0)
    out, pos = None, 0
    for piece in decode_chunks(vae, z, chunk=chunk, channels_last=channels_last, variant=variant):
        if out is None:  # one preallocated output instead of re-concatenating
            out = piece.new_empty(*piece.shape[:2], decoded_frames(vae, z.shape[2]), *piece.shape[3:])
        out[:, :, pos : pos + piece.shape[2]] = piece
        pos += piece.shape[2]
    return out.clamp_(-1.0, 1.0)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] on the video's device: round((clamp(v) + 1) * 127.5)."""
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video[0].permute(1, 2, 3, 0).contiguous()


def host_frames(pieces: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
    """Decoded pieces -> uint8 frames [n, H, W, 3] on the host, in order. On CUDA each piece is converted on the
    GPU and copied into pinned memory without waiting; it is handed over only after the next piece has been queued,
    so the GPU never idles while the host takes a piece (the consumer gets each piece one chunk later)."""
    pending: tuple | None = None
    for piece in pieces:
        frames = to_uint8_frames(piece)
        if frames.is_cuda:
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = frames, None
        if pending is not None:
            yield _ready(*pending)
        pending = (host, done)
    if pending is not None:
        yield _ready(*pending)


def _ready(host: torch.Tensor, done) -> np.ndarray:
    if done is not None:
        done.synchronize()
    return host.numpy()


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

"""TurboDiffusion T2V / I2V on diffusers components: explicit parts in, one __call__ out.

The pipeline owns no global state; `loading.load_pipeline` builds one from a model cache directory and a
function keeps it for the life of its pod (text encoder, DiT and VAE stay loaded between requests). Architecture
facts (latent geometry, experts, conditioning, fps, text length) come from the model family's spec
(engine/families); `kind` is the task (t2v | i2v) the pipeline serves.
"""

from __future__ import annotations

import collections
import contextlib
import random
import time
from collections.abc import Callable

import numpy as np
import torch

from turboflow.errors import InvalidRequestError, OutOfMemoryError

from . import families
from .families import FamilySpec
from .prompt import clean_prompt
from .request import SEED_MAX, GenerationRequest, GenerationResult, ValidatedRequest
from .sampler import rcm_sample

Progress = Callable[[int, int], None]  # (rCM steps done, steps)
# (stage, done, total) for every stage: text_encode and vae_encode count 0..1, diffusion counts rCM steps,
# vae_decode counts decoded video frames (it reports after each decoded chunk)
StageProgress = Callable[[str, int, int], None]
FrameSink = Callable[[np.ndarray], None]  # gets uint8 frames [n, H, W, 3] in order as they are decoded


def pick_seed(seed: int | None) -> int:
    """The request's seed, or a random one in [0, 2^63-1] when it has none (0 is a seed like any other)."""
    return random.SystemRandom().randint(0, SEED_MAX) if seed is None else seed


def same_device(placed: torch.device, wanted: torch.device) -> bool:
    """Whether a tensor on `placed` is on `wanted`. A device without an index ("cuda") stands for any of its type:
    torch places tensors on "cuda:0", never on "cuda", so the two never compare equal with ==."""
    return placed.type == wanted.type and (wanted.index is None or placed.index in (None, wanted.index))


def on_device(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether the module's parameters live on `device` (an expert parked on the host does not)."""
    return same_device(next(module.parameters()).device, device)


class _Stopwatch:
    def __init__(self, device: torch.device):
        self.device, self.timings = device, {}

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _ExpertSwap:
    """Moves an I2V expert between the GPU and a pinned host copy made once.

    Weights never change, so parking an expert only drops its GPU tensors (no device-to-host copy), and bringing it
    back is one pinned host-to-device copy per tensor (~25 GB/s instead of the few GB/s a pageable `.to()` gets:
    a 14B expert moves in about a second, not tens of seconds).
    """

    @staticmethod
    def _tensors(module):
        yield from module.parameters()
        yield from module.buffers()

    @classmethod
    def park(cls, module) -> None:
        for t in cls._tensors(module):
            host = getattr(t, "_turboflow_host", None)
            if host is None:
                host = torch.empty_like(t.data, device="cpu", pin_memory=True).copy_(t.data)
                t._turboflow_host = host
            t.data = host

    @classmethod
    def bring(cls, module, device: torch.device) -> None:
        for t in cls._tensors(module):
            if t.device != device:
                if getattr(t, "_turboflow_host", None) is None and t.device.type == "cpu":
                    t._turboflow_host = t.data.pin_memory()
                t.data = t.data.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


class TurboVideoPipeline:
    """rCM few-step text/image-to-video. With a two-expert family (Wan2.2), `transformer_2` (the low-noise expert)
    is used for steps with t < boundary.

    offload: "none" keeps every network on `device`; "experts" keeps only the expert in use on the device and moves
    the other to CPU (upstream TurboDiffusion's behaviour, for cards that cannot hold both A14B experts).
    """

    def __init__(
        self,
        *,
        kind: str,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        transformer_2=None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
        model_name: str = "unknown",
        defaults: dict | None = None,
        offload: str = "none",
        sla_proj_l: dict[str, dict] | None = None,
        fast_vae: bool = False,
        vae_chunk: int | None = None,
        vae_variant=None,
        prompt_cache: int = 0,
        sla_pooling: str = "input",
        sla_backend: str = "auto",
        family: str | FamilySpec | None = None,
    ):
        if kind not in families.TASKS:
            raise ValueError(f"kind must be t2v or i2v, got {kind!r}")
        spec = (
            family
            if isinstance(family, FamilySpec)
            else families.family(family)
            if family is not None
            else families.family_for_kind(kind)
        )
        if kind not in spec.tasks:
            raise ValueError(f"family {spec.name} serves {'/'.join(spec.tasks)}, not {kind}")
        for net in (transformer, transformer_2):
            if net is not None and net.config.in_channels != spec.in_channels:
                raise ValueError(
                    f"{kind.upper()} transformer needs {spec.in_channels} input channels, has {net.config.in_channels}"
                )
        if (transformer_2 is not None) != (len(spec.experts) == 2):
            raise ValueError(f"family {spec.name} runs {len(spec.experts)} DiT expert(s): {spec.transformer_roles}")
        if offload not in ("none", "experts"):
            raise ValueError(f"offload must be 'none' or 'experts', got {offload!r}")
        from .sla import POOLING_MODES

        if sla_pooling not in POOLING_MODES:
            raise ValueError(f"sla_pooling must be one of {list(POOLING_MODES)}, got {sla_pooling!r}")
        self.kind, self.family, self.model_name, self.defaults = kind, spec, model_name, dict(defaults or {})
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.vae_dtype = vae_dtype or dtype
        self.offload = offload
        # SLA's fine-tuned proj_l weights per network role ("transformer", "transformer_2"); empty if none shipped
        self.sla_proj_l = dict(sla_proj_l or {})
        # SLA block selection rounding (engine.sla.POOLING_MODES): "input" as upstream, "fp32" to compare
        self.sla_pooling = sla_pooling
        # SLA's sparse-branch kernels (engine.sla.BACKENDS): "auto" picks Triton on CUDA
        self.sla_backend = sla_backend
        self._attention: tuple = ("original", 0.0)
        # engine.vae_decode.fast_decode (chunked causal decode, fused padding/norm) instead of diffusers' per-frame loop
        self.fast_vae, self.vae_chunk = fast_vae, vae_chunk
        # how the fast decode runs (engine.vae_decode.DecodeVariant; None: the base variant)
        self.vae_variant = vae_variant
        # text embeddings of recent prompts, least recently used first: a repeated prompt skips the text encoder
        # (umT5-xxl: ~0.05 s on an H200, seconds on a CPU) for ~4 MB of device memory per prompt kept
        self.prompt_cache_size = prompt_cache
        self._prompt_cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        # the VAE must compress as the family says: stride (t, h, w) = (2^halvings in time, 2^stages, 2^stages)
        vae_stride = (2 ** sum(vae.config.temperal_downsample), *(2 ** len(vae.config.temperal_downsample),) * 2)
        if (vae.config.z_dim, vae_stride) != (spec.latent.channels, spec.latent.stride):
            raise ValueError(
                f"VAE has {vae.config.z_dim} latent channels and stride {vae_stride}; family {spec.name} "
                f"needs {spec.latent.channels} and {spec.latent.stride}"
            )
        self.temporal_factor, self.spatial_factor = spec.latent.stride[:2]
        self.latent_channels = spec.latent.channels
        self.latents_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        for m in self._networks():
            m.eval().requires_grad_(False)

    def _networks(self):
        return [m for m in (self.transformer, self.transformer_2, self.vae, self.text_encoder) if m is not None]

    # ---- stages -----------------------------------------------------------------------------------------
    @property
    def fps(self) -> int:
        """Frames per second of the videos this model makes (its family's)."""
        return self.family.fps

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings [1, L, D] of the cleaned prompt (engine.prompt.clean_prompt, as upstream), L the family's
        text length (umT5's 512 for Wan); positions past the prompt's tokens are zero, as in Wan.

        The last `prompt_cache_size` prompts' embeddings are kept (keyed by the cleaned text, which is all the
        encoder sees): the encoder is deterministic, so a hit returns exactly what encoding again would."""
        text = clean_prompt(prompt)
        cached = self._prompt_cache.get(text)
        if cached is not None:
            self._prompt_cache.move_to_end(text)
            return cached
        embeddings = self._encode_text(text)
        if self.prompt_cache_size > 0:
            self._prompt_cache[text] = embeddings
            while len(self._prompt_cache) > self.prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        return embeddings

    def _encode_text(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(
            [text],
            padding="max_length",
            max_length=self.family.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return hidden.to(self.dtype)

    @torch.no_grad()
    def encode_image(self, image, width: int, height: int, num_frames: int) -> torch.Tensor:
        """The family's image condition for the DiT input (Wan2.2: engine.families.wan.image_condition)."""
        if self.family.conditioning is None:
            raise ValueError(f"family {self.family.name} takes no image conditioning")
        return self.family.conditioning(self, image, width, height, num_frames)

    @staticmethod
    def _to_frames(video: torch.Tensor) -> np.ndarray:
        """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] on the host."""
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return video[0].permute(1, 2, 3, 0).cpu().numpy()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frame_sink: FrameSink | None = None) -> np.ndarray:
        """Latents -> uint8 frames [F, H, W, 3]; `frame_sink` also gets them piece by piece, in order, while the
        rest decodes (per chunk with the fast decode, all at once with diffusers')."""
        z = latents.float() * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)
        if self.fast_vae:
            from .vae_decode import BASE, decode_chunks, host_frames

            pieces: list[np.ndarray] = []
            # the chunks have fixed shapes: cuDNN's algorithm search pays off here (only here: I2V encodes
            # arbitrary sizes, and the search's workspaces inflate peak memory elsewhere)
            benchmark = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = self.device.type == "cuda"
            try:
                # to the host per chunk (nothing assembled on the GPU), one chunk behind: each chunk's copy overlaps
                # the next chunk's decode instead of stalling the GPU
                for frames in host_frames(
                    decode_chunks(
                        self.vae,
                        z.to(self.vae_dtype),
                        chunk=self.vae_chunk,
                        channels_last=self.device.type == "cuda",
                        variant=self.vae_variant or BASE,
                    )
                ):
                    pieces.append(frames)
                    if frame_sink is not None:
                        frame_sink(frames)
            finally:
                torch.backends.cudnn.benchmark = benchmark
            return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        video = self.vae.decode(z.to(self.vae_dtype), return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
        frames = self._to_frames(video)
        if frame_sink is not None:
            frame_sink(frames)
        return frames

    def use_attention(self, attention: str, topk: float) -> None:
        """Swap the DiT self-attention processors when a request asks for another attention than the last."""
        from .sla import set_attention

        wanted = (attention, topk, self.sla_pooling, self.sla_backend) if attention != "original" else ("original", 0.0)
        if wanted == self._attention:
            return
        for role, net in (("transformer", self.transformer), ("transformer_2", self.transformer_2)):
            if net is not None:
                set_attention(
                    net,
                    attention,
                    topk=topk,
                    proj_l=self.sla_proj_l.get(role),
                    pooling=self.sla_pooling,
                    backend=self.sla_backend,
                )
        self._attention = wanted

    def _use(self, expert: str):
        """The network for this step, moved onto the device under the 'experts' offload policy."""
        net, other = (
            (self.transformer, self.transformer_2)
            if self.family.role_of(expert) == "transformer"
            else (self.transformer_2, self.transformer)
        )
        if self.offload == "experts" and self.device.type != "cpu":
            if other is not None:
                _ExpertSwap.park(other)
            _ExpertSwap.bring(net, self.device)
        return net

    # ---- the call -----------------------------------------------------------------------------------------
    def request(self, prompt: str, **fields) -> ValidatedRequest:
        """A validated request for this model: its kind, its manifest defaults (resolution, attention, ...) under
        the given fields."""
        return GenerationRequest(prompt=prompt, **{"kind": self.kind, **fields}).validated(self.family, self.defaults)

    def __call__(
        self,
        request: ValidatedRequest,
        progress: Progress | None = None,
        frame_sink: FrameSink | None = None,
        stage_progress: StageProgress | None = None,
    ) -> GenerationResult:
        """Generate one video. `progress` gets the rCM steps; `stage_progress` gets every stage (StageProgress).

        `request` comes from the one validation step (`GenerationRequest.validated`, `parse_request`,
        `self.request`): nothing is checked or decoded again here."""
        if not isinstance(request, ValidatedRequest):
            raise TypeError(
                "the pipeline takes a ValidatedRequest (from GenerationRequest.validated), "
                f"not {type(request).__name__}"
            )
        if request.image_pending:
            raise TypeError("the request's image is not fetched yet: complete it with with_image(bytes)")
        if request.family.name != self.family.name:
            raise TypeError(f"the request was validated for family {request.family.name}, this is {self.family.name}")
        if request.request.kind != self.kind:
            raise InvalidRequestError(
                f"this is a {self.kind} model; it cannot serve a {request.request.kind} request",
                code="wrong_model_kind",
                field="kind",
            )
        req = request
        try:
            return self._generate(req, progress, frame_sink, stage_progress)
        except torch.OutOfMemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"out of device memory for {req.request.resolution} x {req.request.num_frames} frames: "
                f"{str(e).splitlines()[0]}"
            ) from e

    @torch.no_grad()
    def _generate(
        self,
        validated: ValidatedRequest,
        progress: Progress | None,
        frame_sink: FrameSink | None = None,
        stage_progress: StageProgress | None = None,
    ) -> GenerationResult:
        req, (width, height) = validated.request, validated.size
        seed = pick_seed(req.seed)
        report = stage_progress or (lambda stage, done, total: None)
        clock = _Stopwatch(self.device)
        shape = self.family.latent.latent_shape(req.num_frames, width, height)

        report("text_encode", 0, 1)
        with clock.stage("text_encode"):
            context = self.encode_prompt(req.prompt)
        report("text_encode", 1, 1)
        condition = None
        if self.family.conditioning is not None:
            report("vae_encode", 0, 1)
            with clock.stage("vae_encode"):
                condition = self.encode_image(req.image, width, height, req.num_frames)
            report("vae_encode", 1, 1)

        experts: list[str] = []
        ones = torch.ones(shape[0], device=self.device)
        self.use_attention(req.attention, req.sla_topk)

        def denoise(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
            expert = self.family.expert_for(t, req.boundary)
            experts.append(expert)
            net = self._use(expert)
            model_in = x.to(self.dtype)
            if condition is not None:
                model_in = torch.cat([model_in, condition], dim=1)
            # upstream passes t*1000 in the model dtype (bf16 on GPU rounds it); do the same
            timestep = (ones * (t * 1000.0)).to(self.dtype)
            return net(hidden_states=model_in, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]

        def step_done(step: int, total: int) -> None:
            report("diffusion", step, total)
            if progress is not None:
                progress(step, total)

        decoded = 0

        def chunk_decoded(frames: np.ndarray) -> None:
            nonlocal decoded
            decoded += len(frames)
            report("vae_decode", decoded, req.num_frames)
            if frame_sink is not None:
                frame_sink(frames)

        generator = torch.Generator(device=self.device).manual_seed(seed)  # upstream: manual_seed(args.seed)
        report("diffusion", 0, req.num_steps)
        with clock.stage("diffusion"):
            latents = rcm_sample(
                denoise,
                shape,
                num_steps=req.num_steps,
                sigma_max=req.sigma_max,
                generator=generator,
                device=self.device,
                ode=req.ode,
                progress=step_done,
            )
        report("vae_decode", 0, req.num_frames)
        with clock.stage("vae_decode"):
            frames = self.decode(latents, chunk_decoded)
        return GenerationResult(
            frames=frames,
            seed=seed,
            width=width,
            height=height,
            num_frames=req.num_frames,
            num_steps=req.num_steps,
            sigma_max=req.sigma_max,
            model=self.model_name,
            fps=self.family.fps,
            timings=clock.timings,
            experts=experts,
            attention=req.attention,
            sla_topk=req.sla_topk if req.attention != "original" else None,
        )

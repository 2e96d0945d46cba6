"""Plain diffusers on the same modules and shapes as turboflow: WanPipeline's calls with guidance off."""

from __future__ import annotations

import statistics

import torch

from .models import Spec


def _median(xs):
    return statistics.median(xs) if xs else None


def run_baseline(pipe, spec: Spec, clock, prompt: str) -> dict:
    """Plain diffusers, SDPA, on the same modules: WanPipeline's calls with guidance off."""
    from diffusers.video_processor import VideoProcessor

    from turboflow.engine.request import GenerationRequest

    dev, dtype = clock.device, pipe.dtype
    w, h = GenerationRequest(prompt="x", resolution=spec.resolution, aspect_ratio=spec.aspect_ratio).validated().size
    vae = pipe.vae
    sf, tf = pipe.spatial_factor, pipe.temporal_factor
    lat_shape = (1, vae.config.z_dim, (spec.frames - 1) // tf + 1, h // sf, w // sf)
    processor = VideoProcessor(vae_scale_factor=sf)

    def text():  # WanPipeline._get_t5_prompt_embeds (without ftfy cleaning), max_sequence_length 512
        t = pipe.tokenizer(
            [prompt],
            padding="max_length",
            max_length=512,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = t.input_ids, t.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).long()
        e = pipe.text_encoder(ids.to(dev), mask.to(dev)).last_hidden_state.to(dtype=dtype, device=dev)
        e = [u[:v] for u, v in zip(e, seq_lens)]
        return torch.stack([torch.cat([u, u.new_zeros(512 - u.size(0), u.size(1))]) for u in e], dim=0)

    def encode_image():  # WanImageToVideoPipeline.prepare_latents: VAE-encode [image, zeros], argmax
        video = torch.zeros(1, 3, spec.frames, h, w, device=dev, dtype=vae.dtype)
        video[:, :, 0] = torch.rand(1, 3, h, w, device=dev, dtype=vae.dtype) * 2 - 1
        return vae.encode(video).latent_dist.mode()

    def decode(latents):
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        video = vae.decode((latents / std + mean).to(vae.dtype), return_dict=False)[0]
        return processor.postprocess_video(video, output_type="np")

    # stock conditions: an earlier fast-VAE variant turns cudnn.benchmark on process-wide, whose algorithm search
    # inflates the stock decode's peak memory (run 9: 14B baseline peaks 14-28 GB above runs 2-3)
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        return _baseline(pipe, spec, clock, text, encode_image, decode, lat_shape)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _baseline(pipe, spec: Spec, clock, text, encode_image, decode, lat_shape) -> dict:
    from diffusers import UniPCMultistepScheduler

    dev, dtype = clock.device, pipe.dtype
    with torch.no_grad():
        out = {}
        if clock.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        text()
        embeds, out["text_encode_s"] = clock.time(text)  # noqa: E702  (warm, then timed)
        cond = None
        if spec.kind == "i2v":
            _, out["vae_encode_s"] = clock.time(encode_image)
            lat, _ = clock.time(encode_image)
            mask = torch.zeros(1, 4, *lat.shape[2:], device=dev, dtype=lat.dtype)
            mask[:, :, 0] = 1
            cond = torch.cat([mask, lat], 1).to(dtype)
        # the expert that is resident now (ours may have swapped the other to the CPU)
        nets = [
            n
            for n in (pipe.transformer, pipe.transformer_2)
            if n is not None and next(n.parameters()).device.type == dev.type
        ]
        net = nets[0]
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        )
        sched.set_timesteps(spec.warmup_steps + spec.steps, device=dev)
        g = torch.Generator(device=dev).manual_seed(1)
        latents = torch.randn(lat_shape, generator=g, device=dev, dtype=torch.float32)
        steps = []
        for i, t in enumerate(sched.timesteps):

            def step(latents=latents, t=t):
                x = latents.to(dtype)
                if cond is not None:
                    x = torch.cat([x, cond], 1)
                noise_pred = net(
                    hidden_states=x,
                    timestep=t.expand(1),
                    encoder_hidden_states=embeds,
                    attention_kwargs=None,
                    return_dict=False,
                )[0]
                return sched.step(noise_pred, t, latents, return_dict=False)[0]

            latents, s = clock.time(step)
            if i >= spec.warmup_steps:
                steps.append(s)
        decode(latents[:, :, :2])  # warm the decoder kernels on a short clip
        _, out["vae_decode_s"] = clock.time(decode, latents)
        out["steps_s"] = steps
        out["step_median_s"] = _median(steps)
        out["projected_dit_4_steps_s"] = 4 * out["step_median_s"]
        out["projected_total_4_steps_s"] = (
            out["text_encode_s"] + out.get("vae_encode_s", 0.0) + out["vae_decode_s"] + 4 * out["step_median_s"]
        )
        out["total_s"] = out["text_encode_s"] + out.get("vae_encode_s", 0.0) + sum(steps) + out["vae_decode_s"]
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    return out

"""I2V expert placement on one GPU: both A14B-size experts resident vs swapped per request through pinned memory.

    python -m bench.expert_swap --out $OUT      (GPU; random full-size 14B experts, in_channels 36)

Checks that the 'experts' offload policy gives bit-identical frames to resident experts, and times a request
under each policy (the swap cost is the difference).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from . import _ROOT  # noqa: F401  (turboflow namespace on a bare tree)


def _experts(layers: int, dim_heads: int, ffn: int, device):
    from diffusers import WanTransformer3DModel

    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=dim_heads,
        attention_head_dim=128,
        in_channels=36,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 on the device: an fp32 14B expert alone is 57 GB
    try:
        with torch.device(device):
            return [WanTransformer3DModel(**cfg).eval() for _ in range(2)]
    finally:
        torch.set_default_dtype(previous)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/expert_swap")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--frames", type=int, default=17)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    from diffusers import AutoencoderKLWan
    from PIL import Image
    from transformers import UMT5Config, UMT5EncoderModel

    from turboflow.engine.pipeline import TurboVideoPipeline
    from turboflow.engine.request import GenerationRequest
    from turboflow.engine.tiny import _tokenizer

    dev = torch.device("cuda")
    torch.manual_seed(0)
    high, low = _experts(args.layers, args.heads, args.ffn, dev)
    vae = AutoencoderKLWan().to(dev, torch.bfloat16).eval()
    tok_dir = tempfile.mkdtemp()
    vocab = _tokenizer(__import__("pathlib").Path(tok_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    # a 2-layer encoder of umT5-xxl's width: the text stage is not what is measured
    t5 = (
        UMT5EncoderModel(
            UMT5Config(
                vocab_size=vocab,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=2,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        )
        .to(dev, torch.bfloat16)
        .eval()
    )
    image = Image.new("RGB", (832, 480), (120, 80, 200))
    req = GenerationRequest(
        prompt="a cat",
        kind="i2v",
        image=image,
        seed=3,
        num_frames=args.frames,
        aspect_ratio="16:9",
        adaptive_resolution=False,
    ).validated()  # Wan2.2's rules: the pipelines below are built on that family
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "frames": args.frames,
        "expert_params_b": sum(p.numel() for p in high.parameters()) / 1e9,
    }
    frames = {}
    for policy in ("none", "experts"):
        pipe = TurboVideoPipeline(
            kind="i2v",
            transformer=high,
            transformer_2=low,
            vae=vae,
            text_encoder=t5,
            tokenizer=tokenizer,
            device=dev,
            dtype=torch.bfloat16,
            model_name="rand-a14b",
            offload=policy,
        )
        pipe(req)  # warm-up (and, for 'experts', the one-time pinned host copies)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = pipe(req)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        frames[policy] = r.frames
        results[policy] = {
            "request_s": times,
            "diffusion_s": r.timings["diffusion"],
            "experts": r.experts,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        }
        torch.cuda.reset_peak_memory_stats()
    results["identical_frames"] = bool((frames["none"] == frames["experts"]).all())
    results["swap_cost_s"] = min(results["experts"]["request_s"]) - min(results["none"]["request_s"])
    with open(os.path.join(args.out, "expert_swap.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

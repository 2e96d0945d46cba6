"""Issue 7 optimisations at Wan2.1-1.3B 480p 81-frame shapes, random weights: the SLA attention op (with a breakdown),
a DiT step with original / SLA / SLA+fp8 / SLA+int8 / +compile, and VAE decode (stock fp32 / bf16 vs fast decode)
with PSNR against fp32 and peak memory per configuration.

    python -m bench.perf_opts --out $OUT          (GPU)
    python -m bench.perf_opts --tiny --out out/p  (CPU smoke test, tiny shapes)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

from . import _ROOT  # noqa: F401

RES: dict = {}
OUT = "out/perf"


def _save():
    with open(os.path.join(OUT, "perf_opts.json"), "w") as fh:
        json.dump(RES, fh, indent=2)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, reps=5, warm=2):
    for _ in range(warm):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _peak_reset():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


def _record(name, fn, **kw):
    try:
        _peak_reset()
        RES[name + "_s"] = _time(fn, **kw)
        RES[name + "_peak_gb"] = round(_peak_gb(), 3)
    except Exception as e:  # keep measuring the rest
        RES[name + "_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(name, {k: v for k, v in RES.items() if k.startswith(name)}, flush=True)
    _save()


def attention_op(dev, tiny):
    from turboflow.engine import sla

    heads, length = (2, 1000) if tiny else (12, 32760)
    dt = torch.bfloat16
    q, k, v = (torch.randn(1, heads, length, 128, device=dev, dtype=dt) for _ in range(3))
    w = torch.randn(128, 128, device=dev) * 0.05
    _record("attn_dense_sdpa", lambda: F.scaled_dot_product_attention(q, k, v), reps=10)
    backend = "flex" if dev.type == "cuda" else "gather"
    for topk in (0.05, 0.1, 0.2):
        _record(
            f"attn_sla_topk{topk}",
            lambda: sla.sla_attention(q, k, v, topk=topk, proj_weight=w, backend=backend),
            reps=10,
        )
    # breakdown at 0.1
    _record("attn_part_select_blocks", lambda: sla.select_blocks(q, k, 0.1), reps=10)
    _record("attn_part_linear_branch", lambda: sla._project(sla._linear_branch(q, k, v), w, None), reps=10)
    if dev.type == "cuda":
        lut = sla.select_blocks(q, k, 0.1)
        _record("attn_part_flex_sparse", lambda: sla._sparse_flex(q, k, v, lut, sla.BLK_Q, sla.BLK_K), reps=10)
        # the whole op compiled as one graph (what a compiled DiT block gets)
        whole = torch.compile(lambda q, k, v: sla.sla_attention(q, k, v, topk=0.1, proj_weight=w), dynamic=False)
        _record("attn_sla_topk0.1_compiled", lambda: whole(q, k, v), reps=10)
        try:
            n = 4000
            qs, ks, vs = (t[:, :4, :n].float() for t in (q, k, v))
            ref = sla.sla_reference(qs.double(), ks.double(), vs.double(), topk=0.1, proj_weight=w.double())
            lut64 = sla.select_blocks(qs.double(), ks.double(), 0.1)
            # same block choice as the fp64 reference, flex kernel in fp32: isolates kernel error from tie-breaks
            sp = sla._sparse_flex(qs, ks, vs, lut64, sla.BLK_Q, sla.BLK_K).double()
            o_l = sla._project(sla._linear_branch(qs.double(), ks.double(), vs.double()), w.double(), None)
            RES["flex_fp32_vs_fp64_reference_rel_err"] = float(((sp + o_l) - ref).norm() / ref.norm())
        except Exception as e:
            RES["flex_check_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    del q, k, v
    _save()


def dit(dev, tiny):
    from diffusers import WanTransformer3DModel

    from turboflow.engine.compiled import compile_transformer
    from turboflow.engine.linear import quantize_transformer
    from turboflow.engine.sla import set_attention

    bf16 = torch.bfloat16
    cfg = (
        dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, num_layers=2)
        if tiny
        else dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
    )
    torch.manual_seed(0)
    torch.set_default_dtype(bf16)
    with torch.device(dev):
        net = WanTransformer3DModel(in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, **cfg).eval()
    torch.set_default_dtype(torch.float32)
    shape = (1, 16, 3, 8, 8) if tiny else (1, 16, 21, 60, 104)
    x = torch.randn(*shape, device=dev, dtype=bf16)
    ctx = torch.randn(1, 512, 4096, device=dev, dtype=bf16)
    t = torch.tensor([987.0], device=dev, dtype=bf16)
    proj = {f"blocks.{i}.proj_l.weight": torch.randn(128, 128, device=dev) * 0.02 for i in range(len(net.blocks))}

    def fwd(n=None):
        return (n or net)(x, t, ctx, return_dict=False)[0]

    def weights_gb(n):
        return sum(p.numel() * p.element_size() for p in list(n.parameters()) + list(n.buffers())) / 1e9

    reps = 2 if tiny else 5
    with torch.no_grad():
        RES["dit_weights_bf16_gb"] = weights_gb(net)
        _record("dit_original", fwd, reps=reps)
        ref = fwd().float()
        set_attention(net, "sla", topk=0.1, proj_l=proj)
        _record("dit_sla0.1", fwd, reps=reps)
        sla_ref = fwd().float()
        RES["dit_sla0.1_vs_original_rel"] = float((sla_ref - ref).norm() / ref.norm())
        for mode in ("int8", "fp8"):
            q = copy.deepcopy(net) if mode == "int8" else net
            quantize_transformer(q, mode)
            set_attention(q, "sla", topk=0.1, proj_l=proj)
            RES[f"dit_weights_{mode}_gb"] = weights_gb(q)
            _record(f"dit_sla0.1_{mode}", lambda: fwd(q), reps=reps)
            RES[f"dit_sla0.1_{mode}_vs_sla_bf16_rel"] = float((fwd(q).float() - sla_ref).norm() / sla_ref.norm())
            if mode == "int8":
                del q
        if dev.type == "cuda":
            t0 = time.perf_counter()
            compile_transformer(net)
            fwd()
            _sync()
            RES["dit_compile_first_call_s"] = time.perf_counter() - t0
            _record("dit_sla0.1_fp8_compiled", fwd, reps=reps)
            RES["dit_sla0.1_fp8_compiled_vs_sla_bf16_rel"] = float((fwd().float() - sla_ref).norm() / sla_ref.norm())
            set_attention(net, "sla", topk=0.05, proj_l=proj)
            _record("dit_sla0.05_fp8_compiled", fwd, reps=reps)
    del net
    _save()


def dit2(dev, tiny):
    """Each optimisation's contribution, with and without compile (run 8)."""
    from diffusers import WanTransformer3DModel

    from turboflow.engine.compiled import compile_transformer
    from turboflow.engine.linear import quantize_transformer
    from turboflow.engine.sla import set_attention

    bf16 = torch.bfloat16
    cfg = (
        dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, num_layers=2)
        if tiny
        else dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
    )
    torch.manual_seed(0)
    torch.set_default_dtype(bf16)
    with torch.device(dev):
        net = WanTransformer3DModel(in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, **cfg).eval()
    torch.set_default_dtype(torch.float32)
    shape = (1, 16, 3, 8, 8) if tiny else (1, 16, 21, 60, 104)
    x = torch.randn(*shape, device=dev, dtype=bf16)
    ctx = torch.randn(1, 512, 4096, device=dev, dtype=bf16)
    t = torch.tensor([987.0], device=dev, dtype=bf16)
    proj = {f"blocks.{i}.proj_l.weight": torch.randn(128, 128, device=dev) * 0.02 for i in range(len(net.blocks))}
    reps = 2 if tiny else 5
    nets = {"bf16": net}
    with torch.no_grad():
        for mode in ("fp8", "int8"):
            nets[mode] = copy.deepcopy(net)
            quantize_transformer(nets[mode], mode)
        ref = None
        for name, n in nets.items():
            for attn in ("original", "sla"):
                if attn == "original" and name != "bf16":
                    continue
                set_attention(n, attn, topk=0.1, proj_l=proj)
                tag = f"d2_{attn}_{name}_eager"
                _record(tag, lambda: n(x, t, ctx, return_dict=False), reps=reps)
                out = n(x, t, ctx, return_dict=False)[0].float()
                if attn == "sla" and name == "bf16":
                    ref = out
                elif ref is not None:
                    RES[tag + "_vs_sla_bf16_rel"] = float((out - ref).norm() / ref.norm())
        if dev.type == "cuda":
            for name, n in nets.items():
                compile_transformer(n)
                for attn in ("original", "sla") if name == "bf16" else ("sla",):
                    set_attention(n, attn, topk=0.1, proj_l=proj)
                    t0 = time.perf_counter()
                    out = n(x, t, ctx, return_dict=False)[0].float()
                    _sync()
                    tag = f"d2_{attn}_{name}_compiled"
                    RES[tag + "_first_call_s"] = time.perf_counter() - t0
                    if attn == "sla":
                        RES[tag + "_vs_sla_bf16_rel"] = float((out - ref).norm() / ref.norm())
                    _record(tag, lambda: n(x, t, ctx, return_dict=False), reps=reps)
    _save()


def vae(dev, tiny):
    from diffusers import AutoencoderKLWan

    from turboflow.engine.families.wan import TINY_VAE
    from turboflow.engine.vae_decode import fast_decode, psnr, to_channels_last

    torch.manual_seed(0)
    with torch.device(dev):
        vae32 = (AutoencoderKLWan(**TINY_VAE) if tiny else AutoencoderKLWan()).eval()
    z = torch.randn(1, 16, 3 if tiny else 21, 6 if tiny else 60, 10 if tiny else 104, device=dev)
    reps = 1 if tiny else 3
    with torch.no_grad():
        ref = vae32.decode(z, return_dict=False)[0]
        RES["vae_ref_std"] = float(ref.float().std())
        _record("vae_stock_fp32", lambda: vae32.decode(z, return_dict=False), reps=reps, warm=1)
        _record("vae_fast_fp32_c4", lambda: fast_decode(vae32, z, chunk=4), reps=reps, warm=1)
        RES["vae_fast_fp32_c4_psnr"] = psnr(fast_decode(vae32, z, chunk=4), ref)
        vae16 = copy.deepcopy(vae32).to(torch.bfloat16)
        del vae32
        z16 = z.to(torch.bfloat16)
        _record("vae_stock_bf16", lambda: vae16.decode(z16, return_dict=False), reps=reps, warm=1)
        RES["vae_stock_bf16_psnr"] = psnr(vae16.decode(z16, return_dict=False)[0], ref)
        torch.backends.cudnn.benchmark = True
        for chunk in (1, 2, 4, 10):
            name = f"vae_fast_bf16_c{chunk}"
            _record(name, lambda: fast_decode(vae16, z16, chunk=chunk), reps=reps, warm=1)
            RES[name + "_psnr"] = psnr(fast_decode(vae16, z16, chunk=chunk), ref)
        to_channels_last(vae16)
        _record(
            "vae_fast_bf16_c4_channels_last",
            lambda: fast_decode(vae16, z16, chunk=4, channels_last=True),
            reps=reps,
            warm=1,
        )
        RES["vae_fast_bf16_c4_channels_last_psnr"] = psnr(fast_decode(vae16, z16, chunk=4, channels_last=True), ref)
        torch.backends.cudnn.benchmark = False
    _save()


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/perf")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--parts", default="attn,vae,dit")
    args = ap.parse_args()
    OUT = args.out
    os.makedirs(OUT, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    RES.update(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__)
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            {"attn": attention_op, "dit": dit, "dit2": dit2, "vae": vae}[part](dev, args.tiny)
        except Exception as e:
            RES[f"{part}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
            import traceback

            traceback.print_exc()
        RES[f"{part}_wall_s"] = time.perf_counter() - t0
        _save()
    print(json.dumps(RES, indent=1))


if __name__ == "__main__":
    main()

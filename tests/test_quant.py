"""TurboDiffusion `-quant.pth` format: int8 weights with 128x128 block-wise fp32 scales (w = q * scale)."""

from __future__ import annotations

import pytest
import torch
from native_export import diffusers_dit_to_wan, quantize_state_dict

from turboflow.engine import checkpoint as ck
from turboflow.engine import quant
from turboflow.errors import CheckpointError


def _tile_reference_dequant(q, scale, block=128):
    """Loop over tiles: scale[r, c] belongs to rows r*128.. and columns c*128.. (edge tiles are smaller)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            rows, cols = slice(r * block, (r + 1) * block), slice(c * block, (c + 1) * block)
            out[rows, cols] = q[rows, cols].float() * scale[r, c]
    return out


def test_hand_computed_tile():
    w = torch.tensor([[1.0, -0.5], [0.25, 0.0]])
    q, s = quant.quantize_blockwise(w)
    assert s.shape == (1, 1) and s.dtype == torch.float32 and s.item() == 1.0 / 128
    assert q.dtype == torch.int8
    assert q.tolist() == [[127, -64], [32, 0]]  # 1.0 * 128 saturates to 127, like the CUDA kernel's cvt.sat
    assert quant.dequantize_blockwise(q, s, torch.float32).tolist() == [[127 / 128, -0.5], [0.25, 0.0]]
    q, _ = quant.quantize_blockwise(torch.tensor([[-1.0, 0.5]]))
    assert q.tolist() == [[-128, 64]]
    q, s = quant.quantize_blockwise(torch.zeros(3, 3))  # amax floor 1e-8: no division by zero
    assert q.abs().sum() == 0 and s.item() == pytest.approx(1e-8 / 128)


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (17, 129), (1536, 8960 // 35)])
def test_blockwise_layout_and_error_bound(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 0.02
    w[: min(128, shape[0]), : min(128, shape[1])] *= 40  # one loud tile: per-tile scales must not leak across
    q, s = quant.quantize_blockwise(w)
    assert s.shape == ((shape[0] + 127) // 128, (shape[1] + 127) // 128) == quant.scale_shape(*shape)
    deq = quant.dequantize_blockwise(q, s, torch.float32)
    assert torch.equal(deq, _tile_reference_dequant(q, s))  # exact format math, right orientation
    step = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    err = (deq - w).abs()
    # round-to-nearest: within half a step, except a tile's +amax element, which saturates 128 -> 127 (one step)
    assert (err[q != 127] <= step[q != 127] / 2 * (1 + 1e-5)).all()
    assert (err <= step * (1 + 1e-5)).all()
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < 1e-2, rel
    if s.shape[0] > 1:  # the quiet tiles got their own, ~40x finer, scale
        assert s[-1, -1] < s[0, 0] / 10


def test_dequantize_to_bf16():
    w = torch.randn(200, 130)
    q, s = quant.quantize_blockwise(w)
    out = quant.dequantize_blockwise(q, s)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _tile_reference_dequant(q, s).to(torch.bfloat16))


def test_bad_scale_or_dtype():
    q, s = quant.quantize_blockwise(torch.randn(130, 10))
    with pytest.raises(CheckpointError, match=r"scale has shape \(1, 1\), expected \(2, 1\)"):
        quant.dequantize_blockwise(q, s[:1])
    with pytest.raises(CheckpointError, match="int8"):
        quant.dequantize_blockwise(q.float(), s)


def _wide_dit(seed=0):
    """Multi-tile Linears (dim 256, ffn 320: full and edge tiles) with SLA proj_l."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=320,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    proj_l = {
        f"blocks.{i}.proj_l.{leaf}": torch.randn(*((128, 128) if leaf == "weight" else (128,)))
        for i in range(2)
        for leaf in ("weight", "bias")
    }
    return model, proj_l


def _forward(model):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([600.0]), ctx, return_dict=False)[0]


def test_quant_file_layout_and_dequantized_model(tmp_path):
    from diffusers import WanTransformer3DModel

    model, proj_l = _wide_dit()
    native = diffusers_dit_to_wan(model.state_dict(), proj_l=proj_l)
    qsd = quantize_state_dict(native)
    # every Linear in blocks except proj_l is int8 + scale + bf16 bias; everything else is untouched
    assert qsd["blocks.0.self_attn.q.int8_weight"].dtype == torch.int8
    assert qsd["blocks.0.self_attn.q.scale"].shape == (2, 2)
    assert qsd["blocks.1.ffn.0.scale"].shape == (3, 2) and qsd["blocks.1.ffn.2.scale"].shape == (2, 3)
    assert qsd["blocks.0.cross_attn.o.bias"].dtype == torch.bfloat16
    assert "blocks.0.self_attn.q.weight" not in qsd
    assert qsd["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"].dtype == torch.float32
    assert qsd["blocks.0.norm3.weight"].dtype == torch.float32 and qsd["blocks.0.modulation"].ndim == 3
    assert qsd["head.head.weight"].dtype == torch.float32 and qsd["patch_embedding.weight"].ndim == 2
    n_int8 = sum(k.endswith(".int8_weight") for k in qsd)
    assert n_int8 == 2 * (4 + 4 + 2)  # q k v o, cross q k v o, ffn.0 ffn.2 per block

    path = tmp_path / "TurboWan-tiny-quant.pth"
    torch.save({"net." + k: v for k, v in qsd.items()}, path)
    conv = ck.load_dit_checkpoint(path, dtype=torch.float32)
    assert conv.info["quantized"] and conv.config["attention_head_dim"] == 128
    assert torch.equal(conv.sla_proj_l["blocks.1.proj_l.weight"], proj_l["blocks.1.proj_l.weight"])
    w = conv.state_dict["blocks.1.ffn.net.0.proj.weight"]
    assert torch.equal(
        w, quant.dequantize_blockwise(qsd["blocks.1.ffn.0.int8_weight"], qsd["blocks.1.ffn.0.scale"], torch.float32)
    )
    orig = model.state_dict()["blocks.1.ffn.net.0.proj.weight"]
    assert ((w - orig).norm() / orig.norm()).item() < 1e-2
    loaded = WanTransformer3DModel(**conv.config).eval()
    loaded.load_state_dict(conv.state_dict, strict=True)
    ref, out = _forward(model), _forward(loaded)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 2e-2, rel  # close, and not identical: the weights really went through int8


def test_malformed_quant_state_dicts():
    q, s = quant.quantize_blockwise(torch.randn(4, 4))
    with pytest.raises(CheckpointError, match="has no .*scale"):
        quant.dequantize_state_dict({"blocks.0.q.int8_weight": q})
    with pytest.raises(CheckpointError, match="no matching int8_weight"):
        quant.dequantize_state_dict({"blocks.0.q.scale": s})
    with pytest.raises(CheckpointError, match="both a float weight and an int8_weight"):
        quant.dequantize_state_dict(
            {"blocks.0.q.int8_weight": q, "blocks.0.q.scale": s, "blocks.0.q.weight": torch.zeros(4, 4)}
        )


def test_optional_int8_module_matches_dequantized_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 150)
    q, s = quant.quantize_blockwise(lin.weight)
    x = torch.randn(3, 200)
    want = torch.nn.functional.linear(x, quant.dequantize_blockwise(q, s, torch.float32), lin.bias)
    layer = quant.BlockInt8Linear.from_linear(lin)
    assert layer.int8_weight.dtype == torch.int8 and torch.equal(layer.int8_weight, q)
    with torch.no_grad():
        assert torch.equal(layer(x), want)

"""Wan-native checkpoint conversion: DiT (net. prefix, Linear patch embedding, SLA proj_l), VAE, umT5.

Inputs are written by the tests from small random diffusers/transformers models through the inverse conversion;
the forward direction must give back exactly the same tensors and the same network outputs, and must agree with
diffusers' own single-file converters where those apply.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from native_export import diffusers_dit_to_wan, diffusers_vae_to_wan, transformers_t5_to_wan

from turboflow.engine import checkpoint as ck
from turboflow.errors import CheckpointError

TINY_DIT = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)


def _dit(in_channels=16, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_DIT, "in_channels": in_channels}).eval()
    with torch.no_grad():  # make every parameter non-trivial (diffusers inits norms to 1 and biases to 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _proj_l(layers=2, head_dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        f"blocks.{i}.proj_l.{leaf}": torch.randn(
            *((head_dim, head_dim) if leaf == "weight" else (head_dim,)), generator=g
        )
        for i in range(layers)
        for leaf in ("weight", "bias")
    }


def _forward(model, in_channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, in_channels, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([937.0]), ctx, return_dict=False)[0]


def _native(model, proj_l=None, prefix="net."):
    return diffusers_dit_to_wan(model.state_dict(), proj_l=proj_l, prefix=prefix)


class NotATensor:  # pickled into a file to prove weights_only loading refuses arbitrary objects
    pass


# ---- DiT ----------------------------------------------------------------------------------------------------
def test_native_layout_matches_turbodiffusion(tmp_path):
    native = _native(_dit(), _proj_l())
    assert all(k.startswith("net.") for k in native)
    assert native["net.patch_embedding.weight"].shape == (16, 16 * 1 * 2 * 2)  # Linear, as TurboDiffusion stores it
    for k in (
        "net.blocks.1.self_attn.attn_op.local_attn.proj_l.weight",
        "net.blocks.0.cross_attn.norm_k.weight",
        "net.blocks.0.norm3.bias",
        "net.blocks.0.ffn.2.weight",
        "net.blocks.0.modulation",
        "net.head.modulation",
        "net.head.head.weight",
        "net.time_projection.1.weight",
        "net.text_embedding.2.bias",
        "net.time_embedding.0.weight",
    ):
        assert k in native, k


def test_native_checkpoint_loads_to_same_outputs(tmp_path):
    from diffusers import WanTransformer3DModel

    model, proj_l = _dit(), _proj_l()
    path = tmp_path / "TurboWan2.1-T2V-tiny.pth"
    torch.save(_native(model, proj_l), path)
    conv = ck.load_dit_checkpoint(path)
    assert conv.info["net_prefix"] and conv.info["patch_embedding"] == "linear->conv3d"
    assert not conv.info["quantized"]
    assert conv.config["num_attention_heads"] == 2 and conv.config["attention_head_dim"] == 8  # from proj_l
    assert conv.config["in_channels"] == 16 and conv.config["num_layers"] == 2
    assert set(conv.sla_proj_l) == set(proj_l)
    assert all(torch.equal(conv.sla_proj_l[k], proj_l[k]) for k in proj_l)
    loaded = WanTransformer3DModel(**conv.config).eval()
    loaded.load_state_dict(conv.state_dict, strict=True)
    expected = _forward(model)
    assert expected.abs().mean() > 0.01
    assert torch.equal(_forward(loaded), expected)


def test_training_wrapper_and_no_prefix(tmp_path):
    model = _dit(seed=3)
    path = tmp_path / "train.pth"
    torch.save({"state_dict": _native(model, _proj_l(), prefix="net."), "iteration": 7}, path)
    a = ck.load_dit_checkpoint(path)
    path2 = tmp_path / "plain.pth"
    torch.save(_native(model, _proj_l(), prefix=""), path2)
    b = ck.load_dit_checkpoint(path2)
    assert not b.info["net_prefix"]
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_i2v_expert_36_channels(tmp_path):
    model = _dit(in_channels=36, seed=5)
    path = tmp_path / "high.pth"
    torch.save(_native(model, _proj_l()), path)
    conv = ck.load_dit_checkpoint(path)
    assert conv.config["in_channels"] == 36
    from diffusers import WanTransformer3DModel

    loaded = WanTransformer3DModel(**conv.config).eval()
    loaded.load_state_dict(conv.state_dict, strict=True)
    assert torch.equal(_forward(loaded, 36), _forward(model, 36))


def test_agrees_with_diffusers_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = _dit(seed=2)
    native = ck.strip_prefix(_native(model, None))
    ours = ck.wan_dit_to_diffusers(dict(native), {"num_attention_heads": 2, "attention_head_dim": 8}).state_dict
    stock = dict(native)  # diffusers expects stock Wan's Conv3d patch embedding and mutates its input
    stock["patch_embedding.weight"] = stock["patch_embedding.weight"].reshape(16, 16, 1, 2, 2)
    theirs = convert_wan_transformer_to_diffusers(stock)
    assert ours.keys() == theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_head_count_needs_proj_l_or_known_size_or_config():
    native = ck.strip_prefix(_native(_dit(), None))
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        ck.wan_dit_to_diffusers(dict(native))
    conv = ck.wan_dit_to_diffusers(dict(native), {"num_attention_heads": 4, "attention_head_dim": 4})
    assert conv.config["num_attention_heads"] == 4 and not conv.sla_proj_l
    with pytest.raises(CheckpointError, match="!= model dim"):
        ck.wan_dit_to_diffusers(dict(native), {"num_attention_heads": 3, "attention_head_dim": 8})


def test_real_sizes_infer_heads():
    """1.3B (dim 1536) and 14B (dim 5120) need no config: head_dim 128, from shapes alone (meta tensors)."""
    for dim, heads, ffn, layers, cin in ((1536, 12, 8960, 30, 16), (5120, 40, 13824, 40, 36)):
        sd = {
            "patch_embedding.weight": torch.empty(dim, cin * 4, device="meta"),
            "head.head.weight": torch.empty(64, dim, device="meta"),
            "blocks.0.ffn.0.weight": torch.empty(ffn, dim, device="meta"),
            "text_embedding.0.weight": torch.empty(dim, 4096, device="meta"),
            "time_embedding.0.weight": torch.empty(dim, 256, device="meta"),
            "blocks.0.norm3.weight": torch.empty(dim, device="meta"),
            "blocks.0.self_attn.norm_q.weight": torch.empty(dim, device="meta"),
            **{f"blocks.{i}.modulation": torch.empty(1, 6, dim, device="meta") for i in range(layers)},
        }
        cfg = ck.infer_dit_config(sd)
        assert (cfg["num_attention_heads"], cfg["attention_head_dim"]) == (heads, 128)
        assert (cfg["ffn_dim"], cfg["num_layers"], cfg["in_channels"], cfg["text_dim"], cfg["freq_dim"]) == (
            ffn,
            layers,
            cin,
            4096,
            256,
        )


@pytest.mark.parametrize(
    "mutation, message",
    [
        (lambda sd: sd.pop("net.blocks.1.cross_attn.o.weight"), r"1 missing keys.*blocks\.1\.attn2\.to_out\.0\.weight"),
        (
            lambda sd: sd.__setitem__("net.blocks.0.self_attn.extra.weight", torch.zeros(2)),
            r"unexpected keys.*blocks\.0\.self_attn\.extra\.weight",
        ),
        (lambda sd: sd.__setitem__("net.pos_embed.weight", torch.zeros(2)), r"unexpected keys.*pos_embed"),
        (lambda sd: sd.__setitem__("net.blocks.0.ffn.2.weight", torch.zeros(16, 31)), r"shape mismatches.*ffn\.net\.2"),
        (lambda sd: sd.pop("net.blocks.1.self_attn.attn_op.local_attn.proj_l.bias"), r"proj_l.*not all"),
        (lambda sd: sd.__setitem__("blocks.0.norm3.bias", torch.zeros(16)), r"both with and without"),
        (lambda sd: sd.pop("net.head.head.weight"), r"not a Wan DiT checkpoint.*head\.head\.weight"),
    ],
)
def test_key_problems_raise(tmp_path, mutation, message):
    native = _native(_dit(), _proj_l())
    mutation(native)
    path = tmp_path / "bad.pth"
    torch.save(native, path)
    with pytest.raises(CheckpointError, match=message):
        ck.load_dit_checkpoint(path)


def test_many_problems_are_summarised():
    native = _native(_dit(), _proj_l())
    for i in range(20):
        native[f"net.junk.{i}.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        ck.wan_dit_to_diffusers(native)
    assert "20 unexpected keys" in str(e.value) and len(str(e.value)) < 800


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.x": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        ck.load_torch_file(path)
    (tmp_path / "trunc.pth").write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError):
        ck.load_torch_file(tmp_path / "trunc.pth")
    with pytest.raises(CheckpointError, match="not found"):
        ck.load_torch_file(tmp_path / "absent.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        ck.load_torch_file(tmp_path / "list.pth")


def test_legacy_non_zip_file_is_read(tmp_path):
    sd = {"a": torch.arange(4.0)}
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert torch.equal(ck.load_torch_file(path)["a"], sd["a"])


# ---- VAE ----------------------------------------------------------------------------------------------------
VAE_CONFIGS = [
    dict(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ),  # the real Wan2.1 layout, narrow
    dict(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ),  # engine.tiny's layout
    dict(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=2, attn_scales=[0.5], temperal_downsample=[True, False]
    ),
]


@pytest.mark.parametrize("cfg", VAE_CONFIGS, ids=["wan21", "tiny", "attn"])
def test_vae_round_trip_same_outputs(tmp_path, cfg):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**cfg).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    native = diffusers_vae_to_wan(vae.state_dict(), cfg)
    assert "encoder.conv1.weight" in native and "decoder.head.2.weight" in native and "conv2.bias" in native
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(native, path)
    sd, full_cfg = ck.load_vae_checkpoint(path, cfg)
    loaded = AutoencoderKLWan(**full_cfg).eval()
    loaded.load_state_dict(sd, strict=True)
    ref = vae.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    if cfg["attn_scales"]:
        return  # diffusers 0.42's encoder cannot run attention blocks in down_blocks (feat_cache TypeError)
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert torch.equal(loaded.encode(x).latent_dist.mode(), z)
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


def test_vae_agrees_with_diffusers_converter_on_wan21_layout():
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    cfg = VAE_CONFIGS[0]
    sd = AutoencoderKLWan(**cfg).state_dict()
    native = diffusers_vae_to_wan(sd, cfg)
    # Wan's decoder: 3 resnets + a resample per stage; the stage-1 entry resnet has a shortcut (upsamples.4)
    assert "decoder.upsamples.4.shortcut.weight" in native and "decoder.upsamples.3.time_conv.weight" in native
    theirs = convert_wan_vae_to_diffusers(dict(native))
    assert theirs.keys() == sd.keys()
    assert all(torch.equal(theirs[k], sd[k]) for k in sd)


def test_vae_default_config_is_wan21_and_mismatch_raises(tmp_path):
    from diffusers import AutoencoderKLWan

    cfg = VAE_CONFIGS[1]
    native = diffusers_vae_to_wan(AutoencoderKLWan(**cfg).state_dict(), cfg)
    with pytest.raises(CheckpointError, match="VAE checkpoint"):  # tiny file against the default (real) config
        ck.wan_vae_to_diffusers(dict(native))
    native["decoder.upsamples.99.residual.0.gamma"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        ck.wan_vae_to_diffusers(native, cfg)
    with pytest.raises(CheckpointError, match="unknown AutoencoderKLWan config"):
        ck.vae_config({"num_res_block": 2})


# ---- umT5 ---------------------------------------------------------------------------------------------------
def _wan_t5_reference(sd, ids, heads, buckets, max_dist=128, eps=1e-6):
    """An independent forward of Wan's T5 encoder (umt5.py semantics: per-layer relative position embeddings,
    no attention scaling, gated tanh-GELU FFN, RMS norms), written from its description for this test."""

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def bucket(rel):
        half = buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
        return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))

    x = sd["token_embedding.weight"][ids]
    n = ids.shape[1]
    rel = bucket(torch.arange(n)[None, :] - torch.arange(n)[:, None])
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = lambda name, i=i: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = norm(x, p("norm1.weight"))
        q, k, v = (F.linear(h, p(f"attn.{c}.weight")).unflatten(-1, (heads, -1)) for c in "qkv")
        bias = p("pos_embedding.embedding.weight")[rel].permute(2, 0, 1)[None]
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, -1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).flatten(2), p("attn.o.weight"))
        h = norm(x, p("norm2.weight"))
        gate = F.gelu(F.linear(h, p("ffn.gate.0.weight")), approximate="tanh")
        x = x + F.linear(F.linear(h, p("ffn.fc1.weight")) * gate, p("ffn.fc2.weight"))
    return norm(x, sd["norm.weight"])


def _wan_t5_weights(vocab=64, dim=32, inner=32, ffn=48, heads=4, buckets=8, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    sd = {"token_embedding.weight": r(vocab, dim), "norm.weight": 1 + r(dim)}
    for i in range(layers):
        sd.update(
            {
                f"blocks.{i}.norm1.weight": 1 + r(dim),
                f"blocks.{i}.norm2.weight": 1 + r(dim),
                **{f"blocks.{i}.attn.{c}.weight": r(inner, dim) for c in "qkv"},
                f"blocks.{i}.attn.o.weight": r(dim, inner),
                f"blocks.{i}.pos_embedding.embedding.weight": r(buckets, heads),
                f"blocks.{i}.ffn.gate.0.weight": r(ffn, dim),
                f"blocks.{i}.ffn.fc1.weight": r(ffn, dim),
                f"blocks.{i}.ffn.fc2.weight": r(dim, ffn),
            }
        )
    return sd


def test_umt5_native_file_matches_reference_forward(tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel

    native = _wan_t5_weights()
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(native, path)
    sd, cfg = ck.load_t5_checkpoint(path)
    assert (
        cfg["vocab_size"],
        cfg["d_model"],
        cfg["num_heads"],
        cfg["d_kv"],
        cfg["d_ff"],
        cfg["num_layers"],
        cfg["relative_attention_num_buckets"],
    ) == (64, 32, 4, 8, 48, 2, 8)
    model = UMT5EncoderModel(UMT5Config(**cfg)).eval()
    model.load_state_dict(sd, strict=True)
    ids = torch.tensor([[5, 9, 3, 17, 40, 2, 1] + [0] * 13])  # longer than max_exact: exercises the log buckets
    got = model(input_ids=ids).last_hidden_state
    want = _wan_t5_reference(native, ids, heads=4, buckets=8)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_umt5_round_trip_and_key_errors():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    model = UMT5EncoderModel(
        UMT5Config(
            vocab_size=40,
            d_model=16,
            d_kv=4,
            d_ff=24,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
        )
    )
    native = transformers_t5_to_wan(model.state_dict())
    assert "blocks.1.pos_embedding.embedding.weight" in native and "token_embedding.weight" in native
    back, _ = ck.wan_t5_to_transformers(dict(native))
    ref = model.state_dict()
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
    bad = dict(native)
    bad.pop("blocks.1.ffn.fc2.weight")
    with pytest.raises(CheckpointError, match=r"missing keys.*block\.1\.layer\.1\.DenseReluDense\.wo"):
        ck.wan_t5_to_transformers(bad)
    bad = dict(native, **{"blocks.0.ffn.fc3.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*ffn\.fc3"):
        ck.wan_t5_to_transformers(bad)


def test_keymap_rejects_partial_matches():
    assert ck.DIT_KEYS.forward("blocks.3.self_attn.q.weight") == "blocks.3.attn1.to_q.weight"
    assert ck.DIT_KEYS.inverse("blocks.3.attn1.to_out.0.bias") == "blocks.3.self_attn.o.bias"
    assert ck.DIT_KEYS.forward("blocks.3.self_attn.q.weight.extra") is None
    assert ck.DIT_KEYS.forward("xblocks.3.self_attn.q.weight") is None
    assert pickle.loads(pickle.dumps(ck.DIT_KEYS.rules)) == ck.DIT_KEYS.rules


# ---- real sizes, on the meta device (no memory): the full key sets of the published models --------------------
@pytest.mark.parametrize(
    "config, heads",
    [
        (dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, in_channels=16), 12),
        (dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, in_channels=36), 40),
    ],
    ids=["wan2.1-t2v-1.3b", "wan2.2-i2v-a14b-expert"],
)
def test_real_size_dit_key_sets(config, heads):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    sd = model.state_dict()
    proj_l = {
        f"blocks.{i}.proj_l.{leaf}": torch.empty(*((128, 128) if leaf == "weight" else (128,)), device="meta")
        for i in range(config["num_layers"])
        for leaf in ("weight", "bias")
    }
    native = diffusers_dit_to_wan(sd, proj_l=proj_l, prefix="net.")
    assert native["net.patch_embedding.weight"].shape == (128 * heads, config["in_channels"] * 4)
    conv = ck.wan_dit_to_diffusers(native)  # no config: everything inferred from the shapes
    assert {k: conv.config[k] for k in config} == config
    assert conv.state_dict.keys() == sd.keys() and len(conv.sla_proj_l) == 2 * config["num_layers"]


def test_real_size_vae_and_umt5_key_sets():
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # the Wan2.1 VAE
        t5 = UMT5EncoderModel(
            UMT5Config(
                vocab_size=256384,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                relative_attention_num_buckets=32,
                feed_forward_proj="gated-gelu",
            )
        )
    sd, cfg = ck.wan_vae_to_diffusers(diffusers_vae_to_wan(vae.state_dict()))
    assert sd.keys() == vae.state_dict().keys() and cfg["base_dim"] == 96
    native = transformers_t5_to_wan(t5.state_dict())
    assert len(native) == 2 + 24 * 10
    sd, cfg = ck.wan_t5_to_transformers(native)
    assert (cfg["num_heads"], cfg["d_kv"], cfg["num_layers"], cfg["d_ff"]) == (64, 64, 24, 10240)
    assert sd.keys() == t5.state_dict().keys()

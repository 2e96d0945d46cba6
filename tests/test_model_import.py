"""`import_model` / `pull_model` / `turboflow model import|pull`: downloaded files -> a verified model cache that
`load_pipeline` loads to the same frames as the model the files were written from.

The files are the tiny session models exported to TurboDiffusion's own formats (`net.` prefix, Linear patch
embedding, SLA proj_l, optional int8) by `export_native` (tests/native_export.py). `pull` is exercised with an
injected downloader that copies from a local directory laid out like the hub: the real huggingface_hub
download is NOT exercised here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from native_export import export_native

from turboflow.cli import main as main_cli
from turboflow.engine import checkpoint as ck
from turboflow.engine import modelcache
from turboflow.engine.families.wan import TINY_T5, TINY_TRANSFORMER, TINY_VAE
from turboflow.engine.model_import import (
    ModelImportError,
    classify_files,
    import_model,
    parse_file_spec,
    pull_model,
)
from turboflow.engine.request import GenerationRequest
from turboflow.errors import CheckpointError, ChecksumMismatchError

FAST = dict(resolution="480p", aspect_ratio="4:3", num_frames=1)
PROMPT = "a red fox in the snow"
# engine.tiny's umT5 uses max_distance 16; shapes cannot show it (the real umt5-xxl's 128 is the default)
T5_CFG = {"relative_attention_max_distance": TINY_T5["relative_attention_max_distance"]}
HEAD_DIM = TINY_TRANSFORMER["attention_head_dim"]


def _proj_l(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"blocks.{i}.proj_l.{leaf}": torch.randn(
            *((HEAD_DIM, HEAD_DIM) if leaf == "weight" else (HEAD_DIM,)), generator=g
        )
        for i in range(TINY_TRANSFORMER["num_layers"])
        for leaf in ("weight", "bias")
    }


@pytest.fixture(scope="module")
def native_t2v(tiny_t2v_dir, tmp_path_factory):
    return export_native(tiny_t2v_dir, tmp_path_factory.mktemp("native-t2v"), proj_l=_proj_l())


@pytest.fixture(scope="module")
def imported_t2v(native_t2v, tiny_t2v_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "turbowan-t2v"
    manifest = import_model(
        out,
        kind="t2v",
        dit=native_t2v["transformer"],
        vae=native_t2v["vae"],
        text_encoder=native_t2v["text_encoder"],
        tokenizer_dir=tiny_t2v_dir / "tokenizer",
        vae_config=TINY_VAE,
        t5_config=T5_CFG,
        name="tiny-imported",
    )
    return out, manifest


@pytest.fixture(scope="module")
def reference_frames(t2v_pipeline):
    """What the tiny T2V model (the source of every exported file) generates for PROMPT / seed 7."""
    return t2v_pipeline(t2v_pipeline.request(PROMPT, seed=7, **FAST)).frames


def _frames(model_dir, **kw):
    from turboflow.engine.loading import load_pipeline

    pipe = load_pipeline(model_dir, device="cpu")
    # validated without the manifest's defaults (an imported SLA checkpoint defaults to attention "sla"): the
    # same request as the reference's
    request = GenerationRequest(prompt=PROMPT, seed=7, **{"kind": pipe.kind, **FAST, **kw})
    return pipe(request.validated(pipe.family)).frames


def test_exported_files_look_like_turbodiffusion(native_t2v):
    dit = torch.load(native_t2v["transformer"], map_location="cpu", weights_only=True)
    assert all(k.startswith("net.") for k in dit)
    assert dit["net.patch_embedding.weight"].ndim == 2
    assert "net.blocks.1.self_attn.attn_op.local_attn.proj_l.weight" in dit
    t5 = torch.load(native_t2v["text_encoder"], map_location="cpu", weights_only=True)
    assert "blocks.0.pos_embedding.embedding.weight" in t5 and "token_embedding.weight" in t5
    vae = torch.load(native_t2v["vae"], map_location="cpu", weights_only=True)
    assert "decoder.upsamples.0.residual.0.gamma" in vae and "conv1.weight" in vae


def test_import_native_files_verifies_and_gives_same_frames(imported_t2v, reference_frames):
    out, manifest = imported_t2v
    verified = modelcache.verify(out, checksums=True)
    assert verified.kind == "t2v" and verified.name == "tiny-imported"
    # fine-tuned with SLA (proj_l present): served with SLA unless a request asks otherwise
    assert verified.defaults == {
        "sigma_max": 80.0,
        "boundary": 0.9,
        "resolution": "480p",
        "attention": "sla",
        "sla_topk": 0.1,
    }
    assert set(verified.components) == {"transformer", "vae", "text_encoder", "tokenizer"}
    src = verified.source
    assert src["transformer"]["net_prefix"] and src["transformer"]["patch_embedding"] == "linear->conv3d"
    assert src["transformer"]["sla_proj_l"] and not src["transformer"]["quantized"]
    # SLA proj_l kept beside the transformer (hashed by the manifest, invisible to diffusers' loader)
    assert "transformer/sla/proj_l.safetensors" in {f.path for f in verified.files}
    stored = ck.load_sla_proj_l(out / "transformer")
    assert stored.keys() == _proj_l().keys() and all(torch.equal(stored[k], v) for k, v in _proj_l().items())
    assert np.array_equal(_frames(out), reference_frames)


def test_import_detects_tampering(imported_t2v, tmp_path):
    out, _ = imported_t2v
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    target = copy / "transformer" / "sla" / "proj_l.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="proj_l.safetensors"):
        modelcache.verify(copy, checksums=True)


def test_import_quant_file_and_diffusers_dir(tiny_t2v_dir, native_t2v, tmp_path, reference_frames):
    """-quant DiT (dequantized on import) with the VAE/text encoder/tokenizer taken from a diffusers directory."""
    qdir = export_native(tiny_t2v_dir, tmp_path / "q", quantize=True, proj_l=_proj_l())
    out = tmp_path / "quant"
    manifest = import_model(out, kind="t2v", dit=qdir["transformer"], diffusers_dir=tiny_t2v_dir, dtype="fp32")
    assert manifest.source["transformer"]["quantized"] and manifest.source["vae"]["format"] == "diffusers"
    assert manifest.name == "tiny-wan2.1-t2v-transformer"  # from the file name, -quant dropped
    modelcache.verify(out, checksums=True)
    got = _frames(out).astype(int)
    diff = np.abs(got - reference_frames.astype(int))
    assert diff.mean() < 3 and diff.max() > 0  # int8 weights: close to, not equal to, the original

    # --keep-int8: the same file's int8 codes and block scales go into the cache and onto the device untouched
    kept = tmp_path / "kept"
    manifest = main_cli(
        [
            "model",
            "import",
            str(kept),
            "--kind",
            "t2v",
            "--dit",
            str(qdir["transformer"]),
            "--diffusers",
            str(tiny_t2v_dir),
            "--dtype",
            "fp32",
            "--keep-int8",
        ]
    )
    assert manifest == 0
    manifest = modelcache.verify(kept, checksums=True)
    assert manifest.source["transformer"]["stored"] == "int8-block128"
    dit_bytes = {
        d.name: sum(f.size for f in m.files if f.path.startswith("transformer/"))
        for d, m in ((out, modelcache.read_manifest(out)), (kept, manifest))
    }
    assert dit_bytes["kept"] < 0.7 * dit_bytes["quant"]  # int8 instead of fp32 block linears (tiny: norms weigh in)
    from turboflow.engine.loading import load_pipeline
    from turboflow.engine.quant import BlockInt8Linear

    pipe = load_pipeline(kept, device="cpu")
    layer = pipe.transformer.blocks[0].attn1.to_q
    original = ck.strip_prefix(torch.load(qdir["transformer"], map_location="cpu", weights_only=True))
    assert isinstance(layer, BlockInt8Linear) and layer.scale.dtype == torch.float32
    assert torch.equal(layer.int8_weight, original["blocks.0.self_attn.q.int8_weight"])
    assert torch.equal(layer.scale, original["blocks.0.self_attn.q.scale"])
    # weight-only int8 computes with exactly the dequantized weights: the same frames as the dequantized import
    assert np.array_equal(_frames(kept), got.astype(np.uint8))
    # and FP8 re-quantizes those layers from their dequantized weights
    fp8 = load_pipeline(kept, device="cpu", quant_linear="fp8")
    assert type(fp8.transformer.blocks[0].attn1.to_q).__name__ == "FP8Linear"


def test_import_whole_diffusers_dir_and_i2v_experts(tiny_i2v_dir, i2v_pipeline, tmp_path):
    from PIL import Image

    native = export_native(tiny_i2v_dir, tmp_path / "n", proj_l=_proj_l())
    high = native["transformer"].rename(tmp_path / "n" / "TurboWan2.2-I2V-A14B-high-720P.pth")
    low = native["transformer_2"].rename(tmp_path / "n" / "TurboWan2.2-I2V-A14B-low-720P.pth")
    out = tmp_path / "i2v"
    manifest = import_model(out, kind="i2v", dit=high, dit_low=low, diffusers_dir=tiny_i2v_dir)
    assert manifest.name == "turbowan2.2-i2v-a14b-720p"
    assert manifest.defaults == {
        "sigma_max": 200.0,
        "boundary": 0.9,
        "resolution": "720p",
        "attention": "sla",
        "sla_topk": 0.1,
    }
    assert json.loads((out / "transformer_2" / "config.json").read_text())["in_channels"] == 36
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    req = dict(kind="i2v", image=image)
    # the two experts differ, so equal frames also prove that high/low landed in the right roles
    assert not torch.equal(i2v_pipeline.transformer.proj_out.weight, i2v_pipeline.transformer_2.proj_out.weight)
    want = i2v_pipeline(i2v_pipeline.request(PROMPT, seed=7, **FAST, **req)).frames
    assert np.array_equal(_frames(out, **req), want)


def test_import_errors(tiny_t2v_dir, tiny_i2v_dir, native_t2v, imported_t2v, tmp_path):
    common = dict(
        vae=native_t2v["vae"],
        text_encoder=native_t2v["text_encoder"],
        tokenizer_dir=tiny_t2v_dir / "tokenizer",
        vae_config=TINY_VAE,
    )
    with pytest.raises(ModelImportError, match="no input for .*text_encoder"):
        import_model(
            tmp_path / "a",
            kind="t2v",
            dit=native_t2v["transformer"],
            vae=native_t2v["vae"],
            tokenizer_dir=tiny_t2v_dir / "tokenizer",
        )
    with pytest.raises(ModelImportError, match="needs 36"):
        import_model(
            tmp_path / "b", kind="i2v", dit=native_t2v["transformer"], dit_low=native_t2v["transformer"], **common
        )
    with pytest.raises(ModelImportError, match="already holds"):
        import_model(imported_t2v[0], kind="t2v", dit=native_t2v["transformer"], **common)
    with pytest.raises(CheckpointError, match="VAE checkpoint .*unexpected keys"):  # tiny VAE, real default config
        import_model(tmp_path / "c", kind="t2v", dit=native_t2v["transformer"], **{**common, "vae_config": None})
    empty = tmp_path / "tok"
    empty.mkdir()
    with pytest.raises(ModelImportError, match="neither tokenizer.json nor spiece.model"):
        import_model(tmp_path / "d", kind="t2v", dit=native_t2v["transformer"], **{**common, "tokenizer_dir": empty})
    with pytest.raises(ModelImportError, match="input not found"):
        import_model(tmp_path / "e", kind="t2v", dit=tmp_path / "nope.pth", **common)
    # a diffusers component whose config disagrees with its weights
    bad = tmp_path / "bad-diffusers"
    shutil.copytree(tiny_t2v_dir, bad)
    cfg = json.loads((bad / "transformer" / "config.json").read_text())
    cfg["num_layers"] = 3
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.2\."):
        import_model(tmp_path / "f", kind="t2v", diffusers_dir=bad)
    assert not (tmp_path / "f" / modelcache.MANIFEST).exists()  # a failed import never looks complete
    with pytest.raises(ModelImportError, match="only applies to --kind i2v"):
        import_model(tmp_path / "g", kind="t2v", dit_low=native_t2v["transformer"], diffusers_dir=tiny_i2v_dir)


def test_force_replaces(imported_t2v, native_t2v, tiny_t2v_dir, tmp_path):
    out = tmp_path / "replace"
    shutil.copytree(imported_t2v[0], out)
    m = import_model(
        out,
        kind="t2v",
        dit=native_t2v["transformer"],
        vae=native_t2v["vae"],
        text_encoder=native_t2v["text_encoder"],
        tokenizer_dir=tiny_t2v_dir / "tokenizer",
        vae_config=TINY_VAE,
        t5_config=T5_CFG,
        force=True,
        sigma_max=60.0,
        resolution="720p",
    )
    assert m.defaults["sigma_max"] == 60.0 and m.defaults["resolution"] == "720p"
    modelcache.verify(out, checksums=True)


# ---- pull ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(tmp_path, native_t2v, tiny_t2v_dir):
    hub = tmp_path / "hub"
    for repo, name, src in (
        ("TurboDiffusion/TurboWan2.1-T2V-tiny", "TurboWan2.1-T2V-tiny-480P.pth", native_t2v["transformer"]),
        ("Wan-AI/Wan2.1-T2V-tiny", "Wan2.1_VAE.pth", native_t2v["vae"]),
        ("Wan-AI/Wan2.1-T2V-tiny", "models_t5_umt5-xxl-enc-bf16.pth", native_t2v["text_encoder"]),
    ):
        (hub / repo).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, hub / repo / name)
    shutil.copytree(tiny_t2v_dir / "tokenizer", hub / "google" / "umt5-xxl")
    calls = []

    def downloader(repo, filename, revision, local_dir):
        calls.append((repo, filename, revision))
        src = hub / repo / filename
        if not src.is_file():
            raise FileNotFoundError(f"{repo}/{filename}")
        dest = Path(local_dir) / filename
        shutil.copyfile(src, dest)
        return str(dest)

    return hub, downloader, calls


def test_pull_orchestration_with_injected_downloader(fake_hub, tmp_path, imported_t2v):
    hub, downloader, calls = fake_hub
    out = tmp_path / "models" / "pulled"
    manifest = pull_model(
        out,
        kind="t2v",
        repo="TurboDiffusion/TurboWan2.1-T2V-tiny",
        files=[
            "TurboWan2.1-T2V-tiny-480P.pth",
            "Wan-AI/Wan2.1-T2V-tiny:Wan2.1_VAE.pth",
            "Wan-AI/Wan2.1-T2V-tiny:models_t5_umt5-xxl-enc-bf16.pth",
        ],
        tokenizer_repo="google/umt5-xxl",
        revision="main",
        downloader=downloader,
        vae_config=TINY_VAE,
        t5_config=T5_CFG,
    )
    assert ("TurboDiffusion/TurboWan2.1-T2V-tiny", "TurboWan2.1-T2V-tiny-480P.pth", "main") in calls
    assert ("google/umt5-xxl", "tokenizer.json", None) in calls
    assert manifest.name == "turbowan2.1-t2v-tiny-480p" and manifest.source["pull"]["tokenizer"] == "google/umt5-xxl"
    assert (tmp_path / "models" / "pulled.download" / "Wan2.1_VAE.pth").is_file()
    # same inputs as the `imported_t2v` cache (whose frames are checked above) -> byte-identical weight files
    pulled = {f.path: f.sha256 for f in manifest.files}
    imported = {f.path: f.sha256 for f in imported_t2v[1].files}
    assert pulled.keys() == imported.keys()
    assert {p: h for p, h in pulled.items() if p.endswith(".safetensors")} == {
        p: h for p, h in imported.items() if p.endswith(".safetensors")
    }


def test_pull_failures(fake_hub, tmp_path, tiny_t2v_dir):
    hub, downloader, _ = fake_hub
    with pytest.raises(FileNotFoundError):
        pull_model(
            tmp_path / "x",
            kind="t2v",
            repo="TurboDiffusion/TurboWan2.1-T2V-tiny",
            files=[
                "absent-480P.pth",
                "Wan-AI/Wan2.1-T2V-tiny:Wan2.1_VAE.pth",
                "Wan-AI/Wan2.1-T2V-tiny:models_t5_umt5-xxl-enc-bf16.pth",
            ],
            tokenizer_dir=tiny_t2v_dir / "tokenizer",
            downloader=downloader,
        )
    assert not (tmp_path / "x" / modelcache.MANIFEST).exists()
    with pytest.raises(ModelImportError, match="exactly one"):
        pull_model(tmp_path / "y", kind="t2v", files=["a.pth"], downloader=downloader)


def test_file_specs_and_classification():
    assert parse_file_spec("x.pth", "o/r") == ("o/r", "x.pth")
    assert parse_file_spec("a/b:sub/x.pth", None) == ("a/b", "sub/x.pth")
    with pytest.raises(ModelImportError, match="no --repo"):
        parse_file_spec("x.pth", None)
    with pytest.raises(ModelImportError, match="OWNER/REPO:NAME"):
        parse_file_spec("bad:x.pth", None)
    i2v = classify_files(
        "i2v",
        [
            "TurboWan2.2-I2V-A14B-high-720P-quant.pth",
            "TurboWan2.2-I2V-A14B-low-720P.pth",
            "Wan2.1_VAE.pth",
            "models_t5_umt5-xxl-enc-bf16.pth",
        ],
    )
    assert i2v == {
        "dit": "TurboWan2.2-I2V-A14B-high-720P-quant.pth",
        "dit_low": "TurboWan2.2-I2V-A14B-low-720P.pth",
        "vae": "Wan2.1_VAE.pth",
        "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
    }
    with pytest.raises(ModelImportError, match=r"nothing for \['dit_low'\]"):
        classify_files("i2v", ["x-high.pth", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"])
    with pytest.raises(ModelImportError, match="two files for dit"):
        classify_files("t2v", ["a.pth", "b.pth", "Wan2.1_VAE.pth", "t5.pth"])
    with pytest.raises(ModelImportError, match="cannot tell"):
        classify_files("i2v", ["TurboWan2.2-I2V-A14B-720P.pth"])


# ---- CLI ----------------------------------------------------------------------------------------------------
def test_cli_import_and_errors(native_t2v, tiny_t2v_dir, tmp_path, capsys):
    from turboflow.cli import main

    out = tmp_path / "cli"
    argv = [
        "model",
        "import",
        str(out),
        "--kind",
        "t2v",
        "--dit",
        str(native_t2v["transformer"]),
        "--vae",
        str(native_t2v["vae"]),
        "--text-encoder",
        str(native_t2v["text_encoder"]),
        "--tokenizer",
        str(tiny_t2v_dir / "tokenizer"),
        "--vae-config",
        json.dumps(TINY_VAE),
        "--t5-config",
        json.dumps(T5_CFG),
        "--name",
        "cli-tiny",
        "--boundary",
        "0.8",
    ]
    assert main(argv) == 0
    assert "ok: cli-tiny (t2v)" in capsys.readouterr().out
    assert modelcache.verify(out, checksums=True).defaults["boundary"] == 0.8
    assert main(argv) == 2  # exists, no --force
    assert "error[model_import_error]" in capsys.readouterr().err
    assert main(["model", "verify", str(out), "--checksums"]) == 0


def test_cli_lists_the_import_dtypes_without_importing_torch():
    """`--dtype` offers exactly model_import.DTYPES, and building the parser imports no torch: every `turboflow`
    verb (simulate, submit, events, ...) builds it, and torch's import is most of a short verb's run."""
    import subprocess
    import sys

    from turboflow.engine.model_cli import DTYPE_CHOICES
    from turboflow.engine.model_import import DTYPES

    assert sorted(DTYPE_CHOICES) == sorted(DTYPES)
    code = (
        "import sys; from turboflow.cli import build_parser; build_parser(); "
        "print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_real_downloader_refuses_when_offline(tmp_path, monkeypatch):
    """The hub is unreachable here; the default downloader must fail fast and clearly, never hang on a network call."""
    from huggingface_hub import constants

    from turboflow.engine.model_import import hf_downloader

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelImportError, match="HF_HUB_OFFLINE"):
        hf_downloader("TurboDiffusion/TurboWan2.1-T2V-1.3B-480P", "TurboWan2.1-T2V-1.3B-480P.pth", None, tmp_path)


def test_plain_diffusers_weights_keep_original_attention_by_default(tiny_t2v_dir, tmp_path):
    manifest = import_model(tmp_path / "plain", kind="t2v", diffusers_dir=tiny_t2v_dir)
    assert "attention" not in manifest.defaults  # no proj_l: not fine-tuned with SLA

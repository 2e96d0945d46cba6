"""The model-family seam: specs registered by name, recorded in the model-cache manifest, and the only place the
engine learns architecture facts (latent geometry, frame rule, experts, conditioning, fps, tiny configs).

Everything runs on tiny models on the CPU; a third, toy family registered here builds, loads and generates
through the same code paths as Wan2.1 and Wan2.2.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import FAST

from turboflow.engine import families
from turboflow.engine.families import FamilySpec, TinyConfig, UnknownFamilyError, family
from turboflow.engine.families.wan import TINY_T5, TINY_TRANSFORMER, TINY_VAE
from turboflow.engine.loading import load_pipeline
from turboflow.engine.modelcache import MANIFEST, read_manifest, verify
from turboflow.engine.request import GenerationRequest
from turboflow.engine.tiny import build_tiny
from turboflow.errors import InvalidRequestError, ModelCacheError
from turboflow.eventing.contracts import ERROR_CODES


def test_wan21_and_wan22_are_registered_with_their_facts():
    assert {"wan2.1", "wan2.2"} <= set(families.families())
    t2v, i2v = family("wan2.1"), family("wan2.2")
    assert (t2v.tasks, i2v.tasks) == (("t2v",), ("i2v",))
    for spec in (t2v, i2v):
        assert (spec.latent.channels, spec.latent.stride, spec.latent.patch) == (16, (4, 8, 8), (1, 2, 2))
        assert (spec.fps, spec.text_len, spec.latent.pixel_multiple) == (16, 512, 16)
        assert spec.components["transformer"].load_class().__name__ == "WanTransformer3DModel"
        assert spec.components["vae"].load_class().__name__ == "AutoencoderKLWan"
        assert spec.components["text_encoder"].load_class().__name__ == "UMT5EncoderModel"
        assert spec.checkpoint_keys["transformer"].forward("head.head.weight") == "proj_out.weight"
    assert (t2v.in_channels, i2v.in_channels) == (16, 36)  # I2V: 16 noise + 4 mask + 16 image latent
    assert (t2v.default_sigma_max, i2v.default_sigma_max) == (80.0, 200.0)
    assert t2v.conditioning is None and i2v.conditioning is not None
    assert i2v.transformer_roles == ("transformer", "transformer_2") and i2v.role_of("low") == "transformer_2"


def test_latent_geometry_math():
    latent = family("wan2.1").latent
    assert [latent.valid_num_frames(n) for n in (1, 5, 80, 81, 0)] == [True, True, False, True, False]
    assert latent.latent_frames(81) == 21 and latent.latent_frames(1) == 1
    assert latent.latent_shape(81, 832, 480) == (1, 16, 21, 60, 104)


def test_experts_switch_at_the_boundary():
    assert family("wan2.1").expert_for(0.1, 0.9) == "dit"
    i2v = family("wan2.2")
    assert [i2v.expert_for(t, 0.9) for t in (0.99, 0.9, 0.89, 0.0)] == ["high", "high", "low", "low"]


def test_an_unknown_family_is_a_typed_registered_error():
    with pytest.raises(UnknownFamilyError) as info:
        family("wan9")
    assert info.value.code == "unknown_family" and info.value.field == "family"
    assert isinstance(info.value, ModelCacheError) and "wan2.1, wan2.2" in info.value.message
    assert "unknown_family" in ERROR_CODES


def test_a_name_cannot_be_taken_by_another_spec():
    wan21 = family("wan2.1")
    assert families.register(wan21) is wan21  # the same spec again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        families.register(dataclasses.replace(wan21, fps=24))
    with pytest.raises(ValueError, match="tasks"):
        families.register(dataclasses.replace(wan21, name="v2v-only", tasks=("v2v",)))


@pytest.mark.parametrize("kind,name", [("t2v", "wan2.1"), ("i2v", "wan2.2")])
def test_tiny_models_record_their_family(kind, name, tiny_t2v_dir, tiny_i2v_dir):
    root = tiny_t2v_dir if kind == "t2v" else tiny_i2v_dir
    raw = json.loads((root / MANIFEST).read_text())
    assert (raw["kind"], raw["family"]) == (kind, name)
    manifest = verify(root)
    assert (manifest.kind, manifest.family) == (kind, name)
    assert {"transformer", "transformer_2"} & set(manifest.components) == set(family(name).transformer_roles)


def test_loaded_pipelines_take_their_family_from_the_manifest(t2v_pipeline, i2v_pipeline):
    assert (t2v_pipeline.kind, t2v_pipeline.family.name, t2v_pipeline.fps) == ("t2v", "wan2.1", 16)
    assert (i2v_pipeline.kind, i2v_pipeline.family.name) == ("i2v", "wan2.2")
    assert i2v_pipeline.transformer.config.in_channels == family("wan2.2").in_channels


def _rewrite_manifest(root, **changes):
    path = root / MANIFEST
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("kind,name", [("t2v", "wan2.1"), ("i2v", "wan2.2")])
def test_manifests_written_before_families_load_as_their_kinds_family(
    kind, name, tiny_t2v_dir, tiny_i2v_dir, t2v_pipeline, tmp_path
):
    old = tmp_path / "old"
    shutil.copytree(tiny_t2v_dir if kind == "t2v" else tiny_i2v_dir, old)
    _rewrite_manifest(old, family=None)
    assert "family" not in json.loads((old / MANIFEST).read_text())
    assert read_manifest(old).family == name
    pipeline = load_pipeline(old, device="cpu")
    assert pipeline.family.name == name
    if kind == "t2v":  # and it is the same model: the same frames as the one with a recorded family
        request = t2v_pipeline.request("a red fox", seed=5, num_steps=1, **FAST)
        assert np.array_equal(pipeline(request).frames, t2v_pipeline(request).frames)


def test_a_manifest_naming_an_unknown_or_mismatched_family_does_not_load(tiny_t2v_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_t2v_dir, bad)
    _rewrite_manifest(bad, family="wan9")
    with pytest.raises(UnknownFamilyError) as info:
        load_pipeline(bad, device="cpu")
    assert info.value.code == "unknown_family" and str(bad) in info.value.message
    _rewrite_manifest(bad, family="wan2.2")  # an I2V family for a T2V cache
    with pytest.raises(ModelCacheError) as info:
        read_manifest(bad)
    assert info.value.code == "model_cache_invalid" and "serves i2v, not t2v" in info.value.message


def _toy_family() -> FamilySpec:
    """A third family: Wan2.1's classes with a VAE that halves time once (stride 2x8x8, so 2k+1 frames), 12 fps
    and a one-layer DiT. Nothing in the engine knows it; its spec is all it brings."""
    wan21 = family("wan2.1")
    return dataclasses.replace(
        wan21,
        name="toy-wan-2x",
        description="test family: Wan2.1 classes, temporal stride 2",
        latent=dataclasses.replace(wan21.latent, stride=(2, 8, 8)),
        fps=12,
        default_sigma_max=40.0,
        tiny=TinyConfig(
            "tiny-toy-wan-2x",
            {**TINY_TRANSFORMER, "num_layers": 1},
            {**TINY_VAE, "temperal_downsample": [False, False, True]},
            TINY_T5,
        ),
    )


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))  # registered for this test only
    return families.register(_toy_family())


def test_a_third_family_registers_builds_loads_and_generates(toy_family, tmp_path):
    assert family("toy-wan-2x") is toy_family and "toy-wan-2x" in families.families()
    manifest = build_tiny(tmp_path / "toy", kind="t2v", family="toy-wan-2x")
    assert (manifest.family, manifest.name, manifest.defaults["sigma_max"]) == ("toy-wan-2x", "tiny-toy-wan-2x", 40.0)
    pipeline = load_pipeline(tmp_path / "toy", device="cpu")
    assert (pipeline.family, pipeline.fps) == (toy_family, 12)
    # the frame rule is the family's: 3 = 2k+1 is a video here, not for Wan (4k+1)
    request = GenerationRequest(prompt="a red fox", seed=1, num_steps=1, resolution="480p", aspect_ratio="4:3")
    request = request.replace(num_frames=3)
    with pytest.raises(InvalidRequestError, match=r"4k\+1") as info:
        request.validated()
    assert info.value.code == "invalid_num_frames"
    result = pipeline(request.validated(pipeline.family, pipeline.defaults))
    assert result.frames.shape == (3, 480, 640, 3) and (result.fps, result.sigma_max) == (12, 40.0)
    assert result.experts == ["dit"] and result.model == "tiny-toy-wan-2x"

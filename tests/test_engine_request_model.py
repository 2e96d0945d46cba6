"""One request model: one field table (engine/fields.py) from which the dataclass, the schemas, the S3 source and
both CLIs derive; one validation step whose ValidatedRequest is the only thing the pipeline takes; an inline image
decoded once."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io

import numpy as np
import pytest
from conftest import FAST
from PIL import Image, ImageFile

from turboflow.cli import build_parser
from turboflow.engine import fields
from turboflow.engine.request import GenerationRequest, ValidatedRequest, adaptive_frame_size
from turboflow.eventing import s3source
from turboflow.eventing.contracts import SCHEMAS, parse_request
from turboflow.eventing.types import I2V_REQUESTED, REQUEST_TYPES, T2V_REQUESTED


def _png(w=96, h=64) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _i2v_event(data: dict) -> dict:
    return {"type": I2V_REQUESTED, "source": "/producer", "id": "req-1", "data": data}


# ---- the field table -------------------------------------------------------------------------------------------
def test_the_dataclass_and_the_field_table_agree():
    declared = {f.name: f for f in dataclasses.fields(GenerationRequest)}
    assert set(declared) - {"kind"} == set(fields.ENGINE_FIELDS)
    for name in fields.ENGINE_FIELDS:
        field, default = fields.FIELDS[name], declared[name].default
        if name == "prompt":
            assert default is dataclasses.MISSING
            continue
        # a field a model may default is None ("not given") until validation fills it
        assert default == (None if field.model_default else field.default), name
        if "default" in field.schema:  # the published default is the one applied
            assert field.schema["default"] == field.default, name
    assert fields.MODEL_DEFAULT_FIELDS == (
        "resolution",
        "aspect_ratio",
        "sigma_max",
        "attention",
        "sla_topk",
        "boundary",
    )


def test_the_request_schemas_are_the_field_table():
    for kind, event_type in REQUEST_TYPES.items():
        props = SCHEMAS[event_type]["properties"]
        assert list(props) == [f.name for f in fields.fields_for(kind)]
        assert all(props[f.name] == f.json_schema() for f in fields.fields_for(kind))
    assert "boundary" not in SCHEMAS[T2V_REQUESTED]["properties"]


def test_s3source_fields_are_every_wire_field_but_the_image():
    assert set(s3source.OPTION_FIELDS) == set(fields.WIRE_FIELDS) - {"image"}
    assert s3source._coerce("num_frames", "17") == 17 and s3source._coerce("sigma_max", "80") == 80.0
    assert s3source._coerce("ode", "yes") is True and s3source._coerce("prompt", "42") == "42"


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("verb", ["generate", "submit"])
def test_cli_flags_derive_from_the_field_table_and_keep_their_names(verb):
    parser = _subparser(verb)
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in fields.REQUEST_FIELDS:
        if f.flags and (f.engine or verb == "submit"):
            assert set(f.flags) <= flags, f.name
    # the aliases both front ends had before the table: generate's --frames/--steps, submit's --num-frames/...
    assert {"--frames", "--steps", "--num-frames", "--num-steps", "--sigma-max", "--ode"} <= flags
    head = ["t2v", "--model", "m", "--prompt", "p"] if verb == "generate" else ["t2v", "p"]
    args = parser.parse_args([*head, "--frames", "17", "--steps", "2", "--ode", "--no-adaptive-resolution"])
    assert fields.options_from_args(args, engine_only=verb == "generate") == {
        "num_frames": 17,
        "num_steps": 2,
        "ode": True,
        "adaptive_resolution": False,
    }


# ---- one validation step ---------------------------------------------------------------------------------------
def test_model_defaults_fill_only_what_the_request_leaves_out():
    defaults = {"resolution": "720p", "attention": "sla", "sla_topk": None, "alias": "x"}
    v = GenerationRequest(prompt="a fox", aspect_ratio="4:3").validated(defaults=defaults)
    assert (v.request.resolution, v.request.attention, v.request.sla_topk, v.size) == ("720p", "sla", 0.1, (960, 720))
    assert GenerationRequest(prompt="a fox", resolution="480p").validated(defaults=defaults).size == (832, 480)
    assert GenerationRequest(prompt="a fox").validated().request.sigma_max == 80.0  # the family's


def test_an_inline_i2v_image_is_decoded_once_through_parse_request_and_the_pipeline(i2v_pipeline, monkeypatch):
    uri = "data:image/png;base64," + base64.b64encode(_png()).decode()
    event = _i2v_event({"prompt": "a boat", "image": uri, "seed": 1, "num_steps": 1, **FAST})
    decodes = []
    full_load = ImageFile.ImageFile.load

    def counted(self):
        if self.tile:  # pixels not decoded yet (Pillow clears `tile` once it has): this call decodes them
            decodes.append(self.format)
        return full_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    req = parse_request(event, model_defaults=i2v_pipeline.defaults, family=i2v_pipeline.family)
    assert isinstance(req.generation, ValidatedRequest) and req.generation.request.image.mode == "RGB"
    result = i2v_pipeline(req.generation)
    assert decodes == ["PNG"]
    assert (result.width, result.height) == req.generation.size and result.frames.shape[0] == FAST["num_frames"]


def test_a_store_image_is_completed_once_fetched():
    event = _i2v_event({"prompt": "a boat", "image": "s3://bucket/uploads/default/a.png", **FAST})
    pending = parse_request(event).generation
    assert pending.image_pending and pending.request.image is None
    done = pending.with_image(_png(480, 270))
    assert not done.image_pending and done.request.image.size == (480, 270)
    assert done.size == adaptive_frame_size((640, 480), (480, 270)) != (640, 480)  # 4:3's area at the image's 16:9


def test_the_pipeline_takes_only_a_validated_request(t2v_pipeline, i2v_pipeline):
    with pytest.raises(TypeError, match="ValidatedRequest"):
        t2v_pipeline(GenerationRequest(prompt="a cat", seed=1, **FAST))
    pending = GenerationRequest(prompt="a cat", kind="i2v", seed=1, **FAST).validated(image_pending=True)
    with pytest.raises(TypeError, match="not fetched"):
        i2v_pipeline(pending)
    # the same request through the one validation step generates
    assert t2v_pipeline(t2v_pipeline.request("a cat", seed=1, num_steps=1, **FAST)).frames.std() > 0

"""Request validation details: seeds, attention types offered and refused, the image format allowlist."""

import io

import pytest
from PIL import EpsImagePlugin, Image

from turboflow.engine import GenerationRequest, ImageError, InvalidRequestError, UnsupportedOptionError
from turboflow.engine.request import ATTENTION_TYPES, IMAGE_FORMATS, SEED_MAX, UNAVAILABLE_ATTENTION, load_image


def _encoded(fmt: str, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_seed_defaults_to_none_and_zero_is_a_seed():
    assert GenerationRequest(prompt="x").seed is None
    assert GenerationRequest(prompt="x").validated().request.seed is None
    assert GenerationRequest(prompt="x", seed=0).validated().request.seed == 0
    assert GenerationRequest(prompt="x", seed=SEED_MAX).validated().request.seed == SEED_MAX


def test_attention_offers_every_upstream_type():
    assert ATTENTION_TYPES == ("original", "sla", "sagesla")  # upstream TurboDiffusion's --attention_type choices
    assert UNAVAILABLE_ATTENTION == {}


def test_sagesla_is_accepted_and_other_names_are_typed_errors(monkeypatch):
    assert GenerationRequest(prompt="x", attention="sagesla").validated().request.attention == "sagesla"
    for bad in ("flash9", "SageSLA", "sagesla ", ["sagesla"]):  # full match; an unhashable JSON value stays typed
        with pytest.raises(InvalidRequestError) as info:
            GenerationRequest(prompt="x", attention=bad).validated()
        assert info.value.code == "invalid_attention" and info.value.field == "attention"
    # a name upstream knows but a build lacks is refused with the reason (the mechanism the front ends share)
    monkeypatch.setitem(UNAVAILABLE_ATTENTION, "flash4", "attention 'flash4' is not in this build")
    with pytest.raises(UnsupportedOptionError) as info:
        GenerationRequest(prompt="x", attention="flash4").validated()
    err = info.value
    assert err.code == "unsupported_option" and err.field == "attention" and not err.retryable
    assert err.message == "attention 'flash4' is not in this build"


@pytest.mark.parametrize("fmt", ["EPS", "TIFF", "ICO"])
def test_formats_outside_the_allowlist_are_refused(fmt, monkeypatch):
    ghostscript_calls = []
    real = EpsImagePlugin.Ghostscript
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ghostscript_calls.append(a) or real(*a, **k))
    data = _encoded(fmt)
    with pytest.raises(ImageError) as info:
        load_image(data)
    assert info.value.code == "invalid_image" and info.value.field == "image"
    assert all(name in info.value.message for name in IMAGE_FORMATS)
    with pytest.raises(ImageError):  # the same through a request
        GenerationRequest(prompt="x", kind="i2v", image=data).validated()
    assert ghostscript_calls == []  # EPS bytes were never handed to Ghostscript


def test_refused_format_from_a_path_and_an_opened_image(tmp_path):
    path = tmp_path / "picture.tiff"
    path.write_bytes(_encoded("TIFF"))
    with pytest.raises(ImageError, match="accepted format"):
        load_image(str(path))
    with pytest.raises(ImageError, match="accepted format"):
        load_image(Image.open(path))  # opened by the caller, not yet decoded


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_allowed_format_decodes(fmt):
    assert load_image(_encoded(fmt)).size == (32, 32)
    assert load_image(Image.new("RGB", (32, 32))).mode == "RGB"  # an in-memory image has no format

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


def test_attention_offers_only_what_is_implemented():
    assert ATTENTION_TYPES == ("original", "sla")
    assert set(UNAVAILABLE_ATTENTION) == {"sagesla"} and not set(UNAVAILABLE_ATTENTION) & set(ATTENTION_TYPES)


def test_sagesla_is_refused_with_the_reason():
    with pytest.raises(UnsupportedOptionError) as info:
        GenerationRequest(prompt="x", attention="sagesla").validated()
    err = info.value
    assert err.code == "unsupported_option" and err.field == "attention" and not err.retryable
    assert err.message == UNAVAILABLE_ATTENTION["sagesla"]
    assert "SpargeAttn" in err.message and "'sla'" in err.message and "same math" not in err.message
    with pytest.raises(InvalidRequestError) as info:
        GenerationRequest(prompt="x", attention=["sagesla"]).validated()  # unhashable JSON value: still typed
    assert info.value.code == "invalid_attention"


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

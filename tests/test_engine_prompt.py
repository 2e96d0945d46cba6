"""Prompts are cleaned like upstream's umT5 tokenizer (clean="whitespace") before they are tokenized."""

import numpy as np
import pytest
import torch
from conftest import FAST

from turboflow.engine import GenerationRequest, InvalidRequestError
from turboflow.engine.prompt import clean_prompt


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("cafÃ© in the snow", "café in the snow"),  # UTF-8 read as Latin-1 (mojibake): ftfy.fix_text
        ("Ã¢â‚¬Å“a foxÃ¢â‚¬\x9d", '"a fox"'),  # doubly encoded curly quotes, straightened like ftfy does
        ("fish &amp; chips", "fish & chips"),
        ("fish &amp;amp; chips", "fish & chips"),  # unescaped twice
        ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
        ("&#97; red fox", "a red fox"),
        ("  a\tred\n\nfox\u00a0 at  night ", "a red fox at night"),  # any whitespace run is one space, stripped
        ("a red fox", "a red fox"),
    ],
)
def test_clean_prompt_like_upstream(raw, clean):
    assert clean_prompt(raw) == clean
    assert clean_prompt(clean) == clean  # idempotent


def test_prompts_differing_only_in_entities_and_whitespace_give_the_same_video(t2v_pipeline):
    plain, messy = "a red fox & a dog", "  &#97;  red\tfox &amp;amp; a\n dog "
    assert torch.equal(t2v_pipeline.encode_prompt(plain), t2v_pipeline.encode_prompt(messy))
    a = t2v_pipeline(t2v_pipeline.request(plain, seed=7, **FAST))
    b = t2v_pipeline(t2v_pipeline.request(messy, seed=7, **FAST))
    assert np.array_equal(a.frames, b.frames)
    # the tokenizer does see the difference between "a" and "&#97;": without cleaning the videos would differ
    raw = t2v_pipeline.tokenizer(["&#97; fox", "a fox"]).input_ids
    assert raw[0] != raw[1]


def test_a_prompt_that_cleans_to_nothing_is_invalid():
    with pytest.raises(InvalidRequestError) as info:
        GenerationRequest(prompt="&nbsp; &#32;").validated()
    assert info.value.code == "invalid_prompt" and "cleaned" in info.value.message


def _count_encoder_calls(pipeline) -> list:
    calls = []
    pipeline.text_encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def test_repeated_prompts_skip_the_text_encoder_and_give_the_same_embeddings(tiny_t2v_dir):
    from turboflow.engine.loading import load_pipeline

    pipeline = load_pipeline(tiny_t2v_dir, device="cpu", prompt_cache=2)
    calls = _count_encoder_calls(pipeline)
    first = pipeline.encode_prompt("a red fox")
    fresh = pipeline._encode_text("a red fox")  # what encoding again gives
    assert len(calls) == 2
    assert torch.equal(pipeline.encode_prompt("  a red   fox "), fresh)  # the cleaned text is the key
    assert torch.equal(first, fresh) and len(calls) == 2
    pipeline.encode_prompt("a dog")
    pipeline.encode_prompt("a red fox")  # used last: "a dog" is now the least recently used
    pipeline.encode_prompt("a cat")  # evicts "a dog"
    assert len(calls) == 4
    pipeline.encode_prompt("a red fox")
    assert len(calls) == 4
    pipeline.encode_prompt("a dog")
    assert len(calls) == 5
    assert list(pipeline._prompt_cache) == ["a red fox", "a dog"]


def test_prompt_cache_zero_encodes_every_time(tiny_t2v_dir):
    from turboflow.engine.loading import load_pipeline

    pipeline = load_pipeline(tiny_t2v_dir, device="cpu", prompt_cache=0)
    calls = _count_encoder_calls(pipeline)
    pipeline.encode_prompt("a red fox")
    pipeline.encode_prompt("a red fox")
    assert len(calls) == 2 and not pipeline._prompt_cache


def test_prompt_cache_setting_is_checked():
    from turboflow.engine.options import LoadOptions
    from turboflow.errors import ConfigError
    from turboflow.settings import Settings

    assert LoadOptions.from_settings(Settings.from_env({"TURBOFLOW_PROMPT_CACHE": "0"})).prompt_cache == 0
    assert LoadOptions().prompt_cache == 32
    with pytest.raises(ConfigError):
        LoadOptions(prompt_cache=-1)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TURBOFLOW_PROMPT_CACHE": "lots"})
    assert "TURBOFLOW_PROMPT_CACHE" in str(info.value)

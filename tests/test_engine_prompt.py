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

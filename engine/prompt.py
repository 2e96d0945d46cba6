"""Prompt text as the umT5 encoder gets it."""

from __future__ import annotations

import html
import re

_WHITESPACE_RUN = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The prompt cleaned exactly as upstream TurboDiffusion cleans it before umT5 tokenization.

    Upstream's umT5 tokenizer wrapper is built with `clean="whitespace"`, which runs, in this order:
    `ftfy.fix_text` (repairs mojibake such as "cafÃ©" -> "café" and other broken Unicode), `html.unescape` twice
    (so "&amp;amp;" becomes "&"), strip, then every run of whitespace (spaces, tabs, newlines, no-break spaces)
    collapsed to one space and stripped again. The checkpoints were trained on prompts cleaned this way, and a
    SentencePiece tokenizer gives different tokens for "a  fox" than for "a fox", so skipping it changes the video.
    """
    import ftfy  # imported here: only the text encoding stage needs it

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()

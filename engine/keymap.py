"""Reversible key renaming between a checkpoint's native parameter names and a library's, as template rules."""

from __future__ import annotations

import re


class KeyMap:
    """Bidirectional template rules. `{i}`/`{j}` match integers, `{p}` a parameter leaf (weight|bias|gamma).

    A rule ("blocks.{i}.ffn.0.{p}", "blocks.{i}.ffn.net.0.proj.{p}") renames "blocks.3.ffn.0.bias" forward to
    "blocks.3.ffn.net.0.proj.bias" and back; a key no rule matches maps to None (the caller decides: strict
    conversion turns it into an error)."""

    _SLOTS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias|gamma)"}

    def __init__(self, rules: list[tuple[str, str]]):
        self.rules = rules
        self._fwd = [(self._compile(a), b) for a, b in rules]
        self._inv = [(self._compile(b), a) for a, b in rules]

    @classmethod
    def _compile(cls, template: str) -> re.Pattern:
        pattern = re.escape(template)
        for slot, rx in cls._SLOTS.items():
            pattern = pattern.replace(re.escape("{" + slot + "}"), rx)
        return re.compile(pattern + r"\Z")

    @staticmethod
    def _apply(table, key: str) -> str | None:
        for rx, target in table:
            m = rx.match(key)
            if m:
                return target.format(**m.groupdict())
        return None

    def forward(self, key: str) -> str | None:
        return self._apply(self._fwd, key)

    def inverse(self, key: str) -> str | None:
        return self._apply(self._inv, key)

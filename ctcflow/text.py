"""Text ↔ token ids for character-level CTC.

The default alphabet and blank index follow the original recipe:
apostrophe = 0, space = 1, a–z = 2…27, blank = 28.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

RECIPE_ALPHABET = "' " + string.ascii_lowercase
RECIPE_BLANK = len(RECIPE_ALPHABET)  # 28

_SPACES = re.compile(r"\s+")
# Punctuation that carries no sound; the apostrophe stays because it is in the alphabet.
_SILENT_PUNCTUATION = re.compile(r"[.,!?;:\"()\[\]{}]")


def normalize(text: str) -> str:
    """Lower-case, drop silent punctuation, turn dashes into spaces, collapse whitespace."""
    text = text.lower().replace("’", "'").replace("-", " ")
    text = _SILENT_PUNCTUATION.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


@dataclass(frozen=True)
class Tokenizer:
    """Maps characters to class ids around a blank whose index is configurable."""

    alphabet: str = RECIPE_ALPHABET
    blank: int = RECIPE_BLANK

    def __post_init__(self) -> None:
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet has repeated characters: {self.alphabet!r}")
        if not 0 <= self.blank <= len(self.alphabet):
            raise ValueError(f"blank index {self.blank} outside 0…{len(self.alphabet)}")

    @property
    def num_classes(self) -> int:
        return len(self.alphabet) + 1

    def _ids(self) -> list[int]:
        return [i for i in range(self.num_classes) if i != self.blank]

    def unknown_chars(self, text: str) -> set[str]:
        return set(text) - set(self.alphabet)

    def encode(self, text: str) -> list[int]:
        ids = self._ids()
        try:
            return [ids[self.alphabet.index(ch)] for ch in text]
        except ValueError:
            raise ValueError(
                f"characters outside the alphabet in {text!r}: {sorted(self.unknown_chars(text))}"
            ) from None

    def decode(self, ids: list[int]) -> str:
        """Class ids (blank excluded) back to text."""
        chars = {cls: ch for cls, ch in zip(self._ids(), self.alphabet)}
        return "".join(chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"alphabet": self.alphabet, "blank": self.blank}


def min_ctc_frames(tokens: list[int]) -> int:
    """Fewest output frames CTC needs: one per token plus a blank between repeats."""
    repeats = sum(1 for a, b in zip(tokens, tokens[1:]) if a == b)
    return len(tokens) + repeats

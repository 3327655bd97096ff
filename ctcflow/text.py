"""Text normalization and text ↔ token ids for CTC, over characters, words/glosses or BPE pieces.

The original recipe's layout, which params.yaml keeps: apostrophe = 0, space = 1, a–z = 2…27,
blank = 28 (RECIPE_ALPHABET, blank last). With word units (e.g. sign-language glosses) each
vocabulary entry is one class and a transcript is its units separated by spaces. With BPE units
each piece of a sentencepiece model is one class; a piece that starts a word begins with '▁'.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sentencepiece
from num2words import num2words

RECIPE_ALPHABET = "' " + string.ascii_lowercase
TOKENS_FILE = "tokens.json"  # the label unit, written by manifest and copied by featurize

BPE_MODEL_FILE = "bpe.model"  # units bpe: the sentencepiece model, beside tokens.json (which embeds it too)
WORD_START = "▁"  # sentencepiece's mark of a piece that starts a word

Unit = Literal["char", "word", "bpe"]

_SPACES = re.compile(r"\s+")
_DIGIT = re.compile(r"\d")
# Integers with thousands separators and decimals ("1,200.5"), ordinals ("21st"), other runs of digits.
_NUMBER = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(st|nd|rd|th)?", re.IGNORECASE)


# Unicode files these under punctuation, but they are read aloud ("fifty percent", "at and t"):
# turned into spaces, the words would vanish from a transcript of speech that says them. Kept,
# they meet manifest.text.unknown like any character outside the alphabet.
SPOKEN_SYMBOLS = "%&#@*§"


class _PunctuationToSpace(dict):
    """A str.translate table, filled on first sight of each character: every Unicode punctuation
    mark except the apostrophe and SPOKEN_SYMBOLS → space (a regex cannot name Unicode categories)."""

    def __missing__(self, code: int) -> int:
        ch = chr(code)
        silent = ch != "'" and ch not in SPOKEN_SYMBOLS and unicodedata.category(ch).startswith("P")
        self[code] = ord(" ") if silent else code
        return self[code]


_PUNCTUATION_TO_SPACE = _PunctuationToSpace()
# An apostrophe with a letter or digit on both sides is part of the word ("what's", "o'clock",
# "90's"); anywhere else it quotes ('hello' → hello) or ends a plural possessive said as the plural.
_QUOTING_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


def has_digits(text: str) -> bool:
    return bool(_DIGIT.search(text))


def spell_numbers(text: str, language: str) -> str:
    """Numbers as words with num2words: "21st" → "twenty-first", "3.5" → "three point five"."""

    def spell(match: re.Match) -> str:
        whole, fraction, ordinal = match.groups()
        number = whole.replace(",", "")
        if ordinal and not fraction:
            return f" {num2words(int(number), lang=language, to='ordinal')} "
        value = f"{number}.{fraction}" if fraction else int(number)
        return f" {num2words(value, lang=language)} {ordinal or ''}"

    return _NUMBER.sub(spell, text)


def normalize(text: str, lowercase: bool, punctuation: Literal["drop", "keep"], spell_digits: bool,
              language: str) -> str:
    """NFC, optional lower case, numbers spelled out if asked, punctuation to spaces, single spaces.

    With punctuation "drop" every Unicode punctuation mark becomes a space except an apostrophe
    inside a word (typographic ’ becomes '), which words like "what's" keep, and the symbols people
    read aloud (SPOKEN_SYMBOLS: % & # @ * §), left for the alphabet check; dashes therefore split
    words, and an apostrophe at a word's edge, a quote mark, goes ("'hello'" → "hello").
    """
    text = unicodedata.normalize("NFC", text)
    if lowercase:
        text = text.lower()
    if spell_digits:
        text = spell_numbers(text, language)
    if punctuation == "drop":
        text = _QUOTING_APOSTROPHE.sub(" ", text.replace("’", "'").translate(_PUNCTUATION_TO_SPACE))
    return _SPACES.sub(" ", text).strip()


@dataclass(frozen=True)
class Tokenizer:
    """Maps units (characters, words, or BPE pieces) to class ids around a blank whose index is configurable.

    `alphabet` is a string of characters (unit "char") or a sequence of words (unit "word").
    With unit "bpe", `bpe_model` is the sentencepiece model (base64 text, so that tokens.json and
    checkpoints carry it as they are) and `alphabet` its pieces, <unk> left out (see from_bpe_model).
    `blank` is an index, or "first"/"last". Dicts from `to_dict()` rebuild it.
    """

    alphabet: str | tuple[str, ...]
    blank: int | Literal["first", "last"]
    unit: Unit
    bpe_model: str | None = None  # units bpe only

    def __post_init__(self) -> None:
        if self.unit not in ("char", "word", "bpe"):
            raise ValueError(f"unit must be 'char', 'word' or 'bpe', not {self.unit!r}")
        if (self.unit == "bpe") != (self.bpe_model is not None):
            raise ValueError("a sentencepiece model goes with units bpe, and only with them")
        if self.unit == "bpe":
            object.__setattr__(self, "alphabet", tuple(self.alphabet))
        elif self.unit == "word":
            object.__setattr__(self, "alphabet", tuple(self.alphabet))
            bad = [w for w in self.alphabet if not w or _SPACES.search(w)]
            if bad:
                raise ValueError(f"vocabulary entries must be non-empty and without spaces: {bad[:5]}")
        elif not isinstance(self.alphabet, str):
            raise ValueError("a character alphabet must be a string")
        if not self.alphabet:
            raise ValueError("the alphabet/vocabulary is empty")
        repeated = sorted(u for u, n in Counter(self.alphabet).items() if n > 1)
        if repeated:
            raise ValueError(f"alphabet has repeated {'characters' if self.unit == 'char' else 'units'}: {repeated[:10]}")
        size = len(self.alphabet)
        if self.blank in ("first", "last"):
            object.__setattr__(self, "blank", 0 if self.blank == "first" else size)
        if isinstance(self.blank, bool) or not isinstance(self.blank, int) or not 0 <= self.blank <= size:
            raise ValueError(f"blank index {self.blank} outside 0…{size} for {size} {self.unit} units "
                             "(use 'first' or 'last' to place it at either end)")
        ids = [i for i in range(size + 1) if i != self.blank]
        object.__setattr__(self, "_index", dict(zip(self.alphabet, ids)))
        object.__setattr__(self, "_units", dict(zip(ids, self.alphabet)))

    @classmethod
    def load(cls, directory: str | Path, blank: int | str) -> "Tokenizer":
        """The label unit a manifest or feature directory carries (tokens.json), with `blank`."""
        path = Path(directory) / TOKENS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (the manifest stage writes it, featurize copies it)")
        return cls(**json.loads(path.read_text()), blank=blank)

    @classmethod
    def from_bpe_model(cls, model: bytes, blank: int | str) -> "Tokenizer":
        """BPE units: every piece of the sentencepiece model but <unk> (transcripts are checked
        against the alphabet first, so none needs it)."""
        processor = sentencepiece.SentencePieceProcessor(model_proto=model)
        pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size()) if not processor.is_unknown(i)]
        return cls(tuple(pieces), blank, "bpe", base64.b64encode(model).decode("ascii"))

    @property
    def num_classes(self) -> int:
        return len(self.alphabet) + 1

    def units(self, text: str) -> list[str]:
        if self.unit == "bpe":
            return _bpe_processor(self.bpe_model).encode(text, out_type=str)
        return text.split() if self.unit == "word" else list(text)

    def unknown(self, text: str) -> set[str]:
        """Units of `text` that are not in the alphabet/vocabulary."""
        return {u for u in self.units(text) if u not in self._index}

    def drop_unknown(self, text: str) -> str:
        kept = [u for u in self.units(text) if u in self._index]
        return _SPACES.sub(" ", self.join(kept)).strip()

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[u] for u in self.units(text)]
        except KeyError:
            what = "characters" if self.unit == "char" else "units"
            raise ValueError(f"{what} outside the alphabet in {text!r}: {sorted(self.unknown(text))}") from None

    def decode(self, ids: list[int]) -> str:
        """Class ids (blank excluded) back to text; word units are joined by spaces."""
        return self.join(self._units[i] for i in ids)

    def join(self, units) -> str:
        """Units back to text: word units with spaces between; BPE pieces with a space for each '▁'."""
        if self.unit == "bpe":
            return "".join(units).replace(WORD_START, " ").strip()
        return ("" if self.unit == "char" else " ").join(units)

    def starts_word(self, id: int) -> bool:
        """Whether class `id` begins a new word: every word unit, and BPE pieces marked '▁'.
        Characters never do: the space class separates their words."""
        return self.unit == "word" or self.unit == "bpe" and self._units[id].startswith(WORD_START)

    def units_dict(self) -> dict:
        """What tokens.json holds: the unit and its alphabet (and sentencepiece model), without the
        blank (train chooses it)."""
        units = {"unit": self.unit, "alphabet": self.alphabet if self.unit == "char" else list(self.alphabet)}
        return {**units, "bpe_model": self.bpe_model} if self.unit == "bpe" else units

    def to_dict(self) -> dict:
        return {**self.units_dict(), "blank": self.blank}


@functools.cache
def _bpe_processor(bpe_model: str) -> sentencepiece.SentencePieceProcessor:
    """Loaded once per process and model, outside the Tokenizer, which stays plain data to pickle."""
    return sentencepiece.SentencePieceProcessor(model_proto=base64.b64decode(bpe_model))


def train_bpe(texts: list[str], vocab_size: int, alphabet: str) -> bytes:
    """A sentencepiece BPE model of the transcripts, the same bytes for the same input (one thread).

    At most `vocab_size` pieces (fewer where the transcripts hold fewer merges); every character of
    `alphabet` is a piece, seen in training or not; no text normalization (transcripts come normalized).
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, required_chars=alphabet.replace(" ", ""),
        normalization_rule_name="identity", unk_id=0, bos_id=-1, eos_id=-1, num_threads=1, minloglevel=2)
    return model.getvalue()


def bpe_min_vocab_size(alphabet: str) -> int:
    """The fewest pieces train_bpe accepts for `alphabet`: sentencepiece needs one for each of its
    characters but the space (required_chars), plus '▁' and <unk>."""
    return len(set(alphabet) - {" "}) + 2


def read_vocabulary(path: str | Path, lowercase: bool) -> tuple[str, ...]:
    """One unit per line; blank lines and surrounding spaces ignored; case folded like transcripts."""
    lines = [unicodedata.normalize("NFC", line.strip()) for line in Path(path).read_text().splitlines()]
    return tuple(line.lower() if lowercase else line for line in lines if line)


def min_ctc_frames(tokens: list[int]) -> int:
    """Fewest output frames CTC needs: one per token plus a blank between repeats."""
    repeats = sum(1 for a, b in zip(tokens, tokens[1:]) if a == b)
    return len(tokens) + repeats

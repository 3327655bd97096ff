"""A lexicon and a word n-gram language model (ARPA) from training transcripts, for beam search.

The estimator is interpolated Kneser-Ney with one absolute discount per order, written in
ARPA back-off form. It is written here because KenLM's `lmplz` has no PyPI binary and the
pure-Python ARPA builders on PyPI are young and do not implement interpolated Kneser-Ney as
published (Chen & Goodman 1998, section 3.4); for a few thousand transcripts this is ~100 lines
and well under a second.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

from ctcflow.text import Tokenizer

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10_ZERO = -99.0  # ARPA's "never": the log10 probability of <s>, which is never predicted


def kneser_ney(sentences: list[list[str]], order: int) -> tuple[list[dict[tuple, float]], list[dict[tuple, float]]]:
    """Log10 probabilities of every seen n-gram and log10 back-off weights of every context.

    Returns (logprob, backoff): one dict per order (index 0 = unigrams), keyed by word tuples.
    Lower orders use continuation counts (how many distinct words precede the n-gram), except
    n-grams that start with <s>, which nothing can precede. Unigrams are interpolated with a
    uniform distribution over the vocabulary, <unk> included, so every word gets some mass.
    """
    if order < 1:
        raise ValueError(f"n-gram order must be at least 1, got {order}")
    raw = [Counter() for _ in range(order)]
    for words in sentences:
        padded = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(padded) - n + 1):
                raw[n - 1][tuple(padded[i : i + n])] += 1
    if not raw[0]:
        raise ValueError("no sentences to estimate a language model from")

    # Adjusted counts: raw at the highest order, continuation counts below it.
    counts = [Counter() for _ in range(order)]
    counts[order - 1] = raw[order - 1]
    for n in range(order - 1, 0, -1):
        for gram in raw[n]:  # gram = v + g, with g one order lower
            counts[n - 1][gram[1:]] += 1
        for gram, c in raw[n - 1].items():
            if gram[0] == BOS:
                counts[n - 1][gram] = c
    counts[0].pop((BOS,), None)
    counts[0].setdefault((UNK,), 0)

    logprob: list[dict[tuple, float]] = [{} for _ in range(order)]
    backoff: list[dict[tuple, float]] = [{} for _ in range(order)]
    for n in range(1, order + 1):
        discount = _discount(counts[n - 1])
        totals, types = defaultdict(int), defaultdict(int)
        for gram, c in counts[n - 1].items():
            totals[gram[:-1]] += c
            types[gram[:-1]] += c > 0
        # Mass each context keeps for its lower order: what the discount took away.
        gamma = {h: discount * types[h] / totals[h] for h in totals}
        vocab_size = len(counts[0])
        for gram, c in counts[n - 1].items():
            h = gram[:-1]
            lower = 1.0 / vocab_size if n == 1 else 10 ** logprob[n - 2][gram[1:]]
            logprob[n - 1][gram] = math.log10(max(c - discount, 0.0) / totals[h] + gamma[h] * lower)
        if n > 1:
            for h, g in gamma.items():
                backoff[n - 2][h] = math.log10(g)
    logprob[0][(BOS,)] = LOG10_ZERO
    return logprob, backoff


def _discount(counts: Counter) -> float:
    """Ney's estimate D = n1 / (n1 + 2 n2) from the counts of counts; 0.5 where it is undefined."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    return d if 0.0 < d < 1.0 else 0.5


def write_arpa(path: str | Path, logprob: list[dict], backoff: list[dict]) -> None:
    """ARPA text. KenLM, which flashlight's beam search reads it with, refuses a model under a
    bigram ("assumes at least a bigram model"): a unigram model is written with an empty 2-grams
    section, the same probabilities in a form KenLM reads."""
    order = len(logprob)
    counts = [len(grams) for grams in logprob] + ([0] if order == 1 else [])
    lines = ["", "\\data\\", *(f"ngram {n + 1}={count}" for n, count in enumerate(counts)), ""]
    for n in range(order):
        lines.append(f"\\{n + 1}-grams:")
        for gram in sorted(logprob[n]):
            entry = f"{logprob[n][gram]:.6f}\t{' '.join(gram)}"
            if n < order - 1:
                entry += f"\t{backoff[n].get(gram, 0.0):.6f}"
            lines.append(entry)
        lines.append("")
    if order == 1:
        lines += ["\\2-grams:", ""]
    lines.append("\\end\\")
    Path(path).write_text("\n".join(lines) + "\n")


def read_arpa(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The inverse of write_arpa (used by tests and to score text)."""
    logprob: list[dict] = []
    backoff: list[dict] = []
    n = 0
    for line in Path(path).read_text().splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            n = int(line[1:].split("-")[0])
            logprob.append({})
            backoff.append({})
        elif n and line.strip() and not line.startswith("\\"):
            fields = line.split("\t")
            gram = tuple(fields[1].split())
            logprob[n - 1][gram] = float(fields[0])
            if len(fields) > 2:
                backoff[n - 1][gram] = float(fields[2])
    return logprob, backoff


def score(logprob: list[dict], backoff: list[dict], history: tuple, word: str) -> float:
    """Log10 p(word | history) by ARPA back-off; a word outside the vocabulary scores as <unk>."""
    history = tuple(history)[len(history) - len(logprob) + 1:] if len(logprob) > 1 else ()
    gram = (*history, word)
    if gram in logprob[len(gram) - 1]:
        return logprob[len(gram) - 1][gram]
    if not history:
        return logprob[0][(UNK,)]
    return backoff[len(history) - 1].get(history, 0.0) + score(logprob, backoff, history[1:], word)


def write_lexicon(path: str | Path, words: list[str], tokenizer: Tokenizer) -> None:
    """Flashlight's lexicon format: a word, then its spelling in tokens. BPE units: the word's
    pieces. Otherwise its characters, ending with the word separator '|' (the decoder's silence
    token, standing for the space class)."""
    def spelling(word: str) -> list[str]:
        return tokenizer.units(word) if tokenizer.unit == "bpe" else [*word, "|"]

    Path(path).write_text("".join(f"{w}\t{' '.join(spelling(w))}\n" for w in sorted(set(words))))


def oov_rate(texts: list[str], vocabulary: set[str]) -> float:
    """The share of the words of `texts` outside `vocabulary`: words a beam search held to the
    lexicon can never output."""
    words = [word for text in texts for word in text.split()]
    return sum(word not in vocabulary for word in words) / len(words) if words else 0.0


def read_lexicon(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lexicon {path} not found (run the lm stage first)")
    return [line.split("\t", 1)[0] for line in path.read_text().splitlines() if line.strip()]

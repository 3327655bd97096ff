"""Word and character error rates with jiwer, plus sentence accuracy."""

from __future__ import annotations

import jiwer


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level WER and CER (errors / reference length) and the share of exact transcripts."""
    if not references:
        raise ValueError("no utterances to score")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    words = jiwer.process_words(references, hypotheses)
    chars = jiwer.process_characters(references, hypotheses)
    exact = sum(r == h for r, h in zip(references, hypotheses))
    return {
        "wer": words.wer,
        "cer": chars.cer,
        "sentence_accuracy": exact / len(references),
    }


def utterance_errors(reference: str, hypothesis: str) -> dict[str, int]:
    """Edit counts for one utterance, for the per-utterance report."""
    words = jiwer.process_words(reference, hypothesis)
    chars = jiwer.process_characters(reference, hypothesis)
    return {
        "words": len(reference.split()),
        "word_errors": words.substitutions + words.deletions + words.insertions,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "chars": len(reference),
        "char_errors": chars.substitutions + chars.deletions + chars.insertions,
    }

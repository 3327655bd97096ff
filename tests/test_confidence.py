"""Word confidence: from the CTC alignment's posteriors, in [0, 1], ordered as the posteriors are;
evaluate's per-word table and confidence metrics, and the plots stage's calibration plot."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import frame_log_probs, tiny_params, tiny_tokenizer
from ctcflow.decoding import align_words
from stages.evaluate import confidence_separation, correct_words

TOKENIZER = tiny_tokenizer()


def test_a_word_is_as_confident_as_its_frames_on_average():
    # "hi" sure (0.9 per frame), "yo" unsure (its "o" frame at 0.4, the rest of the mass on "a").
    log_probs = frame_log_probs(TOKENIZER, {"h": 0.9}, {"blank": 0.9}, {"i": 0.9}, {" ": 0.9},
                                {"y": 0.9}, {"blank": 0.9}, {"o": 0.4, "a": 0.35}, {"blank": 0.9})[0]
    hi, yo = align_words(log_probs, "hi yo", TOKENIZER, frame_seconds=0.03, blank_penalty=0.0)
    assert 0 <= yo.confidence < hi.confidence <= 1
    # frame_log_probs gives every other class 1e-4 before normalizing each frame
    sure = 0.9 / (0.9 + 1e-4 * (TOKENIZER.num_classes - 1))
    assert hi.confidence == pytest.approx(sure, abs=1e-6)  # the blank and space frames are no part of it
    assert yo.confidence == pytest.approx((sure + 0.4 / (0.75 + 1e-4 * (TOKENIZER.num_classes - 2))) / 2, abs=1e-6)


def test_confidence_reads_the_real_posteriors_not_the_penalized_scores():
    log_probs = frame_log_probs(TOKENIZER, {"blank": 0.6, "a": 0.4}, {"blank": 0.9})[0]
    for penalty in (0.0, 2.0):
        (word,) = align_words(log_probs, "a", TOKENIZER, frame_seconds=0.03, blank_penalty=penalty)
        assert word.confidence == pytest.approx(float(log_probs[0, TOKENIZER.encode("a")[0]].exp()))


def test_correct_words_follow_jiwers_alignment():
    assert correct_words("turn on the light", "turn of the light") == [True, False, True, True]
    assert correct_words("turn on the light", "turn on on the") == [True, True, False, True]  # an insertion
    assert correct_words("turn on", "") == []


def test_confidence_separation_counts_the_least_confident_tenth():
    words = pd.DataFrame({"confidence": [0.1 * i for i in range(1, 21)], "correct": [False, True, *[True] * 16, False, True]})
    # The 2 least confident (10 % of 20): one wrong; all 20: two wrong.
    assert confidence_separation(words) == {"words": 20, "wrong_share_lowest10": 0.5, "wrong_share_all": 0.1}


def test_evaluate_writes_word_confidences_and_their_separation(tiny_pipeline):
    words = pd.read_csv(tiny_pipeline / "reports/eval/words.csv", keep_default_na=False)
    table = pd.read_csv(tiny_pipeline / "reports/eval/utterances.csv", keep_default_na=False, dtype=str)
    assert list(words.columns) == ["id", "word", "first_frame", "end_frame", "confidence", "correct"]
    assert words["confidence"].between(0, 1).all()
    # One row per hypothesis word, in order, with the same confidences as the per-utterance table.
    assert words["word"].tolist() == [w for h in table["hypothesis"] for w in h.split()]
    assert [f"{c:.3f}" for c in words["confidence"]] == [c for cs in table["word_confidences"] for c in cs.split()]
    expected = [c for r, h in zip(table["reference"], table["hypothesis"]) for c in correct_words(r, h)]
    assert words["correct"].tolist() == expected
    metrics = json.loads((tiny_pipeline / "metrics/eval.json").read_text())
    assert metrics["confidence"] == confidence_separation(words)


def test_plots_draw_the_calibration(tiny_pipeline):
    assert (tiny_pipeline / "plots/calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bins = pd.read_csv(tiny_pipeline / "plots/calibration.csv")
    words = pd.read_csv(tiny_pipeline / "reports/eval/words.csv", keep_default_na=False)
    assert bins["confidence"].tolist() == pytest.approx([0.05 + 0.1 * i for i in range(10)])
    assert bins["words"].sum() == len(words)
    assert tiny_params()["plots"]["dpi"] > 0

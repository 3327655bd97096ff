import pytest

from ctcflow.metrics import error_rates, utterance_errors


def test_hand_checked_rates():
    refs = ["turn on the lamp", "call john"]
    hyps = ["turn of the lamp", "call john now"]
    # words: 1 substitution + 1 insertion over 6 reference words
    # chars: "on"→"of" 1 substitution; " now" 4 insertions; over 16 + 9 reference characters
    rates = error_rates(refs, hyps)
    assert rates["wer"] == pytest.approx(2 / 6)
    assert rates["cer"] == pytest.approx(5 / 25)
    assert rates["sentence_accuracy"] == 0.0


def test_perfect_and_empty_hypotheses():
    assert error_rates(["a b", "c"], ["a b", "c"]) == {"wer": 0.0, "cer": 0.0, "sentence_accuracy": 1.0}
    rates = error_rates(["a b", "c"], ["", "c"])
    assert rates["wer"] == pytest.approx(2 / 3) and rates["sentence_accuracy"] == 0.5


def test_utterance_errors():
    counts = utterance_errors("set a timer", "set the timer for")
    assert counts["words"] == 3
    assert (counts["substitutions"], counts["deletions"], counts["insertions"]) == (1, 0, 1)
    assert counts["word_errors"] == 2


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_rates(["a", "b"], ["a"])

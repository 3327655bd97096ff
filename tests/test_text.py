import pytest

from ctcflow.text import RECIPE_ALPHABET, Tokenizer, min_ctc_frames, normalize


def test_recipe_layout():
    tok = Tokenizer()
    assert tok.num_classes == 29 and tok.blank == 28
    assert tok.encode("'") == [0] and tok.encode(" ") == [1]
    assert tok.encode("az") == [2, 27]


@pytest.mark.parametrize("blank", [0, 5, 28])
def test_round_trip_never_emits_blank(blank):
    tok = Tokenizer(blank=blank)
    text = "what's the time in zurich o'clock"
    ids = tok.encode(text)
    assert blank not in ids
    assert tok.decode(ids) == text
    assert set(tok.encode(RECIPE_ALPHABET)) == set(range(29)) - {blank}


def test_encode_rejects_unknown_characters():
    with pytest.raises(ValueError, match=r"\['5'\]"):
        Tokenizer().encode("call 5")


def test_bad_blank_index():
    with pytest.raises(ValueError, match="blank index 29"):
        Tokenizer(blank=29)


def test_normalize():
    assert normalize("  Turn ON the Lamp, please!  ") == "turn on the lamp please"
    assert normalize("It’s well-known") == "it's well known"
    assert normalize("...") == ""


def test_min_ctc_frames_counts_a_blank_between_repeats():
    tok = Tokenizer()
    assert min_ctc_frames(tok.encode("abc")) == 3
    assert min_ctc_frames(tok.encode("hello")) == 6  # "ll" needs a blank between
    assert min_ctc_frames(tok.encode("aaa")) == 5
    assert min_ctc_frames([]) == 0

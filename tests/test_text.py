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


def test_normalize_options():
    assert normalize("Call 911 on the 21st at 3.5, or 1,200!", spell_digits=True) == \
        "call nine hundred and eleven on the twenty first at three point five or one thousand two hundred"
    assert normalize("Call 911") == "call 911"  # digits are kept here; the manifest stage decides
    assert normalize("Hello, World!", lowercase=False) == "Hello World"
    assert normalize("Hello, world!", punctuation="keep") == "hello, world!"
    assert normalize("«Bonjour» — dit-il…") == "bonjour dit il"  # every Unicode punctuation mark
    assert normalize("cafe\u0301") == "café"  # NFC: a combining accent joins its letter


def test_word_units():
    tok = Tokenizer(("TOMORROW", "RAIN", "NORTH"), blank="last", unit="word")
    assert tok.num_classes == 4 and tok.blank == 3
    assert tok.encode("RAIN TOMORROW  NORTH") == [1, 0, 2]
    assert tok.decode([1, 0, 2]) == "RAIN TOMORROW NORTH"
    assert tok.unknown("RAIN SNOW") == {"SNOW"} and tok.drop_unknown("SNOW RAIN HAIL NORTH") == "RAIN NORTH"
    first = Tokenizer(("A", "B"), blank="first", unit="word")
    assert first.blank == 0 and first.encode("A B") == [1, 2]
    with pytest.raises(ValueError, match=r"units outside the alphabet in 'A C': \['C'\]"):
        first.encode("A C")
    with pytest.raises(ValueError, match="repeated units"):
        Tokenizer(("A", "A"), unit="word")
    with pytest.raises(ValueError, match=r"blank index 28 outside 0…2 for 2 word units"):
        Tokenizer(("A", "B"), blank=28, unit="word")


def test_checkpoint_dicts_old_and_new_rebuild_the_same_tokenizer():
    old = {"alphabet": RECIPE_ALPHABET, "blank": 28}  # checkpoints written before word units
    assert Tokenizer(**old) == Tokenizer() and Tokenizer(**old).encode("hi") == [9, 10]
    words = Tokenizer(("x", "y"), blank="last", unit="word")
    assert words.to_dict() == {"unit": "word", "alphabet": ["x", "y"], "blank": 2}
    assert Tokenizer(**words.to_dict()) == words
    assert Tokenizer(**Tokenizer().to_dict()) == Tokenizer()


def test_load_from_a_directory(tmp_path):
    assert Tokenizer.load(tmp_path) == Tokenizer()  # no tokens.json: the recipe's characters
    (tmp_path / "tokens.json").write_text('{"unit": "word", "alphabet": ["sun", "rain"]}')
    assert Tokenizer.load(tmp_path, blank="last") == Tokenizer(("sun", "rain"), 2, "word")

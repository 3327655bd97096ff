import pytest

from ctcflow.text import RECIPE_ALPHABET, Tokenizer, min_ctc_frames, normalize

RECIPE = Tokenizer(RECIPE_ALPHABET, "last", "char")


def clean(text: str, lowercase: bool = True, punctuation: str = "drop", spell_digits: bool = False) -> str:
    """normalize(): lower case, punctuation dropped, digits as they are, unless told otherwise."""
    return normalize(text, lowercase, punctuation, spell_digits, "en")


def test_recipe_layout():
    tok = RECIPE
    assert tok.num_classes == 29 and tok.blank == 28
    assert tok.encode("'") == [0] and tok.encode(" ") == [1]
    assert tok.encode("az") == [2, 27]


@pytest.mark.parametrize("blank", [0, 5, 28])
def test_round_trip_never_emits_blank(blank):
    tok = Tokenizer(RECIPE_ALPHABET, blank, "char")
    text = "what's the time in zurich o'clock"
    ids = tok.encode(text)
    assert blank not in ids
    assert tok.decode(ids) == text
    assert set(tok.encode(RECIPE_ALPHABET)) == set(range(29)) - {blank}


def test_encode_rejects_unknown_characters():
    with pytest.raises(ValueError, match=r"\['5'\]"):
        RECIPE.encode("call 5")


def test_bad_blank_index():
    with pytest.raises(ValueError, match="blank index 29"):
        Tokenizer(RECIPE_ALPHABET, 29, "char")


def test_normalize():
    assert clean("  Turn ON the Lamp, please!  ") == "turn on the lamp please"
    assert clean("It’s well-known") == "it's well known"
    assert clean("...") == ""


def test_apostrophes_stay_inside_words_only():
    # Quote marks were kept: "‘Hello,’ she said" became "hello' she said", "'hello'" a word of its own.
    assert clean("‘Hello,’ she said, 'it’s ten o'clock'") == "hello she said it's ten o'clock"
    assert clean("the students' books in the '90s and the 90's") == "the students books in the 90s and the 90's"
    assert clean("rock 'n' roll ' ''") == "rock n roll"
    assert clean("'Hello'", punctuation="keep") == "'hello'"  # keep: every mark stays


def test_symbols_read_aloud_are_not_dropped_as_punctuation():
    # Unicode calls them punctuation, but speech says them: "50% off & more" became "fifty off
    # more", a transcript of words the speaker did not say alone. Kept, they are outside the
    # alphabet, so the utterance is rejected (or, with unknown: drop, loses them knowingly).
    assert clean("50% off & more", spell_digits=True) == "fifty % off & more"
    assert clean("AT&T, #1 @home*") == "at&t #1 @home*"
    with pytest.raises(ValueError, match=r"\['%', '&'\]"):
        RECIPE.encode(clean("50% off & more", spell_digits=True))


def test_min_ctc_frames_counts_a_blank_between_repeats():
    tok = RECIPE
    assert min_ctc_frames(tok.encode("abc")) == 3
    assert min_ctc_frames(tok.encode("hello")) == 6  # "ll" needs a blank between
    assert min_ctc_frames(tok.encode("aaa")) == 5
    assert min_ctc_frames([]) == 0


def test_normalize_options():
    assert clean("Call 911 on the 21st at 3.5, or 1,200!", spell_digits=True) == \
        "call nine hundred and eleven on the twenty first at three point five or one thousand two hundred"
    assert clean("Call 911") == "call 911"  # digits are kept here; the manifest stage decides
    assert clean("Hello, World!", lowercase=False) == "Hello World"
    assert clean("Hello, world!", punctuation="keep") == "hello, world!"
    assert clean("«Bonjour» — dit-il…") == "bonjour dit il"  # every Unicode punctuation mark
    assert clean("cafe\u0301") == "café"  # NFC: a combining accent joins its letter
    assert normalize("21st", True, "drop", True, "fr") == "vingt et unième"  # num2words in the language given


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
        Tokenizer(("A", "A"), blank="last", unit="word")
    with pytest.raises(ValueError, match=r"blank index 28 outside 0…2 for 2 word units"):
        Tokenizer(("A", "B"), blank=28, unit="word")


def test_checkpoint_dicts_rebuild_the_same_tokenizer():
    words = Tokenizer(("x", "y"), blank="last", unit="word")
    assert words.to_dict() == {"unit": "word", "alphabet": ["x", "y"], "blank": 2}
    assert Tokenizer(**words.to_dict()) == words
    assert RECIPE.to_dict() == {"unit": "char", "alphabet": "' abcdefghijklmnopqrstuvwxyz", "blank": 28}
    assert Tokenizer(**RECIPE.to_dict()) == RECIPE


def test_load_from_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokens.json not found"):
        Tokenizer.load(tmp_path, blank="last")
    (tmp_path / "tokens.json").write_text('{"unit": "word", "alphabet": ["sun", "rain"]}')
    assert Tokenizer.load(tmp_path, blank="last") == Tokenizer(("sun", "rain"), 2, "word")

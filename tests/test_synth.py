"""The synth stage with real espeak-ng, at tiny sizes."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import merge, run_python, synth_in_fresh_process, tiny_params
from ctcflow.params import ParamsError, load_section
from stages.runner import StageError
from stages.synth import SynthParams, Splits, _SLOT, draw_sentences, draw_speakers, draw_word_lists, load_grammar

GRAMMAR = Path(__file__).resolve().parents[1] / "data" / "demo_grammar.yaml"
LETTERS = set("' abcdefghijklmnopqrstuvwxyz")
TINY = merge(tiny_params()["synth"], {
    "grammar": str(GRAMMAR),
    "num_workers": 2,  # test_same_params_give_identical_files compares with 1
    "voices": ["en-us", "en-us-nyc", "en-gb-scotland"],
    "exclude_variants": ["whisper", "whisperf"],
    "rate_wpm": [150, 230], "pitch": [20, 40], "pitch_range": [30, 80], "word_gap": [1, 2],
    "intonation": [2, 5],
    # Often, so that 20 short utterances surely hold several of each.
    "break_probability": 0.3, "break_ms": [100, 200], "emphasis_probability": 0.3,
    "splits": {
        "train": {"utterances": 12, "speakers": 4},
        "valid": {"utterances": 4, "speakers": 2},
        "test": {"utterances": 4, "speakers": 2},
    },
})


def read_metadata(out_dir: Path) -> list[dict]:
    with open(out_dir / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def synth(params: dict, root: Path) -> Path:
    """The stage on `params` in `root`; returns the corpus it wrote."""
    (root / "params.yaml").write_text(yaml.safe_dump({"synth": params}))
    synth_in_fresh_process(["--params", "params.yaml"], root)
    return root / "data" / "corpus"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synth(TINY, tmp_path_factory.mktemp("corpus"))


def test_wavs_match_metadata(corpus):
    rows = read_metadata(corpus)
    assert len(rows) == 20
    assert list(rows[0]) == ["id", "split", "path", "text", "speaker", "voice", "variant", "rate", "pitch",
                             "pitch_range", "word_gap", "intonation", "ssml", "duration"]
    order = ["train", "valid", "test"]
    assert rows == sorted(rows, key=lambda r: (order.index(r["split"]), r["id"]))
    for r in rows:
        assert r["path"] == f"wav/{r['split']}/{r['id']}.wav"
        info = sf.info(corpus / r["path"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        audio, _ = sf.read(corpus / r["path"], dtype="int16")
        assert np.abs(audio).max() > 1000, f"{r['id']} is nearly silent"
        assert abs(len(audio) / 16000 - float(r["duration"])) < 0.001
        assert 0.5 < float(r["duration"]) < 10


def test_splits_are_speaker_and_sentence_disjoint(corpus):
    rows = read_metadata(corpus)
    # Variants set the timbre: each split has its own, so held-out voices are truly unheard.
    pairs = {s: {r["variant"] for r in rows if r["split"] == s} for s in ("train", "valid", "test")}
    texts = {s: {r["text"] for r in rows if r["split"] == s} for s in ("train", "valid", "test")}
    assert not pairs["train"] & pairs["valid"] and not pairs["train"] & pairs["test"]
    assert not pairs["valid"] & pairs["test"]
    assert not texts["train"] & texts["valid"] and not texts["train"] & texts["test"]
    assert not texts["valid"] & texts["test"]
    assert {r["variant"] for r in rows}.isdisjoint({"whisper", "whisperf"})
    assert {r["voice"] for r in rows} <= {"en-us", "en-us-nyc", "en-gb-scotland"}
    for r in rows:
        assert 150 <= int(r["rate"]) <= 230 and 20 <= int(r["pitch"]) <= 40
        assert 30 <= int(r["pitch_range"]) <= 80 and 1 <= int(r["word_gap"]) <= 2 and 2 <= int(r["intonation"]) <= 5
    # A speaker is one voice setting, the same for every utterance it speaks.
    knobs = ("voice", "variant", "rate", "pitch", "pitch_range", "word_gap", "intonation")
    settings = {(r["speaker"], *(r[k] for k in knobs)) for r in rows}
    assert len(settings) == len({r["speaker"] for r in rows}) == 8


def test_ssml_adds_only_pauses_and_stress_around_the_transcripts_words(corpus):
    rows = read_metadata(corpus)
    breaks = [int(ms) for r in rows for ms in re.findall(r'<break time="(\d+)ms"/>', r["ssml"])]
    emphasized = [w for r in rows for w in re.findall(r"<emphasis>([a-z']+)</emphasis>", r["ssml"])]
    assert len(breaks) >= 5 and all(100 <= ms <= 200 for ms in breaks)
    assert len(emphasized) >= 5
    for r in rows:
        assert re.sub(r"<[^>]*>", " ", r["ssml"]).split() == r["text"].split()


def test_transcripts_use_only_the_alphabet(corpus):
    for r in read_metadata(corpus):
        assert set(r["text"]) <= LETTERS, r["text"]
        assert r["text"] == " ".join(r["text"].split())


def test_same_params_give_identical_files(corpus, tmp_path):
    # One worker instead of two: the output must not depend on scheduling either.
    again = synth({**TINY, "num_workers": 1}, tmp_path)
    assert (again / "metadata.csv").read_bytes() == (corpus / "metadata.csv").read_bytes()
    for r in read_metadata(corpus):
        assert (again / r["path"]).read_bytes() == (corpus / r["path"]).read_bytes(), r["id"]


def test_demo_grammar_covers_the_alphabet_in_short_sentences():
    grammar = load_grammar(GRAMMAR, max_words_per_slot=0)
    vocab = grammar.vocabulary()
    assert 200 <= len(vocab) <= 300
    assert set(" ".join(vocab)) == LETTERS
    for template in grammar.templates:
        refs = _SLOT.findall(template)
        fixed = len(_SLOT.sub(" ", template).split())
        shortest = fixed + sum(min(len(e.split()) for e in grammar.slots[s]) for s in refs)
        longest = fixed + sum(max(len(e.split()) for e in grammar.slots[s]) for s in refs)
        assert 3 <= shortest and longest <= 10, template
        # Enough sentences per template that holding out valid/test leaves most for training.
        assert math.prod(len(grammar.slots[s]) for s in refs) >= 50, template


def test_the_projects_sizes_train_every_held_out_word():
    params = load_section("synth", SynthParams, Path(__file__).resolve().parents[1] / "params.yaml")
    sentences = draw_sentences(load_grammar(GRAMMAR, params.max_words_per_slot), params.splits, params.seed)
    train_words = {w for s in sentences["train"] for w in s.split()}
    held_out = {w for split in ("valid", "test") for s in sentences[split] for w in s.split()}
    assert held_out <= train_words
    assert len(set(sentences["test"])) == params.splits.test.utterances


def test_train_utterances_keep_the_held_out_voices_and_train_speakers_move_them():
    params = load_section("synth", SynthParams, Path(__file__).resolve().parents[1] / "params.yaml")
    splits = params.splits.model_dump()

    def voices(train: dict) -> dict[str, list]:
        changed = params.model_copy(update={"splits": Splits(**{**splits, "train": {**splits["train"], **train}})})
        return {split: [s.voice for s in speakers] for split, speakers in draw_speakers(changed).items()}

    demo = voices({})
    more_utterances = voices({"utterances": 8000, "word_lists": 0})
    assert (more_utterances["valid"], more_utterances["test"]) == (demo["valid"], demo["test"])
    # The shares follow the speaker counts (docs/corpora.md): 300 train speakers of 390 give
    # the held-out splits more of the 104 variants, so other voices.
    fewer_speakers = voices({"speakers": 300})
    variants = {split: {v.variant for v in found} for split, found in fewer_speakers.items()}
    assert len(variants["test"]) > len({v.variant for v in demo["test"]})
    assert not variants["test"] & variants["train"] and not variants["valid"] & variants["train"]


def test_word_lists_are_vocabulary_words_and_spare_the_held_out_transcripts():
    grammar = load_grammar(GRAMMAR, max_words_per_slot=0)
    splits = Splits.model_validate({"train": {"utterances": 50, "speakers": 5, "word_lists": 400},
                                    "valid": {"utterances": 5, "speakers": 1, "word_lists": 30},
                                    "test": {"utterances": 5, "speakers": 1, "word_lists": 30}})
    sentences = draw_sentences(grammar, splits, seed=3)
    lists = draw_word_lists(grammar, splits, 3, (1, 3), sentences)
    assert [len(lists[s]) for s in ("train", "valid", "test")] == [400, 30, 30]
    lengths = [len(t.split()) for t in lists["train"]]
    assert all(100 <= lengths.count(n) <= 170 for n in (1, 2, 3))  # uniform: 133 each on average
    assert {w for t in lists["train"] for w in t.split()} <= grammar.vocabulary()
    held_out = set(lists["valid"]) | set(lists["test"]) | set(sentences["valid"]) | set(sentences["test"])
    assert not held_out & set(lists["train"])
    # Same seed, same lists; more train lists leave the held-out ones as they were.
    bigger = Splits.model_validate({**splits.model_dump(), "train": {"utterances": 50, "speakers": 5, "word_lists": 800}})
    again = draw_word_lists(grammar, bigger, 3, (1, 3), sentences)
    assert again["valid"] == lists["valid"] and again["train"][:400] == lists["train"]
    assert draw_word_lists(grammar, splits, 4, (1, 3), sentences)["train"] != lists["train"]


def test_word_lists_add_utterances_and_leave_every_sentence_as_it_was(corpus, tmp_path):
    more = synth(merge(TINY, {"word_list_words": [1, 2], "splits": {"train": {"word_lists": 3},
                                                                    "test": {"word_lists": 1}}}), tmp_path)
    before, after = read_metadata(corpus), read_metadata(more)
    added = [r for r in after if r["id"] not in {b["id"] for b in before}]
    assert [r["split"] for r in added] == ["train"] * 3 + ["test"]
    assert all(1 <= len(r["text"].split()) <= 2 for r in added)
    for r in added:
        audio, _ = sf.read(more / r["path"], dtype="int16")
        assert np.abs(audio).max() > 1000 and 0.1 < len(audio) / 16000 < 4
    for r in before:
        assert (more / r["path"]).read_bytes() == (corpus / r["path"]).read_bytes(), r["id"]


@pytest.mark.parametrize("context", [False, True])
def test_espeak_digits_benchmark_speaks_each_digit_in_every_test_voice(tmp_path, context):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"synth": TINY}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "espeak_digits.py"
    run_python([str(script), "--out", "digits", *(["--context"] if context else [])], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "digits" / "list.csv")))
    digits = "zero one two three four five six seven eight nine".split()
    assert len(rows) == 20  # the 2 test speakers of TINY, 10 digits each
    assert {r["speaker"] for r in rows} == {"test-spk0000", "test-spk0001"}
    assert sorted(r["text"] for r in rows) == sorted([("dial " if context else "") + d for d in digits] * 2)
    for r in rows:
        audio, rate = sf.read(tmp_path / "digits" / r["path"], dtype="int16")
        assert rate == 16000 and np.abs(audio).max() > 1000
        assert 0.1 < len(audio) / rate < (2.0 if context else 1.2)


def test_max_words_per_slot_shrinks_the_vocabulary():
    full, small = load_grammar(GRAMMAR, max_words_per_slot=0), load_grammar(GRAMMAR, max_words_per_slot=2)
    assert all(len(entries) <= 2 for entries in small.slots.values())
    assert len(small.vocabulary()) < len(full.vocabulary()) * 0.6


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"splits": {"train": {"utterances": -5, "speakers": 2}}}, "synth.splits.train.utterances"),
        ({"sead": 1}, "synth.sead"),
        ({"rate_wpm": [210, 140]}, "synth.rate_wpm"),
        ({"exclude_variants": ["wisper"]}, "synth.exclude_variants"),
        ({"voices": ["en-us", "en-xx"]}, "synth.voices"),
        ({"voices": []}, "synth.voices"),
        ({"pitch": [40, 100]}, "synth.pitch"),
        ({"pitch_range": [90, 20]}, "synth.pitch_range"),
        ({"word_gap": [0, 99]}, "synth.word_gap"),
        ({"intonation": [0, 8]}, "synth.intonation"),
        ({"break_probability": 1.5}, "synth.break_probability"),
        ({"break_ms": [-10, 100]}, "synth.break_ms"),
        ({"emphasis_probability": -0.1}, "synth.emphasis_probability"),
        ({"word_list_words": [0, 3]}, "synth.word_list_words"),
        ({"splits": {"test": {"word_lists": -1}}}, "synth.splits.test.word_lists"),
    ],
)
def test_bad_params_name_the_key(tmp_path, changes, key):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synth": merge(TINY, changes)}))
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_section("synth", SynthParams, params)


def test_espeak_binding():
    # In a child process: speaking here would change this process's espeak state, which the
    # stage's forked workers inherit (see stages/synth.py).
    code = """
from ctcflow import espeak
import numpy as np
assert {"m1", "f3", "klatt", "klatt6", "whisper"} <= set(espeak.list_variants())
assert {"en-us", "en-us-nyc", "en-gb-x-rp", "de"} <= set(espeak.list_voices())
voice = espeak.Voice("en-gb-x-rp", "m3", rate=200, pitch=40, pitch_range=50, word_gap=0, intonation=0)
audio, sr = espeak.synthesize("hello world", voice, ssml=False)
assert sr == 22050 and audio.dtype == np.float32 and 0.3 < len(audio) / sr < 3
assert 0.05 < np.abs(audio).max() <= 1
for name, variant in [("xx-nope", "f3"), ("en-us", "nope")]:
    try:
        espeak.synthesize("hi", espeak.Voice(name, variant, 175, 50, 50, 0, 0), ssml=False)
    except ValueError as err:
        assert "nope" in str(err), err
    else:
        raise AssertionError(name + "+" + variant)
"""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# --- what each knob does to the sound ----------------------------------------------------------

SR = 22050  # espeak's own rate
ESPEAK_DEFAULTS = {"name": "en-us", "variant": "", "rate": 175, "pitch": 50, "pitch_range": 50, "word_gap": 0,
                   "intonation": 0}
SENTENCE = "set the thermostat to twenty one degrees tomorrow morning"

SPEAK_EACH_FRESH = """
import ctypes, json, os, sys
import numpy as np
from ctcflow import espeak
requests, out = json.loads(sys.argv[1]), sys.argv[2]
espeak.initialize()
libc = ctypes.CDLL(None)
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
espeak._lib.espeak_SetPhonemeTrace.argtypes = [ctypes.c_int, ctypes.c_void_p]
for i, (text, voice, ssml) in enumerate(requests):
    if os.fork() == 0:
        trace = libc.fopen(f"{out}/{i}.txt".encode(), b"w")
        espeak._lib.espeak_SetPhonemeTrace(1, trace)  # 1: the phoneme mnemonics espeak speaks
        audio, _ = espeak.synthesize(text, espeak.Voice(**voice), ssml)
        libc.fclose(trace)
        np.save(f"{out}/{i}.npy", audio)
        os._exit(0)
    assert os.wait()[1] == 0, (text, voice)
"""


def speak(tmp_path: Path, *requests: tuple[str, dict, bool]) -> list[tuple[np.ndarray, str]]:
    """(samples, phonemes spoken) for each (text, Voice fields over ESPEAK_DEFAULTS, ssml), each in a
    child of a process that has never spoken: so two requests compare sample for sample."""
    run_python(["-c", SPEAK_EACH_FRESH, json.dumps([(t, {**ESPEAK_DEFAULTS, **v}, s) for t, v, s in requests]),
                str(tmp_path)], tmp_path)
    return [(np.load(tmp_path / f"{i}.npy"), (tmp_path / f"{i}.txt").read_text()) for i in range(len(requests))]


def f0_spread(audio: np.ndarray) -> float:
    """How far the voice's pitch moves: 10th to 90th percentile of F0 over voiced 40 ms frames, in
    semitones. F0 is the autocorrelation peak between 60 and 400 Hz."""
    size, hop = int(0.04 * SR), int(0.01 * SR)
    f0 = []
    for start in range(0, len(audio) - size, hop):
        frame = audio[start:start + size] - audio[start:start + size].mean()
        if np.sqrt((frame ** 2).mean()) < 0.02:
            continue
        corr = np.correlate(frame, frame, "full")[size - 1:]
        lag = SR // 400 + np.argmax(corr[SR // 400:SR // 60])
        if corr[lag] > 0.6 * corr[0]:  # voiced: strongly periodic
            f0.append(SR / lag)
    semitones = 12 * np.log2(f0)
    return float(np.percentile(semitones, 90) - np.percentile(semitones, 10))


def longest_silence(audio: np.ndarray) -> float:
    quiet = np.concatenate([[False], np.abs(audio) < 0.01, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(int)))
    return float((edges[1::2] - edges[::2]).max() / SR)


def log_spectrogram(audio: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(audio, 512)[::256] * np.hanning(512)
    return 20 * np.log10(np.abs(np.fft.rfft(frames)) + 1e-4)


def test_klatt_variants_are_another_synthesizer_with_the_same_timing(tmp_path):
    klatts = [f"klatt{n}" for n in ("", 2, 3, 4, 5, 6)]
    default, again, *spoken = speak(tmp_path, (SENTENCE, {}, False), (SENTENCE, {}, False),
                                    *[(SENTENCE, {"variant": k}, False) for k in klatts])
    assert np.array_equal(default[0], again[0])  # the comparison itself: the same setting is the same audio
    for name, (audio, _) in zip(klatts, spoken):
        assert abs(len(audio) / len(default[0]) - 1) < 0.03, name  # the same prosody...
        n = min(len(audio), len(default[0]))
        gap = np.abs(log_spectrogram(audio[:n]) - log_spectrogram(default[0][:n])).mean()
        assert gap > 6, name  # ...through a different synthesizer: 15–19 dB apart here
    assert len({a.tobytes() for a, _ in spoken}) == len(klatts)


def test_pitch_range_widens_the_f0_spread(tmp_path):
    (narrow, _), (wide, _) = speak(tmp_path, (SENTENCE, {"pitch_range": 10}, False),
                                   (SENTENCE, {"pitch_range": 90}, False))
    assert f0_spread(narrow) < 1.5 and f0_spread(wide) > 3  # 1.0 and 4.1 semitones here


def test_intonation_group_changes_the_tune(tmp_path):
    (own, _), (group3, _) = speak(tmp_path, (SENTENCE, {}, False), (SENTENCE, {"intonation": 3}, False))
    assert f0_spread(group3) < f0_spread(own) - 1  # group 3 rises and falls less: 2.3 against 4.1 here


def test_word_gap_pauses_between_words(tmp_path):
    text = "don't turn off the lights"
    (plain, _), (gapped, _) = speak(tmp_path, (text, {}, False), (text, {"word_gap": 3}, False))
    per_gap = (len(gapped) - len(plain)) / SR / 4
    assert 0.02 < per_gap < 0.1  # 68 ms here


def test_ssml_break_adds_its_silence_and_no_words(tmp_path):
    plain, broken = speak(tmp_path, ("don't turn off the lights", {}, False),
                          ("don't turn off the <break time=\"500ms\"/> lights", {}, True))
    assert (len(broken[0]) - len(plain[0])) / SR == pytest.approx(0.5, abs=0.1)
    assert longest_silence(plain[0]) < 0.15 and 0.45 < longest_silence(broken[0]) < 0.6
    assert spoken_words(broken[1]) == spoken_words(plain[1])


def spoken_words(trace: str) -> list[str]:
    """The words in espeak's phoneme trace, without stress marks and pauses, which SSML may change."""
    return re.sub(r"_[!:]?|[',]", "", trace).split()


def test_ssml_speaks_exactly_the_transcript(tmp_path):
    text = "text mom call me back at ten o'clock"
    ssml = ("text <break time=\"300ms\"/> <emphasis>mom</emphasis> call me <break time=\"100ms\"/> back at ten"
            " <emphasis>o'clock</emphasis>")
    (plain, plain_trace), (marked, marked_trace), (_, other_trace) = speak(
        tmp_path, (text, {}, False), (ssml, {}, True), (text.replace("ten", "two"), {}, False))
    assert spoken_words(marked_trace) == spoken_words(plain_trace)
    assert spoken_words(other_trace) != spoken_words(plain_trace)  # the check tells words apart
    # Emphasis stretches the stressed words a little; the breaks add their 0.4 s.
    assert 0.4 < (len(marked) - len(plain)) / SR < 0.7


def test_a_crashed_child_stops_the_stage(tmp_path):
    # espeak does crash now and then (a segfault in WavegenFill on a rare setting); a
    # multiprocessing.Pool would then wait forever for the lost task.
    code = """
import os, signal
from pathlib import Path
from ctcflow.espeak import Voice
from stages import synth
from stages.runner import StageError

def speak(job):
    if job[0].name == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if job[0].name == "odd":
        raise StageError("odd length")
    return [job[0].name]

synth._speak = speak
voice = Voice("en-us", "Demonic", 175, 50, 50, 0, 0)
jobs = lambda *names: [(synth.Speaker("train", name, voice), [], Path("."), 16000) for name in names]
assert sorted(synth.speak_each_in_own_child(jobs("a", "b", "c"), 2)) == [["a"], ["b"], ["c"]]
for names, message in [(("a", "crash", "b"), "espeak crashed (exit code -11) speaking crash"),
                       (("odd", "a"), "odd length")]:
    try:
        list(synth.speak_each_in_own_child(jobs(*names), 2))
    except StageError as err:
        assert message in str(err), err
    else:
        raise AssertionError(names)
"""
    run_python(["-c", code], tmp_path)


@pytest.mark.parametrize(
    "grammar, message",
    [
        ({"templates": ["turn {state} the lamp"], "slots": {"state": [True, False]}}, "quote them"),
        ({"templates": ["call {who} now"], "slots": {"name": ["kate"]}}, "undefined slots"),
        ({"templates": ["Call {name}!"], "slots": {"name": ["kate"]}}, "may hold only"),
        ({"templates": ["call {name} now"], "slots": {"name": ["kate"], "x": ["y"]}}, "no template"),
    ],
)
def test_bad_grammar_is_a_stage_error(tmp_path, grammar, message):
    path = tmp_path / "grammar.yaml"
    path.write_text(yaml.safe_dump(grammar))
    with pytest.raises(StageError, match=message):
        load_grammar(path, max_words_per_slot=0)


@pytest.mark.parametrize(("text", "message"), [
    ("templates: [call {name}\nslots: {", r"synth.grammar: .*grammar.yaml: not valid YAML: "),
    # PyYAML kept the second list alone, and the sentences lost kate without a word.
    ("templates: ['call {name} now']\nslots:\n  name: [kate]\n  name: [max]\n",
     r"synth.grammar: .*grammar.yaml: not valid YAML: duplicate key 'name' \(the second would silently win\)\n  in \".*grammar.yaml\", line 4"),
    ("templates: ['call {name} now']\nslots: {name: [k\xe9te]}\n".encode("latin-1"),
     r"synth.grammar: .*grammar.yaml: not a grammar file: byte 47 is not UTF-8 text$"),
    ("- call {name} now\n", r"grammar.yaml: needs a 'templates' list of strings and a 'slots' mapping"),
    ("templates: [[call, now]]\nslots: {name: [kate]}\n", r"needs a 'templates' list of strings"),
])
def test_a_grammar_that_is_no_grammar_file_is_a_stage_error(tmp_path, text, message):
    # These used to be a yaml ParserError, an AttributeError and a TypeError, each a traceback.
    path = tmp_path / "grammar.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(StageError, match=message):
        load_grammar(path, max_words_per_slot=0)


def test_too_small_a_grammar_is_a_stage_error(tmp_path):
    path = tmp_path / "grammar.yaml"
    path.write_text(yaml.safe_dump({"templates": ["call {name} now"], "slots": {"name": ["kate", "max"]}}))
    params = SynthParams.model_validate({**TINY, "grammar": str(path)})
    with pytest.raises(StageError, match="too few distinct sentences"):
        draw_sentences(load_grammar(path, params.max_words_per_slot), params.splits, params.seed)


def test_ctrl_c_while_children_speak_is_the_stage_s_one_line(tmp_path):
    # A terminal's Ctrl-C sends SIGINT to the whole process group, the children speaking too:
    # each used to add a KeyboardInterrupt traceback of its own to the stage's one line.
    import signal

    from conftest import interrupt_when_ready, make_project

    params = merge(tiny_params(), {"synth": {"num_workers": 2, "splits": {
        "train": {"utterances": 2000, "speakers": 40, "word_lists": 0}}}})
    root = make_project(tmp_path, params)
    # Several files written: both children have started speaking, and the next ones are at it.
    returncode, err = interrupt_when_ready(["-m", "stages.synth", "--params", "params.yaml"], root,
                                           lambda: len(list((root / "data/corpus/wav").rglob("*.wav"))) >= 20)
    assert "Traceback" not in err, err
    assert err.endswith("ctcflow synth: interrupted\n"), err
    assert returncode == -signal.SIGINT

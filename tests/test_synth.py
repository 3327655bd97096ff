"""The synth stage with real espeak-ng, at tiny sizes."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import merge, synth_in_fresh_process, tiny_params
from ctcflow.params import ParamsError, load_section
from stages.runner import StageError
from stages.synth import SynthParams, _SLOT, draw_sentences, load_grammar

GRAMMAR = Path(__file__).resolve().parents[1] / "data" / "demo_grammar.yaml"
LETTERS = set("' abcdefghijklmnopqrstuvwxyz")
TINY = merge(tiny_params()["synth"], {
    "grammar": str(GRAMMAR),
    "num_workers": 2,  # test_same_params_give_identical_files compares with 1
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
    assert list(rows[0]) == ["id", "split", "path", "text", "speaker", "voice", "variant", "rate", "pitch", "duration"]
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
    for r in rows:
        assert 140 <= int(r["rate"]) <= 210 and 25 <= int(r["pitch"]) <= 75
    assert len({r["speaker"] for r in rows}) == 8


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
assert {"m1", "f3", "klatt", "whisper"} <= set(espeak.list_variants())
audio, sr = espeak.synthesize("hello world", "en-gb-x-rp", "m3", rate=200, pitch=40)
assert sr == 22050 and audio.dtype == np.float32 and 0.3 < len(audio) / sr < 3
assert 0.05 < np.abs(audio).max() <= 1
for voice, variant in [("xx-nope", "f3"), ("en-us", "nope")]:
    try:
        espeak.synthesize("hi", voice, variant)
    except ValueError as err:
        assert "nope" in str(err), err
    else:
        raise AssertionError(voice + "+" + variant)
"""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


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


def test_too_small_a_grammar_is_a_stage_error(tmp_path):
    path = tmp_path / "grammar.yaml"
    path.write_text(yaml.safe_dump({"templates": ["call {name} now"], "slots": {"name": ["kate", "max"]}}))
    params = SynthParams.model_validate({**TINY, "grammar": str(path)})
    with pytest.raises(StageError, match="too few distinct sentences"):
        draw_sentences(load_grammar(path, params.max_words_per_slot), params.splits, params.seed)

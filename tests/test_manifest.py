"""The manifest stage on the original recipe's JSON format, with every kind of bad input it must survive."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
import soundfile as sf

from conftest import section, tiny_tokenizer
from ctcflow.data import FeatureSplit
from ctcflow.errors import CtcflowError
from ctcflow.manifest import read_manifest
from stages.runner import StageError
from stages import featurize, manifest


@pytest.fixture()
def recipe_corpus(tiny_pipeline, tmp_path) -> Path:
    """train.json/test.json in the recipe's format over real speech, plus one of each bad input."""
    corpus = pd.read_csv(tiny_pipeline / "data/corpus/metadata.csv", dtype=str, keep_default_na=False)
    audio = tmp_path / "corpus" / "clips"
    audio.mkdir(parents=True)
    lines = {"train": [], "test": []}
    for row in corpus.itertuples():
        split = "test" if row.split == "test" else "train"
        shutil.copy(tiny_pipeline / "data/corpus" / row.path, audio / f"{row.id}.wav")
        lines[split].append({"key": f"clips/{row.id}.wav", "text": row.text.upper() + "."})

    # A stereo 44.1 kHz copy of a real utterance: accepted, then down-mixed and resampled.
    speech, rate = sf.read(audio / f"{corpus.id[0]}.wav")
    stereo = np.stack([speech, 0.5 * speech], axis=1)
    import torch
    import torchaudio.functional as AF
    stereo_44k = AF.resample(torch.from_numpy(stereo.T.copy()).float(), rate, 44100).T.numpy()
    sf.write(audio / "stereo 44k ünïcode.flac", stereo_44k, 44100)
    lines["train"].append({"key": "clips/stereo 44k ünïcode.flac", "text": corpus.text[0]})

    (audio / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    (audio / "empty.wav").write_bytes(b"")
    sf.write(audio / "short.wav", speech[:1600], rate)  # 0.1 s: far too short for its transcript
    sf.write(audio / "ok_audio.wav", speech, rate)
    sf.write(audio / "digits.wav", speech, rate)
    lines["train"] += [
        {"key": "clips/garbage.wav", "text": "turn on the light"},
        {"key": "clips/empty.wav", "text": "turn on the light"},
        {"key": "clips/missing.wav", "text": "turn on the light"},
        {"key": "clips/short.wav", "text": "turn on the kitchen light please"},
        {"key": "clips/ok_audio.wav", "text": "  ...  "},
        {"key": "clips/digits.wav", "text": "call 911"},
        {"key": f"clips/{corpus.id[0]}.wav", "text": "a duplicate id"},
    ]
    for split, rows in lines.items():
        (tmp_path / "corpus" / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "corpus"


def params_for(corpus: Path, **overrides) -> manifest.ManifestParams:
    settings = {"source": "recipe_json", "corpus_dir": str(corpus), "train_json": str(corpus / "train.json"),
                "test_json": str(corpus / "test.json"), "valid_fraction": 0.2, "min_duration": 0.05}
    return section("manifest", manifest.ManifestParams, **{**settings, **overrides})


EXPECTED_REASONS = {
    "garbage": "unreadable_audio",
    "empty": "empty_file",
    "missing": "missing_file",
    "short": "too_short_for_transcript",
    "ok_audio": "empty_transcript",
}


def test_bad_input_is_rejected_with_its_reason_and_nothing_else_is_lost(recipe_corpus, tmp_path):
    out, metrics_file = tmp_path / "manifests", tmp_path / "manifest.json"
    metrics = manifest.run(params_for(recipe_corpus), out_dir=out, metrics_file=metrics_file)

    rejects = pd.read_json(out / "rejects.jsonl", lines=True, dtype=str)
    assert len(rejects) == 7
    for utt_id, reason in EXPECTED_REASONS.items():
        assert reason in set(rejects.loc[rejects["id"] == utt_id, "reason"]), utt_id
    digits = rejects[rejects["reason"] == "digits_in_transcript"].iloc[0]
    assert (digits.id, digits.text) == ("digits", "call 911") and "call 911" in digits.detail
    duplicate = rejects[rejects["reason"] == "duplicate_id"].iloc[0]
    assert duplicate.text == "a duplicate id"

    accepted = pd.concat([read_manifest(out / f"{s}.jsonl") for s in ("train", "valid", "test")])
    # 42 good utterances + the stereo file; everything else is in rejects — nothing vanished.
    assert len(accepted) + len(rejects) == 42 + 1 + 7
    assert set(accepted["split"]) == {"train", "valid", "test"}
    assert len(accepted[accepted["split"] == "test"]) == 6
    stereo = accepted[accepted["id"] == "stereo 44k ünïcode"].iloc[0]
    assert (stereo.sample_rate, stereo.num_channels) == (44100, 2)
    # Normalization: the recipe's upper-case, punctuated text becomes the model's alphabet.
    assert all(t == t.lower() and "." not in t for t in accepted["text_normalized"])
    assert metrics["rejected"] == {"total": 7, "unreadable_audio": 1, "empty_file": 1, "missing_file": 1,
                                   "too_short_for_transcript": 1, "empty_transcript": 1,
                                   "digits_in_transcript": 1, "duplicate_id": 1}
    assert json.loads(metrics_file.read_text()) == metrics


def test_featurize_downmixes_and_resamples(recipe_corpus, tmp_path):
    manifest.run(params_for(recipe_corpus), out_dir=tmp_path / "manifests", metrics_file=tmp_path / "m.json")
    features = tmp_path / "features"
    featurize.run(section("featurize", featurize.FeaturizeParams), manifest_dir=tmp_path / "manifests",
                  out_dir=features, metrics_file=tmp_path / "f.json")
    split = FeatureSplit(features, "train", tiny_tokenizer())
    index = split.index.set_index("id")
    if "stereo 44k ünïcode" not in index.index:
        split = FeatureSplit(features, "valid", tiny_tokenizer())
        index = split.index.set_index("id")
    row = index.loc["stereo 44k ünïcode"]
    assert row.num_frames == int(row.duration * 16000) // 160 + 1


def test_a_split_left_empty_fails_the_stage_with_a_clear_message(recipe_corpus, tmp_path):
    with pytest.raises(StageError, match=r"no usable utterances left in split\(s\) \['train', 'valid', 'test'\]"):
        manifest.run(params_for(recipe_corpus, min_duration=20.0, max_duration=25.0),
                     out_dir=tmp_path / "m", metrics_file=tmp_path / "m.json")
    # The rejects file is still written, so the user can see why.
    assert len(pd.read_json(tmp_path / "m" / "rejects.jsonl", lines=True)) == 50



def test_a_hand_edited_manifest_line_is_one_error_naming_the_file(recipe_corpus, tmp_path):
    manifests = tmp_path / "manifests"
    manifest.run(params_for(recipe_corpus), out_dir=manifests, metrics_file=tmp_path / "m.json")
    train = manifests / "train.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:2] + ['{"id": "edited", "path": '] + lines[2:]) + "\n")
    # It was pandas' "Expected object or value at position ..." traceback, naming no file.
    expected = f"manifest {train}: not the JSON lines the manifest stage writes"
    with pytest.raises(CtcflowError, match=re.escape(expected)):
        featurize.run(section("featurize", featurize.FeaturizeParams), manifest_dir=manifests,
                      out_dir=tmp_path / "features", metrics_file=tmp_path / "f.json")
    with pytest.raises(CtcflowError, match=re.escape(expected)):
        read_manifest(train)


def tone(path: Path, seconds: float) -> None:
    """A 16 kHz chirp of `seconds`: the manifest reads headers only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t), 16000)


def tiny_librispeech(root: Path) -> None:
    """Readers 19 and 26 in train-clean-5, 84 in dev-clean (its flac missing), 61 in test-clean."""
    for subset, reader, text in [("train-clean-5", "19", "NORTHANGER ABBEY"), ("train-clean-5", "26", "CHAPTER ONE"),
                                 ("dev-clean", "84", "GO DO YOU HEAR"), ("test-clean", "61", "HE BEGAN")]:
        folder = root / subset / reader / "7"
        folder.mkdir(parents=True)
        (folder / f"{reader}-7.trans.txt").write_text(f"{reader}-7-0000 {text}\n")
        if reader != "84":
            tone(folder / f"{reader}-7-0000.flac", 1.5)


def run_tiny(tmp_path: Path, **settings) -> dict:
    return manifest.run(section("manifest", manifest.ManifestParams, **{"num_workers": 1, **settings}),
                        out_dir=tmp_path / "m", metrics_file=tmp_path / "m.json")


def test_a_held_out_split_left_empty_by_rejects_fails_instead_of_taking_training_speakers(tmp_path):
    tiny_librispeech(tmp_path / "ls")
    rejects = tmp_path / "m" / "rejects.jsonl"
    # It was valid = speaker 19 or 26 (training speakers), printed as "speakers from manifest.held_out_speakers".
    with pytest.raises(StageError, match=re.escape(
            "manifest.held_out_speakers.valid: every row of speaker(s) ['84'] was rejected, so the valid split "
            f"would be empty; reasons are in {rejects}")):
        run_tiny(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "ls"),
                 held_out_speakers={"valid": [84], "test": [61]})
    assert pd.read_json(rejects, lines=True)[["id", "reason"]].values.tolist() == [["84-7-0000", "missing_file"]]
    # No held-out speakers: the corpus's own dev-clean is the valid split, and it is not drawn from train either.
    with pytest.raises(StageError, match=re.escape(
            f"every row of the corpus's valid split (manifest.corpus_dir {tmp_path / 'ls'} (source librispeech)) was "
            f"rejected, so the valid split would be empty; reasons are in {rejects}")):
        run_tiny(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "ls"))
    # A corpus that defines no split still has one made among its usable rows.
    (tmp_path / "flat").mkdir()
    for reader in ("19", "26", "84", "61"):
        shutil.copytree(next((tmp_path / "ls").glob(f"*/{reader}")), tmp_path / "flat" / reader)
    metrics = run_tiny(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "flat"))
    assert [metrics[s]["utterances"] for s in ("train", "valid", "test")] == [1, 1, 1]


def test_a_table_s_own_test_split_left_empty_fails_naming_the_table(tmp_path):
    for name in ("a", "b", "c"):
        tone(tmp_path / f"{name}.wav", 1.5)
    table = tmp_path / "list.csv"
    table.write_text("path,text,split\na.wav,hello,train\nb.wav,hello,train\nc.wav,hello,valid\ngone.wav,hello,test\n")
    columns = {"path": "path", "text": "text", "speaker": None, "split": "split", "id": None}
    with pytest.raises(StageError, match=re.escape(
            f"every row of the corpus's test split (manifest.table {table} (column manifest.columns.split)) was "
            f"rejected, so the test split would be empty; reasons are in {tmp_path / 'm' / 'rejects.jsonl'}")):
        run_tiny(tmp_path, source="table", corpus_dir=str(tmp_path), table=str(table), columns=columns)


def test_the_same_audio_under_two_ids_is_listed_once(tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        tone(tmp_path / "corpus" / f"{name}.wav", 1.5)
    table = tmp_path / "corpus" / "list.csv"
    table.write_text("id,path,text\nu1,a.wav,hello\nu2,b.wav,hello\nu3,c.wav,hello\nu4,d.wav,hello\n"
                     "u5,e.wav,hello\nu6,./e.wav,hello again\n")  # the same file, spelled another way
    columns = {"path": "path", "text": "text", "speaker": None, "split": None, "id": "id"}
    metrics = run_tiny(tmp_path, source="table", corpus_dir=str(tmp_path / "corpus"), table=str(table), columns=columns)
    out = tmp_path / "m"
    listed = pd.concat([read_manifest(out / f"{s}.jsonl") for s in ("train", "valid", "test")])
    assert sorted(listed["id"]) == ["u1", "u2", "u3", "u4", "u5"]  # it was u6 in train and u5 in test
    rejects = pd.read_json(out / "rejects.jsonl", lines=True, dtype=str)
    assert rejects[["id", "reason"]].values.tolist() == [["u6", "duplicate_audio"]]
    assert rejects.detail[0] == f"{tmp_path / 'corpus' / '.' / 'e.wav'} is already listed, as id 'u5'"
    assert metrics["rejected"] == {"total": 1, "duplicate_audio": 1}


def test_a_training_set_repeating_a_test_set_never_trains_on_it(tmp_path, monkeypatch):
    tiny_librispeech(tmp_path / "ls")
    tone(tmp_path / "ls/dev-clean/84/7/84-7-0000.flac", 1.5)
    folder = tmp_path / "data/test_sets/held"
    for name in ("x", "y", "z"):
        tone(folder / f"{name}.wav", 1.5)
    (folder / "list.csv").write_text("path,text\nx.wav,hello\ny.wav,good night\n")
    (folder / "more.csv").write_text("path,text\nx.wav,hello\nz.wav,good night\n")  # x: the test set's
    columns = {"path": "path", "text": "text", "speaker": None, "split": None, "id": None}
    monkeypatch.chdir(tmp_path)
    metrics = run_tiny(tmp_path, source="librispeech", corpus_dir="ls",
                       test_sets={"held": {"source": "table", "corpus_dir": "data/test_sets/held",
                                           "table": "data/test_sets/held/list.csv", "columns": columns}},
                       train_sets={"more": {"source": "table", "corpus_dir": "data/test_sets/held",
                                            "table": "data/test_sets/held/more.csv", "columns": columns}})
    # x was trained on and tested on (its id is new to the main corpus: only the audio shows it).
    assert sorted(read_manifest(tmp_path / "m/train.jsonl")["id"]) == ["19-7-0000", "26-7-0000", "z"]
    assert sorted(read_manifest(tmp_path / "m/held.jsonl")["id"]) == ["x", "y"]
    rejects = pd.read_json(tmp_path / "m/rejects.jsonl", lines=True, dtype=str)
    assert rejects[["id", "split", "reason"]].values.tolist() == [["x", "train", "duplicate_audio"]]
    assert metrics["rejected"] == {"total": 1, "duplicate_audio": 1}


@pytest.mark.parametrize("settings, message", [
    ({"alphabet": "' ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
     "manifest.alphabet \"' ABCDEFGHIJKLMNOPQRSTUVWXYZ\" has no lowercase letter, but manifest.text.lowercase is true"),
    ({"alphabet": "'abcdefghijklmnopqrstuvwxyz"},
     "manifest.alphabet \"'abcdefghijklmnopqrstuvwxyz\" has no space: every transcript of more than one word"),
])
def test_an_alphabet_that_cannot_spell_the_transcripts_fails_before_any_file_is_read(settings, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        section("manifest", manifest.ManifestParams, **settings)
    # The same alphabets where they fit: text kept in case, or words as units.
    if "A" in settings["alphabet"]:
        section("manifest", manifest.ManifestParams, **settings, text={"lowercase": False})
    section("manifest", manifest.ManifestParams, **settings, units="word", vocabulary="words.txt")
    section("manifest", manifest.ManifestParams, alphabet="' 你好")  # a script without case

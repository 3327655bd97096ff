"""The manifest stage on the original recipe's JSON format, with every kind of bad input it must survive."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
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

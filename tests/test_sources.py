"""The manifest stage on a small corpus in each layout it reads, checked row by row.

The manifest reads headers only, so the audio is a synthetic signal of known length, rate and
channel count, written here in the format each corpus ships (FLAC, MP3, WAV).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from pydantic import ValidationError

from conftest import merge, run_ctcflow, section, tiny_params
from ctcflow import sources
from ctcflow.manifest import read_manifest
from ctcflow.params import ParamsError, load_section
from ctcflow.sources import SourceError
from ctcflow.text import Tokenizer
from stages import manifest
from stages.runner import StageError


def tone(path: Path, seconds: float, rate: int = 16000, channels: int = 1, **kwargs) -> None:
    """A quiet chirp of `seconds` at `rate`, in the format the suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    sf.write(path, np.repeat(signal[:, None], channels, axis=1), rate, **kwargs)


def run_manifest(tmp_path: Path, **settings) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """All accepted rows (train, valid, test in order), the metrics, and the rejects."""
    out = tmp_path / "manifests"
    metrics = manifest.run(section("manifest", manifest.ManifestParams, **{"num_workers": 1, **settings}), out_dir=out,
                           metrics_file=tmp_path / "manifest.json")
    rows = pd.concat([read_manifest(out / f"{s}.jsonl") for s in ("train", "valid", "test")], ignore_index=True)
    rejects = pd.read_json(out / "rejects.jsonl", lines=True, dtype=str) if (out / "rejects.jsonl").stat().st_size > 1 \
        else pd.DataFrame(columns=["id", "reason"])
    return rows, metrics, rejects


def expect_rows(rows: pd.DataFrame, expected: list[dict]) -> None:
    """Every expected row is in the manifest, column by column, and nothing else is."""
    by_id = rows.set_index("id")
    assert sorted(by_id.index) == sorted(e["id"] for e in expected)
    for e in expected:
        row = by_id.loc[e["id"]]
        for column, value in e.items():
            if column == "id":
                continue
            if column == "duration":
                assert row.duration == pytest.approx(value, abs=e.get("_tolerance", 1e-4)), e["id"]
            elif not column.startswith("_"):
                assert row[column] == value, (e["id"], column, row[column], value)


LIBRI = {  # subset → reader → chapter → [(utterance number, transcript, seconds)]
    "train-clean-5": {"19": {"198": [(0, "NORTHANGER ABBEY", 1.2), (1, "THAT'S THE WAY OF IT", 1.5)]},
                      "26": {"495": [(0, "CHAPTER ONE", 1.0)]}},
    "dev-clean-2": {"84": {"121123": [(0, "GO DO YOU HEAR", 1.1)]}},
    "test-clean": {"61": {"70968": [(12, "HE BEGAN A CONFUSED COMPLAINT", 1.9)]}},
}


def make_librispeech(root: Path, subsets: bool = True) -> list[dict]:
    expected = []
    for subset, readers in LIBRI.items():
        for reader, chapters in readers.items():
            for chapter, utterances in chapters.items():
                folder = (root / subset if subsets else root) / reader / chapter
                lines = []
                for number, text, seconds in utterances:
                    utt = f"{reader}-{chapter}-{number:04d}"
                    tone(folder / f"{utt}.flac", seconds)
                    lines.append(f"{utt} {text}\n")
                    expected.append({"id": utt, "audio_path": str(folder / f"{utt}.flac"), "duration": seconds,
                                     "sample_rate": 16000, "num_channels": 1, "text": text,
                                     "text_normalized": text.lower(), "speaker": reader,
                                     "split": {"train": "train", "dev-c": "valid", "test-": "test"}[subset[:5]]})
                (folder / f"{reader}-{chapter}.trans.txt").write_text("".join(lines))
    return expected


def test_librispeech_subsets_give_the_splits_and_readers_the_speakers(tmp_path):
    expected = make_librispeech(tmp_path / "LibriSpeech")
    rows, metrics, rejects = run_manifest(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "LibriSpeech"))
    expect_rows(rows, expected)
    # The file itself, as the later stages read it: every column, in this order.
    first = json.loads((tmp_path / "manifests/test.jsonl").read_text().splitlines()[0])
    assert list(first.items()) == [
        ("id", "61-70968-0012"), ("audio_path", str(tmp_path / "LibriSpeech/test-clean/61/70968/61-70968-0012.flac")),
        ("duration", 1.9), ("sample_rate", 16000), ("num_channels", 1), ("text", "HE BEGAN A CONFUSED COMPLAINT"),
        ("text_normalized", "he began a confused complaint"), ("speaker", "61"), ("split", "test")]
    assert len(rejects) == 0
    assert metrics["train"] == {"utterances": 3, "hours": round(3.7 / 3600, 4), "speakers": 2}
    assert json.loads((tmp_path / "manifests" / "tokens.json").read_text()) == {"unit": "char", "alphabet": "' abcdefghijklmnopqrstuvwxyz"}


def test_librispeech_without_subsets_is_split_speaker_disjoint(tmp_path):
    """One subset folder given as the corpus: the stage makes the splits, never splitting a reader."""
    root = tmp_path / "train-other"
    for reader in range(12):
        folder = root / str(100 + reader) / "7"
        lines = []
        for n in range(4):
            utt = f"{100 + reader}-7-{n:04d}"
            tone(folder / f"{utt}.flac", 1.0 + 0.1 * n)
            lines.append(f"{utt} SOME WORDS\n")
        (folder / f"{100 + reader}-7.trans.txt").write_text("".join(lines))
    rows, metrics, _ = run_manifest(tmp_path, source="librispeech", corpus_dir=str(root),
                                    valid_fraction=0.1, test_fraction=0.1, num_workers=2)
    assert len(rows) == 48
    speakers = {split: set(rows.loc[rows["split"] == split, "speaker"]) for split in ("train", "valid", "test")}
    assert all(speakers.values())
    assert not (speakers["train"] & speakers["valid"] or speakers["train"] & speakers["test"]
                or speakers["valid"] & speakers["test"])
    assert metrics["valid"]["speakers"] == metrics["test"]["speakers"] == 1  # 4 of 48 utterances ≈ 10 %
    # Every row's speaker is its reader folder, and the seed makes the split repeatable.
    assert all(row.id.startswith(row.speaker + "-") for row in rows.itertuples())
    again, _, _ = run_manifest(tmp_path / "again", source="librispeech", corpus_dir=str(root),
                               valid_fraction=0.1, test_fraction=0.1)
    assert again.equals(rows)


CV_CLIPS = {  # split file → [(client_id, clip, sentence, seconds)]
    "train": [("a1f3", "common_voice_en_1.mp3", "Hello, world!", 1.5),
              ("a1f3", "common_voice_en_2.mp3", "It’s a \"quoted\" word.", 2.0),
              ("b7c9", "common_voice_en_3.mp3", "Well-known facts; nothing more.", 2.5)],
    "dev": [("c2d2", "common_voice_en_4.mp3", "What's up?", 1.2)],
    "test": [("d4e5", "common_voice_en_5.mp3", "Good night.", 1.4)],
}
CV_NORMALIZED = {"Hello, world!": "hello world", "It’s a \"quoted\" word.": "it's a quoted word",
                 "Well-known facts; nothing more.": "well known facts nothing more", "What's up?": "what's up",
                 "Good night.": "good night"}


def make_common_voice(root: Path, files: dict[str, list]) -> list[dict]:
    expected = []
    for name, clips in files.items():
        lines = ["client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment"]
        for client, clip, sentence, seconds in clips:
            tone(root / "clips" / clip, seconds, rate=48000)
            lines.append(f"{client}\t{clip}\tx\t{sentence}\t\t2\t0\t\t\t\t\ten\t")
            expected.append({"id": clip[:-4], "audio_path": str(root / "clips" / clip), "duration": seconds,
                             "_tolerance": 0.08, "sample_rate": 48000, "num_channels": 1, "text": sentence,
                             "text_normalized": CV_NORMALIZED[sentence], "speaker": client,
                             "split": {"train": "train", "dev": "valid", "test": "test"}.get(name)})
        (root / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return expected


def test_common_voice_tsv_splits_with_mp3_clips(tmp_path):
    expected = make_common_voice(tmp_path / "cv", CV_CLIPS)
    rows, metrics, rejects = run_manifest(tmp_path, source="common_voice", corpus_dir=str(tmp_path / "cv"))
    expect_rows(rows, expected)
    assert len(rejects) == 0 and metrics["train"]["speakers"] == 2


def test_common_voice_validated_only_is_split_by_client(tmp_path):
    clips = [(f"client{c}", f"cv_{c}_{n}.mp3", "Good night.", 1.4) for c in range(10) for n in range(2)]
    expected = make_common_voice(tmp_path / "cv", {"validated": clips})
    rows, metrics, _ = run_manifest(tmp_path, source="common_voice", corpus_dir=str(tmp_path / "cv"),
                                    valid_fraction=0.1, test_fraction=0.1)
    expect_rows(rows, [{k: v for k, v in e.items() if k != "split"} for e in expected])
    assert {s: metrics[s]["utterances"] for s in ("train", "valid", "test")} == {"train": 16, "valid": 2, "test": 2}
    assert metrics["valid"]["speakers"] == metrics["test"]["speakers"] == 1


def test_ljspeech_uses_the_normalized_column_and_splits_by_utterance(tmp_path):
    root = tmp_path / "LJSpeech-1.1"
    lines, expected = [], []
    for n in range(20):
        utt = f"LJ001-{n + 1:04d}"
        raw, normalized = (f"Printing, in the {n + 1}th century", f"Printing, in the {n + 1}th century") if n else \
            ("In 1450 Dr. Gutenberg printed", "In fourteen fifty Doctor Gutenberg printed")
        tone(root / "wavs" / f"{utt}.wav", 1.6, rate=22050, subtype="PCM_16")
        lines.append(f"{utt}|{raw}|{normalized}")
        expected.append({"id": utt, "audio_path": str(root / "wavs" / f"{utt}.wav"), "duration": round(int(1.6 * 22050) / 22050, 4),
                         "sample_rate": 22050, "num_channels": 1, "text": normalized, "speaker": ""})
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    rows, metrics, rejects = run_manifest(tmp_path, source="ljspeech", corpus_dir=str(root),
                                          valid_fraction=0.1, test_fraction=0.1, text={"digits": "spell"})
    expect_rows(rows, expected)
    by_id = rows.set_index("id")
    assert by_id.loc["LJ001-0001", "text_normalized"] == "in fourteen fifty doctor gutenberg printed"
    assert by_id.loc["LJ001-0003", "text_normalized"] == "printing in the third century"
    assert by_id.loc["LJ001-0020", "text_normalized"] == "printing in the twentieth century"
    # One speaker: the held-out splits are made by utterance.
    assert {s: metrics[s]["utterances"] for s in ("train", "valid", "test")} == {"train": 16, "valid": 2, "test": 2}


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl"])
def test_table_with_its_own_column_names(tmp_path, suffix):
    root = tmp_path / "my corpus"
    records, expected = [], []
    for n, (speaker, subset, text) in enumerate([("ann", "train", "Turn on the light"), ("bob", "train", "Open, the door!"),
                                                 ("cy", "dev", "good morning"), ("dee", "test", "good night")]):
        relative = f"audio/{speaker}/{n} clip ü.wav"
        tone(root / relative, 1.0 + n / 10, rate=16000, channels=1 + n % 2)
        records.append({"file": relative, "transcription": text, "spk": speaker, "subset": subset, "uid": f"u{n}"})
        expected.append({"id": f"u{n}", "audio_path": str(root / relative), "duration": 1.0 + n / 10, "sample_rate": 16000,
                         "num_channels": 1 + n % 2, "text": text, "speaker": speaker,
                         "split": {"dev": "valid"}.get(subset, subset)})
    table = root / f"list.{suffix}"
    if suffix == "jsonl":
        table.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        pd.DataFrame(records).to_csv(table, sep="\t" if suffix == "tsv" else ",", index=False)
    rows, _, rejects = run_manifest(tmp_path, source="table", corpus_dir=str(root), table=str(table),
                                    columns={"path": "file", "text": "transcription", "speaker": "spk",
                                             "split": "subset", "id": "uid"})
    expect_rows(rows, expected)
    assert rows.set_index("id").loc["u1", "text_normalized"] == "open the door"
    assert len(rejects) == 0


def test_table_names_a_missing_column(tmp_path):
    table = tmp_path / "list.csv"
    table.write_text("wav,sentence\na.wav,hello\n")
    with pytest.raises(SourceError, match=r"no column\(s\) \['path', 'text'\]; it has \['wav', 'sentence'\]"):
        run_manifest(tmp_path, source="table", corpus_dir=str(tmp_path), table=str(table))


def test_recipe_json_without_its_key_column_says_what_the_format_needs(tmp_path):
    # It said "set manifest.columns", a param recipe_json never reads.
    (tmp_path / "train.json").write_text(json.dumps({"path": "a.wav", "text": "hello"}) + "\n")
    with pytest.raises(sources.SourceError, match=r"train.json: no column\(s\) \['key'\]; it has \['path', 'text'\] "
                                                  r"\(the format needs \['key', 'text'\]\)$"):
        sources.recipe_json(tmp_path / "train.json", tmp_path / "train.json", None)


def test_recipe_json_keys(tmp_path):
    root = tmp_path / "recipe"
    expected = []
    for split, n in (("train", 6), ("test", 2)):
        lines = []
        for i in range(n):
            tone(root / "clips" / f"{split}{i}.wav", 1.0, rate=8000)
            lines.append(json.dumps({"key": f"clips/{split}{i}.wav", "text": "Hello there."}) + "\n")
            expected.append({"id": f"{split}{i}", "audio_path": str(root / "clips" / f"{split}{i}.wav"), "duration": 1.0,
                             "sample_rate": 8000, "num_channels": 1, "text": "Hello there.",
                             "text_normalized": "hello there", "speaker": ""})
        (root / f"{split}.json").write_text("".join(lines))
    rows, metrics, _ = run_manifest(tmp_path, source="recipe_json", corpus_dir=str(root), valid_fraction=0.2,
                                    train_json=str(root / "train.json"), test_json=str(root / "test.json"))
    expect_rows(rows, expected)
    assert set(rows.loc[rows["id"].str.startswith("test"), "split"]) == {"test"}
    assert metrics["valid"]["utterances"] == 1  # 20 % of the 6 training rows


@pytest.mark.parametrize("rules, text, normalized, reason", [
    ({}, "Call 911 now", None, "digits_in_transcript"),
    ({"digits": "spell"}, "Call 911 now", "call nine hundred and eleven now", None),
    ({"digits": "keep"}, "Call 911 now", None, "characters_outside_vocabulary"),
    ({"punctuation": "keep"}, "Hello, world", None, "characters_outside_vocabulary"),
    ({"lowercase": False}, "Hello", None, "characters_outside_vocabulary"),
    ({}, "Привет мир", None, "characters_outside_vocabulary"),
    ({"unknown": "drop"}, "naïve café", "nave caf", None),
    ({"unknown": "drop"}, "Привет мир", None, "empty_transcript"),
])
def test_normalization_params(tmp_path, rules, text, normalized, reason):
    root = tmp_path / "c"
    tone(root / "a.wav", 2.5)
    for split in ("train", "valid", "test"):
        tone(root / f"{split}.wav", 1.0)
    rows = [{"path": "a.wav", "text": text, "split": "train"}] + \
        [{"path": f"{s}.wav", "text": "ok", "split": s} for s in ("train", "valid", "test")]
    pd.DataFrame(rows).to_csv(root / "list.csv", index=False)
    out, _, rejects = run_manifest(tmp_path, source="table", corpus_dir=str(root), table=str(root / "list.csv"),
                                   columns={"split": "split"}, text=rules)
    if reason:
        assert list(rejects["reason"]) == [reason] and list(rejects["id"]) == ["a"]
    else:
        assert out.set_index("id").loc["a", "text_normalized"] == normalized and len(rejects) == 0


def test_word_units_from_a_vocabulary_file(tmp_path):
    root = tmp_path / "c"
    (root).mkdir()
    (root / "glosses.txt").write_text("MORNING\nRAIN\nTOMORROW\n\nNORTH\n")
    rows = []
    for n, (text, split) in enumerate([("TOMORROW RAIN", "train"), ("MORNING  NORTH", "valid"),
                                       ("TOMORROW SNOW", "train"), ("RAIN", "test")]):
        np.save(root / f"{n}.npy", np.zeros((30, 8), dtype=np.float32))
        rows.append({"path": f"{n}.npy", "text": text, "split": split})
    pd.DataFrame(rows).to_csv(root / "list.csv", index=False)
    out, _, rejects = run_manifest(tmp_path, source="table", corpus_dir=str(root), table=str(root / "list.csv"),
                                   columns={"split": "split"}, input="features", feature_frame_rate=25,
                                   units="word", vocabulary=str(root / "glosses.txt"), ctc_frame_rate=25)
    by_id = out.set_index("id")
    assert by_id.loc["1", "text_normalized"] == "morning north"
    assert (by_id.loc["0", "duration"], by_id.loc["0", "sample_rate"], by_id.loc["0", "num_channels"]) == (1.2, 25, 8)
    assert list(rejects["reason"]) == ["words_outside_vocabulary"] and "snow" in rejects["detail"][0]
    units = json.loads((tmp_path / "manifests" / "tokens.json").read_text())
    assert units == {"unit": "word", "alphabet": ["morning", "rain", "tomorrow", "north"]}
    assert Tokenizer.load(tmp_path / "manifests", blank="last").encode("north rain") == [3, 1]


def test_bad_manifest_params_name_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    bad = merge(tiny_params()["manifest"], {"source": "kaldi", "text": {"digits": "roman", "language": "klingon"}})
    params.write_text(yaml.safe_dump({"manifest": bad}))
    with pytest.raises(ParamsError) as err:
        load_section("manifest", manifest.ManifestParams, params)
    for key in ("manifest.source", "manifest.text.digits", "manifest.text.language: Value error, num2words has no language 'klingon'"):
        assert key in str(err.value)
    params.write_text(yaml.safe_dump({"manifest": {**tiny_params()["manifest"], "source": "table"}}))
    with pytest.raises(ParamsError, match="source table needs manifest.table"):
        load_section("manifest", manifest.ManifestParams, params)


def test_librispeech_follows_symbolic_links(tmp_path):
    """Subsets linked into one folder, a common way to assemble a corpus, are found."""
    expected = make_librispeech(tmp_path / "real")
    (tmp_path / "linked").mkdir()
    for subset in LIBRI:
        (tmp_path / "linked" / subset).symlink_to(tmp_path / "real" / subset)
    rows, _, _ = run_manifest(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "linked"))
    expect_rows(rows, [{**e, "audio_path": e["audio_path"].replace("/real/", "/linked/")} for e in expected])


FSDD = [("0_george_0", 0.5), ("7_jackson_12", 0.6), ("9_lucas_49", 0.4), ("3_nicolas_5", 0.7)]


def test_fsdd_file_names_give_the_transcript_and_the_speaker(tmp_path):
    root = tmp_path / "free-spoken-digit-dataset"  # the repository root: the reader takes its recordings/
    for name, seconds in FSDD:
        tone(root / "recordings" / f"{name}.wav", seconds, rate=8000, subtype="PCM_16")
    for bad in ("seven_jackson_1", "7_jackson", "12_lucas_3"):
        tone(root / "recordings" / f"{bad}.wav", 0.5, rate=8000, subtype="PCM_16")
    (root / "README.md").write_text("# Free Spoken Digit Dataset\n")
    rows, metrics, rejects = run_manifest(tmp_path, source="fsdd", corpus_dir=str(root),
                                          held_out_speakers={"valid": ["lucas"], "test": ["nicolas"]})
    words = {"0": "zero", "7": "seven", "9": "nine", "3": "three"}
    expect_rows(rows, [{"id": name, "audio_path": str(root / "recordings" / f"{name}.wav"), "duration": seconds,
                        "sample_rate": 8000, "num_channels": 1, "text": words[name[0]],
                        "text_normalized": words[name[0]], "speaker": name.split("_")[1],
                        "split": {"lucas": "valid", "nicolas": "test"}.get(name.split("_")[1], "train")}
                       for name, seconds in FSDD])
    # Names off the pattern are rejects with their own reason, never opened and never dropped.
    assert sorted(zip(rejects["id"], rejects["reason"])) == [
        ("12_lucas_3", "bad_file_name"), ("7_jackson", "bad_file_name"), ("seven_jackson_1", "bad_file_name")]
    assert "{digit}_{speaker}_{index}.wav" in rejects["detail"][0]
    assert metrics["rejected"] == {"total": 3, "bad_file_name": 3}
    # The folder of recordings itself reads the same (as text: two Rejected are never ==).
    assert sources.fsdd(root / "recordings").astype(str).equals(sources.fsdd(root).astype(str))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no \.wav files in .*empty: expected FSDD's recordings"):
        sources.fsdd(tmp_path / "empty")
    # A folder of other recordings said "held_out_speakers.valid: unknown speaker(s) ['nicolas']; the corpus has 0".
    for name in ("hello.wav", "b_take2.wav"):
        tone(tmp_path / "other" / name, 0.5, rate=8000)
    with pytest.raises(SourceError, match=r"^none of the 2 \.wav files in .*other fits FSDD's "
                                          r"\{digit\}_\{speaker\}_\{index\}\.wav \(the first: b_take2\.wav\): is it FSDD\?$"):
        sources.fsdd(tmp_path / "other")


def test_held_out_speakers_override_the_corpus_splits(tmp_path):
    """LibriSpeech readers 19 and 26 train, 84 is dev, 61 test; held out: 61 → valid, 19 → test."""
    make_librispeech(tmp_path / "LibriSpeech")
    rows, metrics, _ = run_manifest(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "LibriSpeech"),
                                    held_out_speakers={"valid": [61], "test": [19]})  # numbers, as YAML reads them
    assert {split: sorted(rows.loc[rows["split"] == split, "id"]) for split in ("train", "valid", "test")} == {
        "train": ["26-495-0000", "84-121123-0000"], "valid": ["61-70968-0012"],
        "test": ["19-198-0000", "19-198-0001"]}
    assert [metrics[s]["speakers"] for s in ("train", "valid", "test")] == [2, 1, 1]


def test_held_out_speakers_must_be_the_corpus_s_and_in_one_split_each(tmp_path):
    make_librispeech(tmp_path / "LibriSpeech")
    with pytest.raises(StageError, match=r"manifest.held_out_speakers.test: unknown speaker\(s\) \['george'\]; "
                                         r"the corpus has 4: 19, 26, 61, 84"):
        run_manifest(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "LibriSpeech"),
                     held_out_speakers={"valid": ["61"], "test": ["19", "george"]})
    with pytest.raises(ValidationError, match=r"speaker\(s\) \['61'\] are in both valid and test"):
        section("manifest", manifest.ManifestParams, held_out_speakers={"valid": ["61"], "test": ["61", "19"]})


def test_a_split_named_no_speaker_is_drawn_from_the_others_by_its_fraction(tmp_path):
    """Only test held out (19, two utterances): valid is one speaker of the other three, by valid_fraction."""
    make_librispeech(tmp_path / "LibriSpeech")
    rows, metrics, _ = run_manifest(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "LibriSpeech"),
                                    held_out_speakers={"valid": [], "test": [19]})
    assert sorted(rows.loc[rows["split"] == "test", "id"]) == ["19-198-0000", "19-198-0001"]
    valid, train = rows.loc[rows["split"] == "valid"], rows.loc[rows["split"] == "train"]
    assert len(valid) == 1 and len(train) == 2
    assert set(valid["speaker"]) | set(train["speaker"]) == {"26", "61", "84"}
    assert not set(valid["speaker"]) & set(train["speaker"])


def test_a_small_corpus_holds_out_usable_utterances(tmp_path):
    """Splits are made among the usable rows: 10 good recordings among 30 missing ones still give
    valid and test one utterance each (the default 5 %, at least one), never a rejected one."""
    root = tmp_path / "small"
    names = [f"good{n}" for n in range(10)]
    for name in names:
        tone(root / f"{name}.wav", 1.0)
    listed = [*names, *(f"missing{n}" for n in range(30))]
    pd.DataFrame({"path": [f"{n}.wav" for n in listed], "text": "hello"}).to_csv(root / "list.csv", index=False)
    rows, metrics, rejects = run_manifest(tmp_path, source="table", corpus_dir=str(root), table=str(root / "list.csv"))
    assert [metrics[s]["utterances"] for s in ("train", "valid", "test")] == [8, 1, 1]
    assert sorted(rows["id"]) == names
    # Rejects belong to no split: the corpus gave none, and none was made for them.
    assert len(rejects) == 30 and set(rejects["reason"]) == {"missing_file"} and set(rejects["split"]) == {""}

    # Three usable rows are enough for one each.
    pd.DataFrame({"path": [f"{n}.wav" for n in names[:3]], "text": "hello"}).to_csv(root / "list.csv", index=False)
    _, metrics, _ = run_manifest(tmp_path, source="table", corpus_dir=str(root), table=str(root / "list.csv"))
    assert [metrics[s]["utterances"] for s in ("train", "valid", "test")] == [1, 1, 1]


def test_train_sets_add_every_usable_row_to_train(tmp_path):
    """FSDD with george and nicolas held out, plus a table of synthetic voices: all its usable rows
    train, whatever split it gives them; held-out speakers name the main corpus's speakers only."""
    root = tmp_path / "fsdd"
    for name, seconds in FSDD:
        tone(root / f"{name}.wav", seconds, rate=8000, subtype="PCM_16")
    synthetic = tmp_path / "voices"
    for name in ("v1-seven", "v2-nine", "0_george_0"):
        tone(synthetic / f"{name}.wav", 0.5)
    pd.DataFrame({"path": ["v1-seven.wav", "v2-nine.wav", "0_george_0.wav", "gone.wav"],
                  "text": ["seven", "nine", "zero", "one"], "speaker": ["v1", "george", "v3", "v4"],
                  "split": ["train", "test", "valid", "train"]}).to_csv(synthetic / "list.csv", index=False)
    columns = {"path": "path", "text": "text", "speaker": "speaker", "split": "split", "id": None}
    rows, metrics, rejects = run_manifest(
        tmp_path, source="fsdd", corpus_dir=str(root), held_out_speakers={"valid": ["nicolas"], "test": ["george"]},
        train_sets={"voices": {"source": "table", "corpus_dir": str(synthetic), "table": str(synthetic / "list.csv"),
                               "columns": columns}})
    assert {split: sorted(rows.loc[rows["split"] == split, "id"]) for split in ("train", "valid", "test")} == {
        "train": ["7_jackson_12", "9_lucas_49", "v1-seven", "v2-nine"], "valid": ["3_nicolas_5"], "test": ["0_george_0"]}
    # A speaker named like a held-out one trains all the same: it is another corpus's "george".
    assert rows.set_index("id").loc["v2-nine", "speaker"] == "george"
    # Nothing lost: the id FSDD already has, and the missing file, are rejects of train.
    assert sorted(zip(rejects["id"], rejects["split"], rejects["reason"])) == [
        ("0_george_0", "train", "duplicate_id"), ("gone", "train", "missing_file")]
    assert metrics["train"]["utterances"] == 4
    assert metrics["train_sets"] == {"voices": {"utterances": 2, "hours": round(1.0 / 3600, 4), "speakers": 2}}
    # A training set with no usable row is a mistake to report, like an empty split.
    pd.DataFrame({"path": ["gone.wav"], "text": ["one"]}).to_csv(synthetic / "gone.csv", index=False)
    with pytest.raises(StageError, match=r"no usable utterances left in split\(s\) \['train_sets.gone'\]"):
        run_manifest(tmp_path, source="fsdd", corpus_dir=str(root), held_out_speakers={"valid": ["nicolas"], "test": ["george"]},
                     train_sets={"gone": {"source": "table", "corpus_dir": str(synthetic), "table": str(synthetic / "gone.csv"),
                                          "columns": {**columns, "speaker": None, "split": None}}})
    with pytest.raises(ValidationError, match=r"train_sets.voices\n  Value error, source table needs table and columns"):
        section("manifest", manifest.ManifestParams,
                train_sets={"voices": {"source": "table", "corpus_dir": "voices", "table": None, "columns": None}})


@pytest.mark.parametrize("test_sets, message", [
    ({"test": {"source": "fsdd", "corpus_dir": "data/test_sets/fsdd"}}, r"bad name\(s\) \['test'\]"),
    ({"rejects": {"source": "fsdd", "corpus_dir": "data/test_sets/fsdd"}}, r"bad name\(s\) \['rejects'\]"),
    ({"features.json": {"source": "fsdd", "corpus_dir": "data/test_sets/fsdd"}}, r"bad name\(s\) \['features.json'\]"),
    ({"../up": {"source": "fsdd", "corpus_dir": "data/test_sets/fsdd"}}, r"bad name\(s\) \['../up'\]"),
    ({"fsdd": {"source": "fsdd", "corpus_dir": "/data/fsdd"}}, "corpus_dir /data/fsdd must lie under data/test_sets/"),
    ({"fsdd": {"source": "fsdd", "corpus_dir": "data/test_sets/../fsdd"}}, "must lie under data/test_sets/"),
    ({"mine": {"source": "table", "corpus_dir": "data/test_sets/mine", "table": "lists/mine.csv",
               "columns": {"path": "path", "text": "text", "speaker": None, "split": None, "id": None}}},
     "table lists/mine.csv must lie under data/test_sets/"),
    ({"mine": {"source": "table", "corpus_dir": "data/test_sets/mine"}}, "source table needs table and columns"),
    ({"old": {"source": "recipe_json", "corpus_dir": "data/test_sets/old"}}, r"test_sets.old.source\n  Input should be 'demo'"),
])
def test_bad_test_sets_name_the_problem(test_sets, message):
    sets = {name: {"table": None, "columns": None, **s} for name, s in test_sets.items()}
    with pytest.raises(ValidationError, match=message):
        section("manifest", manifest.ManifestParams, test_sets=sets)


def test_readers_name_the_file_and_line_that_is_not_utf8(tmp_path):
    """A Latin-1 é in LibriSpeech's or LJSpeech's transcripts, or the demo's metadata without its
    split column: the file (and line) is named, not a UnicodeDecodeError or a KeyError."""
    libri = tmp_path / "LibriSpeech" / "19" / "198"
    libri.mkdir(parents=True)
    (libri / "19-198.trans.txt").write_bytes(b"19-198-0000 NORTHANGER ABBEY\n19-198-0001 CAF\xe9 AU LAIT\n")
    with pytest.raises(SourceError, match=r"19-198.trans.txt, line 2: not UTF-8 text \(invalid continuation byte"):
        sources.librispeech(tmp_path / "LibriSpeech")
    (tmp_path / "LJ").mkdir()
    (tmp_path / "LJ" / "metadata.csv").write_bytes(b"LJ001-0001|Cafe|Cafe\nLJ001-0002|Caf\xe9|Caf\xe9\n")
    with pytest.raises(SourceError, match=r"LJ/metadata.csv, line 2: not UTF-8 text"):
        sources.ljspeech(tmp_path / "LJ")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "metadata.csv").write_text("id,path,text,speaker\na,a.wav,hello,s1\n")
    with pytest.raises(SourceError, match=r"demo/metadata.csv: no column\(s\) \['split'\]; the synth stage writes"):
        sources.demo(tmp_path / "demo")


def test_jsonl_values_are_read_as_json_gives_them(tmp_path):
    """Numeric ids stay "1" (pandas made them 1.0 once a row lacked one); a row without an id, or
    with an empty one, gets its file name; a transcript that is a list or an object is a reject."""
    root = tmp_path / "c"
    records = [{"id": 1, "path": "a.wav", "text": "hello"}, {"id": 2, "path": "b.wav", "text": "hello"},
               {"path": "sub/c.wav", "text": "hello"}, {"id": "", "path": "d.wav", "text": "hello"},
               {"id": 5, "path": "e.wav", "text": ["hello", "world"]}, {"id": 6, "path": "f.wav", "text": {"en": "hi"}},
               {"id": 7, "path": "g.wav", "text": 42}]
    for r in records:
        tone(root / r["path"], 1.0)
    (root / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, metrics, rejects = run_manifest(tmp_path, source="table", corpus_dir=str(root), table=str(root / "list.jsonl"),
                                          columns={"id": "id"})
    assert sorted(rows["id"]) == ["1", "2", "c", "d"]
    assert list(zip(rejects["id"], rejects["reason"], rejects["text"])) == [
        ("5", "bad_transcript", '["hello", "world"]'), ("6", "bad_transcript", '{"en": "hi"}'),
        ("7", "bad_transcript", "42")]
    assert metrics["rejected"] == {"total": 3, "bad_transcript": 3}


def test_an_extra_set_s_split_column_is_not_read(tmp_path):
    """Every row of a test set is in that set, so a split value the main corpus would refuse is no error."""
    make_librispeech(tmp_path / "LibriSpeech")
    festival = tmp_path / "data/test_sets/festival"
    for name in ("a", "b"):
        tone(festival / f"{name}.wav", 1.0)
    (festival / "list.csv").write_text("path,text,split\na.wav,hello,heldout\nb.wav,good night,\n")
    columns = {"path": "path", "text": "text", "speaker": None, "split": "split", "id": None}
    with contextlib.chdir(tmp_path):
        _, metrics, _ = run_manifest(tmp_path, source="librispeech", corpus_dir="LibriSpeech", test_sets={
            "festival": {"source": "table", "corpus_dir": "data/test_sets/festival",
                         "table": "data/test_sets/festival/list.csv", "columns": columns}})
    assert metrics["test_sets"]["festival"]["utterances"] == 2
    assert sorted(read_manifest(tmp_path / "manifests/festival.jsonl")["id"]) == ["a", "b"]


def manifest_error(capsys, tmp_path: Path, **settings) -> str:
    """`ctcflow manifest` with the tiny project's params and `settings`, run in `tmp_path`: it fails,
    and says why without a traceback; what it printed."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"manifest": merge(tiny_params()["manifest"], settings)}))
    with contextlib.chdir(tmp_path):
        code, _, err = run_ctcflow(capsys, "manifest", "--params", "params.yaml")
    assert code == 1 and "Traceback" not in err, err
    return err.strip()


PARAMS_ERROR = "ctcflow manifest: error: params.yaml: bad or missing value in section 'manifest':\n  "


@pytest.mark.parametrize("settings, message", [
    ({"seed": -1}, "manifest.seed: Input should be greater than or equal to 0 (got -1)"),
    ({"units": "bpe", "bpe_vocab_size": 2}, "manifest.bpe_vocab_size: 2 is below 29, the least for units bpe: a piece "
                                            "for each character of manifest.alphabet but the space, plus '▁' and <unk>"),
    # A cross-field check names its key, without the whole section after it.
    ({"test_sets": {"a/b": {"source": "fsdd", "corpus_dir": "data/test_sets/x", "table": None, "columns": None}}},
     "manifest.test_sets: bad name(s) ['a/b']: letters, digits, '_', '.', '-', and none of ['train', 'valid', 'test', "
     "'rejects', 'features.json', 'tokens.json', 'test_sets.json', 'rejects.jsonl', 'warnings.jsonl']"),
    ({"min_duration": 5.0, "max_duration": 1.0}, "manifest: min_duration 5.0 must be below max_duration 1.0"),
])
def test_bad_params_are_refused_before_any_file_is_read(capsys, tmp_path, settings, message):
    assert manifest_error(capsys, tmp_path, **settings) == PARAMS_ERROR + message


@pytest.mark.parametrize("settings, message", [
    ({"source": "table", "table": "c/nope.csv"}, "manifest.table c/nope.csv not found"),
    ({"source": "table", "table": "c"}, "manifest.table c is a directory: name a .csv, .tsv or .jsonl file"),
    ({"units": "word", "vocabulary": "c"}, "manifest.vocabulary c is a directory: name a file with one unit per line"),
    ({"test_sets": {"t": {"source": "table", "corpus_dir": "data/test_sets/t", "table": "data/test_sets/t/list.csv",
                          "columns": {"path": "wav", "text": "text", "speaker": None, "split": None, "id": None}}}},
     "data/test_sets/t/list.csv: no column(s) ['wav']; it has ['path', 'text'] (set manifest.test_sets.t.columns)"),
    ({"train_sets": {"espeak": {"source": "demo", "corpus_dir": "nowhere", "table": None, "columns": None}}},
     "nowhere/metadata.csv not found: run the synth stage, or set manifest.train_sets.espeak.source"),
])
def test_a_bad_corpus_setting_is_one_line_naming_its_key(capsys, tmp_path, settings, message):
    for folder in ("c", "data/test_sets/t"):
        tone(tmp_path / folder / "a.wav", 1.0)
        (tmp_path / folder / "list.csv").write_text("path,text\na.wav,hello\n")
    main = {"source": "table", "corpus_dir": "c", "table": "c/list.csv", "columns": {"path": "path", "text": "text"}}
    assert manifest_error(capsys, tmp_path, **{**main, **settings}) == f"ctcflow manifest: error: {message}"


# Defects a reviewer found with tiny hand-made corpora: each was read silently wrong, or said too little.

def test_an_unbalanced_quote_names_the_line_where_its_row_starts(tmp_path):
    """The quote swallowed the rows after it into one transcript: 3 of 6 rows vanished."""
    table = tmp_path / "list.csv"
    table.write_text('path,text,speaker\nz.wav,fine,s0\na.wav,"Quoted start, then more,s1\n'
                     'b.wav,hello,s2\nc.wav,"hi",s3\nd.wav,x,s4\ne.wav,y,s5\n')
    with pytest.raises(SourceError, match=r"list.csv, line 3: a cell runs over several lines \(an unbalanced quote\?\)"):
        sources.table(table, "path", "text", "speaker", None, None)


@pytest.mark.parametrize("body, message", [
    # One extra field made pandas take the first column as the index: transcripts became ' hello there'.
    ("a.wav,hello there,s1,\nb.wav,good night,s2\n", "line 2: 4 fields, the header has 3"),
    # A trailing comma on every row: every row was rejected as missing_file.
    ("a.wav,hello there,s1,\nb.wav,good night,s2,\n", "line 2: 4 fields, the header has 3"),
    # A short row was padded with an empty speaker.
    ("a.wav,hello there,s1\nb.wav,good night\n", "line 3: 2 fields, the header has 3"),
])
def test_a_row_whose_field_count_differs_from_the_header_s_names_its_line(tmp_path, body, message):
    table = tmp_path / "list.csv"
    table.write_text("path,text,speaker\n" + body)
    with pytest.raises(SourceError, match=rf"list.csv, {message} \(a stray ',', or one missing\?\)$"):
        sources.table(table, "path", "text", "speaker", None, None)


def test_ljspeech_line_with_a_fourth_field_is_an_error(tmp_path):
    """A '|' in the first line's text made 4 columns and a wrong transcript, silently."""
    (tmp_path / "metadata.csv").write_text("LJ001-0001|Pipes | bars|Pipes bars\nLJ001-0002|Good night|Good night\n")
    with pytest.raises(SourceError, match=r"metadata.csv, line 1: 4 fields, expected at most 3 separated by '\|'$"):
        sources.ljspeech(tmp_path)


def test_librispeech_audio_without_a_transcript_line_is_a_reject(tmp_path):
    """19-198-0009.flac, which no .trans.txt line names, appeared nowhere."""
    expected = make_librispeech(tmp_path / "LibriSpeech")
    orphan = tmp_path / "LibriSpeech/train-clean-5/19/198/19-198-0009.flac"
    tone(orphan, 1.0)
    rows, metrics, rejects = run_manifest(tmp_path, source="librispeech", corpus_dir=str(tmp_path / "LibriSpeech"))
    expect_rows(rows, expected)
    assert list(zip(rejects["id"], rejects["split"], rejects["audio_path"], rejects["reason"])) == [
        ("19-198-0009", "train", str(orphan), "missing_transcript")]
    assert metrics["rejected"] == {"total": 1, "missing_transcript": 1}


def test_librispeech_transcripts_with_a_tab_or_a_bom(tmp_path):
    """A tab after the id gave the id '26-495-0001\\tTAB', a BOM the id '\\ufeff27-496-0000': both missing_file."""
    for reader, chapter, lines in (("26", "495", "26-495-0000 CHAPTER ONE\n26-495-0001\tTAB SEPARATED\n"),
                                   ("27", "496", "\ufeff27-496-0000 WITH A BOM\n")):
        folder = tmp_path / reader / chapter
        folder.mkdir(parents=True)
        (folder / f"{reader}-{chapter}.trans.txt").write_bytes(lines.encode())
    entries = sources.librispeech(tmp_path)
    assert list(zip(entries["id"], entries["text"], entries["speaker"])) == [
        ("26-495-0000", "CHAPTER ONE", "26"), ("26-495-0001", "TAB SEPARATED", "26"), ("27-496-0000", "WITH A BOM", "27")]


def test_fsdd_reads_other_audio_formats_and_says_what_it_left_out(tmp_path, capsys):
    """7_george_1.flac and 8_george_2.mp3 were ignored, and sub/1_lucas_0.wav too, without a word."""
    for name in ("0_george_0.wav", "7_george_1.flac", "8_george_2.mp3", "sub/1_lucas_0.wav"):
        tone(tmp_path / name, 0.5, rate=8000)
    entries = sources.fsdd(tmp_path)
    assert list(zip(entries["id"], entries["text"], entries["speaker"])) == [
        ("0_george_0", "zero", "george"), ("7_george_1", "seven", "george"), ("8_george_2", "eight", "george")]
    assert entries["audio_path"].tolist() == [str(tmp_path / n) for n in ("0_george_0.wav", "7_george_1.flac", "8_george_2.mp3")]
    assert capsys.readouterr().err == (f"fsdd: 1 sub-folder(s) or file(s) not .wav/.flac/.ogg/.mp3 in {tmp_path} "
                                       "left out (the first: sub)\n")


def test_table_strips_spaces_around_ids_paths_and_speakers(tmp_path):
    """'alice ' trained while held_out_speakers.test named alice."""
    tone(tmp_path / "a.wav", 1.0)
    (tmp_path / "list.csv").write_text("id,path,text,speaker\n u1 , a.wav ,hello,alice \n")
    entries = sources.table(tmp_path / "list.csv", "path", "text", "speaker", None, "id")
    assert entries[["id", "audio_path", "text", "speaker"]].values.tolist() == [
        ["u1", str(tmp_path / "a.wav"), "hello", "alice"]]


def test_recipe_json_ids_are_unique_across_folders(tmp_path):
    """train/0001.wav and test/0001.wav were both 0001: the test rows were rejected as duplicate_id."""
    for split in ("train", "test"):
        (tmp_path / f"{split}.json").write_text("".join(
            json.dumps({"key": f"{split}/000{n}.wav", "text": "hello"}) + "\n" for n in (1, 2)))
    entries = sources.recipe_json(tmp_path / "train.json", tmp_path / "test.json", None)
    assert list(zip(entries["id"], entries["split"])) == [
        ("train/0001", "train"), ("train/0002", "train"), ("test/0001", "test"), ("test/0002", "test")]
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(SourceError, match=r"^manifest.train_json .*dir.json is a directory: name a JSON-lines file$"):
        sources.recipe_json(tmp_path / "dir.json", tmp_path / "test.json", None)


def test_a_jsonl_table_with_a_bom_is_read_like_a_csv_one(tmp_path):
    """CSV and TSV with a BOM were read; JSON lines stopped with 'Unexpected UTF-8 BOM'."""
    (tmp_path / "list.jsonl").write_bytes(("\ufeff" + json.dumps({"path": "a.wav", "text": "hello"}) + "\n").encode())
    entries = sources.table(tmp_path / "list.jsonl", "path", "text", None, None, None)
    assert entries[["id", "text"]].values.tolist() == [["a", "hello"]]


def test_corpus_messages_name_the_params_key(tmp_path):
    with pytest.raises(SourceError, match=r"^.*metadata.csv not found: set manifest.test_sets.lj.corpus_dir to the "
                                          r"LJSpeech folder \(metadata.csv, wavs/\)$"):
        sources.ljspeech(tmp_path, "manifest.test_sets.lj")
    with pytest.raises(SourceError, match=r"^manifest.corpus_dir .* has no train.tsv, dev.tsv, test.tsv or validated.tsv"):
        sources.common_voice(tmp_path)
    (tmp_path / "list.csv").write_text("path,text,split\na.wav,hello,eval\nb.wav,hello,val\nc.wav,hello,train\n")
    with pytest.raises(SourceError, match=r"list.csv: unknown split name\(s\) \['eval', 'val'\] in the column that "
                                          r"manifest.columns.split names; expected train"):
        sources.table(tmp_path / "list.csv", "path", "text", None, "split", None)

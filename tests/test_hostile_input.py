"""Every kind of hostile input, through manifest and featurize: each handled, each counted, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from conftest import REPO, make_project, section, tiny_params
from ctcflow.manifest import read_manifest
from stages.runner import StageError
from stages import featurize, manifest

RATES = (8000, 11025, 22050, 32000, 44100, 48000)


def chirp(seconds: float, rate: int, channels: int = 1, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    signal = level * np.sin(2 * np.pi * (200 + 300 * t) * t)
    return np.repeat(signal[:, None], channels, axis=1) * np.linspace(1, 0.5, channels)


def write(root: Path, name: str, samples: np.ndarray, rate: int = 16000, **kwargs) -> str:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    sf.write(root / name, samples, rate, **kwargs)
    return name


def build_corpus(root: Path) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """Table rows, and the expected manifest / featurize reason for each bad row's id."""
    root.mkdir(parents=True)
    rows: list[dict] = []

    def row(utt_id: str, path: str, text: object = "hello world", split: str = "train") -> None:
        rows.append({"id": utt_id, "path": path, "text": text, "split": split})

    # Usable, some only after down-mixing or resampling.
    for split in ("train", "train", "valid", "test"):
        row(f"good_{len(rows)}", write(root, f"good_{len(rows)}.wav", chirp(1.0, 16000)), split=split)
    row("stereo", write(root, "stereo.wav", chirp(1.0, 44100, channels=2), 44100))
    row("surround", write(root, "surround.flac", chirp(1.0, 48000, channels=6), 48000))
    for rate in RATES:
        row(f"rate_{rate}", write(root, f"rate_{rate}.wav", chirp(1.0, rate), rate, subtype="PCM_16"))
    row("spaces unicode", write(root, "dir with space/ünïcödé 名前.wav", chirp(1.0, 16000)))
    full = (root / "good_0.wav").read_bytes()
    (root / "truncated_data.wav").write_bytes(full[: 44 + 2 * 8000])  # half its samples: the readable half is used
    row("truncated_data", "truncated_data.wav")
    clipped = np.clip(chirp(1.0, 16000, level=3.0), -1, 1)
    row("clipped", write(root, "clipped.wav", clipped, subtype="PCM_16"))  # kept, with a warning

    manifest_reasons = {}

    def bad(utt_id: str, path: str, reason: str, text: object = "hello world") -> None:
        row(utt_id, path, text)
        manifest_reasons[utt_id] = reason

    (root / "zero_bytes.wav").write_bytes(b"")
    bad("zero_bytes", "zero_bytes.wav", "empty_file")
    (root / "truncated_header.wav").write_bytes(full[:20])
    bad("truncated_header", "truncated_header.wav", "unreadable_audio")
    (root / "not_audio.wav").write_text("<html>this is a web page, not audio</html>\n")
    bad("not_audio", "not_audio.wav", "unreadable_audio")
    bad("missing", "missing.wav", "missing_file")
    bad("no_samples", write(root, "no_samples.wav", np.zeros((0, 1)), subtype="PCM_16"), "no_samples")
    bad("too_long", write(root, "too_long.wav", chirp(40.0, 8000), 8000, subtype="PCM_16"), "too_long_audio")
    bad("too_short", write(root, "too_short.wav", chirp(0.1, 16000)), "too_short_audio")
    # A header saying 8 Hz: one second of 8 loud samples, a rate no speech is recorded at.
    bad("eight_hz", write(root, "eight_hz.wav", np.full((8, 1), 0.3), 8, subtype="PCM_16"), "implausible_sample_rate")
    bad("too_short_for_text", write(root, "too_short_for_text.wav", chirp(0.3, 16000)),
        "too_short_for_transcript", text="a much longer sentence than a third of a second can carry")
    bad("empty_text", write(root, "empty_text.wav", chirp(1.0, 16000)), "empty_transcript", text="")
    bad("punctuation_only", write(root, "punctuation_only.wav", chirp(1.0, 16000)), "empty_transcript", text=" … ?! ")
    bad("other_script", write(root, "other_script.wav", chirp(1.0, 16000)), "characters_outside_vocabulary",
        text="Привет, мир")
    bad("digits", write(root, "digits.wav", chirp(1.0, 16000)), "digits_in_transcript", text="room 101")
    row("good_0", "stereo.wav", text="a second row with the first row's id")
    manifest_reasons["good_0#2"] = "duplicate_id"
    write(root.parent, "outside.wav", chirp(1.0, 16000))
    bad("dot_dot", "../outside.wav", "path_outside_corpus")
    bad("absolute", str(root.parent / "outside.wav"), "path_outside_corpus")
    bad("long_name", "x" * 300 + ".wav", "missing_file")  # past NAME_MAX (255): the file system refuses to look
    bad("empty_path", "", "missing_file")  # no file named: not the corpus folder itself
    # featurize would name good_1's first augmented copy good_1_aug1 too
    bad("good_1_aug1", write(root, "aug_suffix.wav", chirp(1.0, 16000)), "reserved_id")
    bad("list_text", write(root, "list_text.wav", chirp(1.0, 16000)), "bad_transcript", text=["hello", "world"])

    featurize_reasons = {}
    nan = chirp(1.0, 16000)
    nan[100] = np.nan
    row("nan", write(root, "nan.wav", nan, subtype="FLOAT"))
    featurize_reasons["nan"] = "non_finite_samples"
    row("silence", write(root, "silence.wav", np.zeros((16000, 1)), subtype="PCM_16"))
    featurize_reasons["silence"] = "silent_audio"
    row("near_silence", write(root, "near_silence.wav", chirp(1.0, 16000, level=1e-4), subtype="FLOAT"))
    featurize_reasons["near_silence"] = "silent_audio"

    (root / "list.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows, manifest_reasons, featurize_reasons


def manifest_params(root: Path, **overrides) -> manifest.ManifestParams:
    return section("manifest", manifest.ManifestParams, source="table", corpus_dir=str(root),
                   table=str(root / "list.jsonl"), columns={"id": "id", "split": "split"}, num_workers=2, **overrides)


def test_every_hostile_input_is_handled_and_counted(tmp_path):
    root = tmp_path / "corpus"
    rows, manifest_reasons, featurize_reasons = build_corpus(root)
    out, features = tmp_path / "manifests", tmp_path / "features"
    m_metrics = manifest.run(manifest_params(root), out_dir=out, metrics_file=tmp_path / "m.json")

    rejects = pd.read_json(out / "rejects.jsonl", lines=True, dtype=str)
    got = {f"{r.id}#2" if r.reason == "duplicate_id" else r.id: r.reason for r in rejects.itertuples()}
    assert got == manifest_reasons and len(rejects) == 20
    counts = pd.Series(list(manifest_reasons.values())).value_counts().to_dict()
    assert m_metrics["rejected"] == {"total": len(manifest_reasons), **counts}
    assert counts["unreadable_audio"] == 2 and counts["path_outside_corpus"] == 2 and counts["missing_file"] == 3
    detail = rejects.set_index("id")["detail"]
    assert detail["long_name"].endswith(".wav: File name too long")
    assert detail["empty_path"] == "the path column 'path' is empty"
    assert detail["list_text"] == 'the transcript is a JSON list, not a string: ["hello", "world"]'
    duplicate = rejects[rejects["reason"] == "duplicate_id"].iloc[0]
    assert duplicate.text == "a second row with the first row's id"

    accepted = pd.concat([read_manifest(out / f"{s}.jsonl") for s in ("train", "valid", "test")]).set_index("id")
    assert len(accepted) + len(rejects) == len(rows)  # every row is accounted for
    assert (accepted.loc["stereo", "num_channels"], accepted.loc["stereo", "sample_rate"]) == (2, 44100)
    assert accepted.loc["surround", "num_channels"] == 6
    assert accepted.loc["truncated_data", "duration"] == 0.5
    assert accepted.loc["spaces unicode", "audio_path"] == str(root / "dir with space/ünïcödé 名前.wav")
    for rate in RATES:
        assert accepted.loc[f"rate_{rate}", "sample_rate"] == rate

    f_metrics = featurize.run(section("featurize", featurize.FeaturizeParams), manifest_dir=out, out_dir=features,
                              metrics_file=tmp_path / "f.json")
    f_rejects = pd.read_json(features / "rejects.jsonl", lines=True, dtype=str)
    assert dict(zip(f_rejects["id"], f_rejects["reason"])) == featurize_reasons
    assert f_metrics["rejected"] == {"total": 3, "non_finite_samples": 1, "silent_audio": 2}
    warnings = pd.read_json(features / "warnings.jsonl", lines=True, dtype=str)
    assert list(zip(warnings["id"], warnings["reason"])) == [("clipped", "clipped_audio")]
    assert f_metrics["warnings"] == {"total": 1, "clipped_audio": 1}

    stored = pd.concat([pd.read_csv(features / s / "index.csv", dtype={"id": str}) for s in ("train", "valid", "test")])
    # Nothing the manifest accepted vanished: each is featurized or rejected with a reason.
    assert sorted(stored["id"]) == sorted(set(accepted.index) - set(featurize_reasons))
    assert sum(f_metrics[s]["utterances"] for s in ("train", "valid", "test")) + 3 == len(accepted)
    frames = stored.set_index("id")["num_frames"]
    for utt in ["stereo", "surround", *(f"rate_{rate}" for rate in RATES)]:
        # Down-mixed and resampled to 16 kHz: 1 s → 16000 samples → 101 frames of 10 ms.
        assert frames[utt] == 101, utt
    assert frames["truncated_data"] == 51


def test_strict_mode_fails_on_any_reject(tmp_path):
    root = tmp_path / "corpus"
    build_corpus(root)
    with pytest.raises(StageError, match=r"manifest.strict: 20 utterance\(s\) rejected"):
        manifest.run(manifest_params(root, strict=True), out_dir=tmp_path / "m", metrics_file=tmp_path / "m.json")
    assert len(pd.read_json(tmp_path / "m" / "rejects.jsonl", lines=True)) == 20  # still written, for the user
    manifest.run(manifest_params(root), out_dir=tmp_path / "m", metrics_file=tmp_path / "m.json")
    with pytest.raises(StageError, match=r"featurize.strict: 3 utterance\(s\) rejected"):
        featurize.run(section("featurize", featurize.FeaturizeParams, strict=True), manifest_dir=tmp_path / "m",
                      out_dir=tmp_path / "f", metrics_file=tmp_path / "f.json")


def test_nothing_usable_left_is_a_clear_error(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.wav").write_bytes(b"")
    (root / "list.csv").write_text("path,text\na.wav,hello\nb.wav,hello\n")
    params = section("manifest", manifest.ManifestParams, source="table", corpus_dir=str(root),
                     table=str(root / "list.csv"))
    with pytest.raises(StageError, match=r"no usable utterances left in split\(s\) \['train', 'valid', 'test'\]"):
        manifest.run(params, out_dir=tmp_path / "m", metrics_file=tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["rejected"] == {"total": 2, "empty_file": 1, "missing_file": 1}


def test_two_featurize_workers_write_the_same_bytes_as_one(tmp_path):
    """Workers return results in manifest order: features, statistics, rejects and warnings match."""
    root = tmp_path / "corpus"
    build_corpus(root)
    manifest.run(manifest_params(root), out_dir=tmp_path / "m", metrics_file=tmp_path / "m.json")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"f{workers}"
        featurize.run(section("featurize", featurize.FeaturizeParams, num_workers=workers), manifest_dir=tmp_path / "m",
                      out_dir=out / "features", metrics_file=out / "featurize.json")
        outputs[workers] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    # 3 splits × (index.csv, one shard), features.json, tokens.json, test_sets.json, rejects, warnings, metrics
    assert len(outputs[1]) == 12
    assert outputs[2] == outputs[1]
    assert b"silent_audio" in outputs[2][Path("features/rejects.jsonl")]
    assert b"clipped_audio" in outputs[2][Path("features/warnings.jsonl")]


def test_an_implausible_sample_rate_is_its_own_reason_when_decoding_too(tmp_path):
    """featurize (and transcribe) decode without the manifest's header check: the same reason there."""
    from ctcflow.audio import AudioError, decode_audio

    path = tmp_path / write(tmp_path, "eight_hz.wav", np.full((8, 1), 0.3), 8, subtype="PCM_16")
    with pytest.raises(AudioError, match="8 Hz") as err:
        decode_audio(path, 16000, silence_db=-60.0)
    assert err.value.reason == "implausible_sample_rate"


def test_a_fifo_or_a_device_is_rejected_never_opened(tmp_path):
    """Reading a FIFO's header blocks until something writes to it: the stage, run as DVC runs it,
    must reject it unopened. In a subprocess with a time limit, so a regression fails, not hangs."""
    root = make_project(tmp_path / "project")
    corpus = root / "corpus"
    for name in ("a", "b", "c"):
        write(corpus, f"{name}.wav", chirp(1.0, 16000))
    os.mkfifo(corpus / "fifo.wav")
    (corpus / "null.wav").symlink_to("/dev/null")  # inside the corpus by its path, a device by its target
    (corpus / "list.csv").write_text("path,text\na.wav,hello\nb.wav,hello\nc.wav,hello\nfifo.wav,hello\nnull.wav,hello\n")
    params = tiny_params()
    params["manifest"].update(source="table", corpus_dir="corpus", table="corpus/list.csv", num_workers=1)
    (root / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    done = subprocess.run([sys.executable, "-m", "stages.manifest"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    rejects = pd.read_json(root / "data/manifests/rejects.jsonl", lines=True, dtype=str)
    assert list(zip(rejects["id"], rejects["reason"], rejects["detail"])) == [
        ("fifo", "not_a_regular_file", "corpus/fifo.wav is a FIFO, not a regular file"),
        ("null", "not_a_regular_file", "corpus/null.wav is a device, not a regular file")]
    assert json.loads((root / "metrics/manifest.json").read_text())["rejected"] == {"total": 2, "not_a_regular_file": 2}

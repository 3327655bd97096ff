"""Extra test sets (manifest.test_sets) through manifest, featurize and evaluate: what each reports of
a set's rejects and of its words outside the lexicon, and the errors that name the set."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import section, tiny_tokenizer, write_word_lm
from stages import evaluate, featurize, manifest
from stages.runner import StageError

TABLE_COLUMNS = {"path": "path", "text": "text", "speaker": None, "split": None, "id": None}
# The beam search's lexicon and LM: "open" and "door" are outside it.
LEXICON_CORPUS = ["turn on the light", "good night", "the end"]


def table_set(name: str) -> dict:
    return {"source": "table", "corpus_dir": f"data/test_sets/{name}", "table": f"data/test_sets/{name}/list.csv",
            "columns": TABLE_COLUMNS}


def write_set(root: Path, name: str, files: dict[str, Path | bytes | None], rows: list[tuple[str, str]]) -> None:
    """data/test_sets/<name>/: `files` (a recording to copy, bytes to write, None for no file) and list.csv of `rows`."""
    folder = root / "data/test_sets" / name
    folder.mkdir(parents=True)
    for file, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, folder / file)
        elif content is not None:
            (folder / file).write_bytes(content)
    pd.DataFrame(rows, columns=["path", "text"]).to_csv(folder / "list.csv", index=False)


@pytest.fixture(scope="module")
def with_sets(tiny_pipeline, tmp_path_factory):
    """The tiny corpus with two test sets of its own test recordings, run through manifest, featurize
    and evaluate (the tiny model, a lexicon of LEXICON_CORPUS): the project, manifest's and evaluate's
    metrics, and what evaluate and manifest printed. Set `six` has one usable row and one of each
    kind of reject; set `oov` has 2 of its 9 words outside the lexicon."""
    root = tmp_path_factory.mktemp("sets")
    corpus = pd.read_csv(tiny_pipeline / "data/corpus/metadata.csv", dtype=str, keep_default_na=False)
    wavs = [tiny_pipeline / "data/corpus" / path for path in corpus.loc[corpus["split"] == "test", "path"]]
    write_set(root, "six", {"good.wav": wavs[0], "notaudio.wav": b"RIFF\x00\x00\x00\x00WAVEnot really audio",
                            "blank.wav": wavs[1], "digits.wav": wavs[2]},
              [("good.wav", "turn on the light"), ("missing.wav", "turn on the light"),
               ("notaudio.wav", "turn on the light"), ("blank.wav", " ... "), ("digits.wav", "call 911"),
               ("good.wav", "good night")])  # the id "good" again
    write_set(root, "oov", {"a.wav": wavs[3], "b.wav": wavs[4], "c.wav": wavs[5]},
              [("a.wav", "turn on the light"), ("b.wav", "open the door"), ("c.wav", "good night")])
    (root / "lm").mkdir()
    write_word_lm(root / "lm", LEXICON_CORPUS, tiny_tokenizer())
    printed = io.StringIO()
    with contextlib.chdir(root), contextlib.redirect_stdout(printed):
        manifest_metrics = manifest.run(
            section("manifest", manifest.ManifestParams, corpus_dir=str(tiny_pipeline / "data/corpus"), num_workers=1,
                    test_sets={"six": table_set("six"), "oov": table_set("oov")}),
            out_dir=Path("data/manifests"), metrics_file=Path("metrics/manifest.json"))
        featurize.run(section("featurize", featurize.FeaturizeParams, num_workers=1), manifest_dir=Path("data/manifests"),
                      out_dir=Path("data/features"), metrics_file=Path("metrics/featurize.json"))
        manifest_printed = printed.getvalue()
        printed.seek(0)
        printed.truncate()
        eval_metrics = evaluate.run(section("evaluate", evaluate.EvaluateParams), features_dir=Path("data/features"),
                                    model_dir=tiny_pipeline / "models", report_dir=Path("reports/eval"),
                                    metrics_file=Path("metrics/eval.json"), lm_dir=Path("lm"),
                                    manifest_dir=Path("data/manifests"))
    return root, manifest_metrics, eval_metrics, printed.getvalue(), manifest_printed


def test_a_test_set_s_rejects_are_counted_in_its_own_block(with_sets):
    root, manifest_metrics, eval_metrics, printed, manifest_printed = with_sets
    rejected = {"total": 5, "missing_file": 1, "unreadable_audio": 1, "empty_transcript": 1,
                "digits_in_transcript": 1, "duplicate_id": 1}
    six = manifest_metrics["test_sets"]["six"]
    assert {k: v for k, v in six.items() if k != "hours"} == {"utterances": 1, "speakers": 1, "rejected": rejected}
    assert manifest_metrics["test_sets"]["oov"]["rejected"] == {"total": 0}
    assert manifest_metrics["rejected"] == rejected  # the main corpus has none
    assert json.loads((root / "metrics/manifest.json").read_text()) == manifest_metrics
    assert "test set six: 1 utterances, 0.00 h, 5 rejected: see data/manifests/rejects.jsonl\n" in manifest_printed
    assert "test set oov: 3 utterances, 0.00 h\n" in manifest_printed
    # evaluate carries the count, and says it beside each WER of the set.
    assert eval_metrics["test_sets"]["six"]["utterances"] == 1
    assert eval_metrics["test_sets"]["six"]["rejected"] == rejected
    assert eval_metrics["test_sets"]["oov"]["rejected"] == {"total": 0}
    for decoder in ("greedy", "beam (evaluate.decoder)"):
        line = next(line for line in printed.splitlines() if line.startswith(f"test set six {decoder}: WER "))
        assert "over 1 utterances, 5 rejected: see data/manifests/rejects.jsonl; decoding took " in line
    line = next(line for line in printed.splitlines() if line.startswith("test set oov greedy: "))
    assert "over 3 utterances; decoding took " in line
    # The main split's metrics gain no key.
    assert "rejected" not in eval_metrics and "oov_rate" not in eval_metrics


def test_a_test_set_s_words_outside_the_lexicon_are_reported(with_sets):
    _, _, eval_metrics, printed, _ = with_sets
    assert eval_metrics["test_sets"]["oov"]["oov_rate"] == pytest.approx(2 / 9)  # open, door
    assert eval_metrics["test_sets"]["six"]["oov_rate"] == 0.0
    lines = printed.splitlines()
    beam = next(line for line in lines if line.startswith("test set oov beam (evaluate.decoder): WER "))
    assert "% (22.22% of reference words outside the lexicon: beam search cannot output them), CER " in beam
    # Only the beam search is held to the lexicon; and a set with none outside says nothing.
    assert [line for line in lines if "outside the lexicon" in line] == [beam]


def evaluate_error(tiny_pipeline, with_sets, tmp_path, test_sets: list[str], edit=lambda features: None) -> str:
    """evaluate on a copy of the project's features listing `test_sets`, changed by `edit`: it fails
    before it writes a report; its one-line message."""
    root = with_sets[0]
    features = tmp_path / "features"
    shutil.copytree(root / "data/features", features)
    (features / "test_sets.json").write_text(json.dumps(test_sets) + "\n")
    edit(features)
    with pytest.raises(StageError) as err:
        evaluate.run(section("evaluate", evaluate.EvaluateParams, decoder="greedy"), features_dir=features,
                     model_dir=tiny_pipeline / "models", report_dir=tmp_path / "reports",
                     metrics_file=tmp_path / "eval.json", lm_dir=root / "lm", manifest_dir=root / "data/manifests")
    assert not (tmp_path / "reports").exists() and not (tmp_path / "eval.json").exists()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_listed_test_set_without_its_folder_fails_before_anything_is_decoded(tiny_pipeline, with_sets, tmp_path):
    message = evaluate_error(tiny_pipeline, with_sets, tmp_path, ["oov", "gone"])
    assert message == f"test set gone: {tmp_path}/features/gone/index.csv not found (run the featurize stage first)"


def test_a_transcript_outside_the_alphabet_names_the_set_and_its_files(tiny_pipeline, with_sets, tmp_path):
    def hand_edited(features: Path) -> None:  # as featurize copies a manifest edited by hand
        shutil.copytree(features / "oov", features / "bad")
        index = pd.read_csv(features / "bad/index.csv", dtype=str, keep_default_na=False)
        index.loc[1, "text_normalized"] = "Hello WORLD 42"
        index.to_csv(features / "bad/index.csv", index=False)

    message = evaluate_error(tiny_pipeline, with_sets, tmp_path, ["oov", "bad"], hand_edited)
    manifests = with_sets[0] / "data/manifests"
    assert message == ("test set bad: characters outside the alphabet in 'Hello WORLD 42': ['2', '4', 'D', 'H', 'L', "
                       f"'O', 'R', 'W'] (in {tmp_path}/features/bad/index.csv, from {manifests}/bad.jsonl: rerun "
                       "manifest, which checks transcripts, and featurize)")


@pytest.mark.parametrize("settings, message", [
    ({"test_sets": {"empty": table_set("empty")}}, "manifest.test_sets.empty.table data/test_sets/empty/list.csv has no rows"),
    ({"source": "table", "corpus_dir": "data/test_sets/empty", "table": "data/test_sets/empty/list.csv",
      "columns": TABLE_COLUMNS}, "manifest.table data/test_sets/empty/list.csv has no rows"),
])
def test_a_table_with_no_rows_is_named_as_such(tiny_pipeline, tmp_path, settings, message):
    write_set(tmp_path, "empty", {}, [])  # the header only
    settings = {"corpus_dir": str(tiny_pipeline / "data/corpus"), "num_workers": 1, **settings}
    with contextlib.chdir(tmp_path), pytest.raises(StageError) as err:
        manifest.run(section("manifest", manifest.ManifestParams, **settings), out_dir=tmp_path / "m",
                     metrics_file=tmp_path / "m.json")
    assert str(err.value) == message

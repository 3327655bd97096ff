"""ONNX export of the tiny pipeline's model: onnxruntime against PyTorch, the metadata, transcription
of a .onnx file, int8, the command and the export stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO, run_ctcflow, run_python, section
from ctcflow.checkpoint import load_checkpoint, model_from_checkpoint
from ctcflow.data import FeatureSplit
from ctcflow.export import OnnxModel, check_parity, export_onnx, quantize_int8, read_metadata
from ctcflow.transcribe import Transcriber
from stages import export as export_stage

PENALTY = 4.0  # as in test_transcribe: the one-epoch tiny model emits characters only with it
# int8 weights move the tiny model's log-probabilities by a few thousandths (0.004 seen); the bound
# leaves room for another machine's rounding and still fails a broken quantization (tenths or units).
INT8_MAX_DIFF = 0.05


@pytest.fixture(scope="module")
def exported(tiny_pipeline, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("onnx")
    checkpoint = load_checkpoint(tiny_pipeline / "models/best.pt")
    model, tokenizer = model_from_checkpoint(checkpoint)
    export_onnx(checkpoint, model, tokenizer, out / "model.onnx", opset=17)
    quantize_int8(out / "model.onnx", out / "model.int8.onnx")
    return {"model": model, "tokenizer": tokenizer, "fp32": out / "model.onnx", "int8": out / "model.int8.onnx",
            "test": FeatureSplit(tiny_pipeline / "data/features", "test", tokenizer)}


def test_onnxruntime_matches_pytorch_on_the_test_split(exported):
    parity = check_parity(exported["model"], OnnxModel(exported["fp32"], num_threads=1), exported["test"],
                          batch_frames=40000)
    assert parity.utterances == 6
    assert parity.max_abs_logprob_diff < 1e-4
    assert parity.differing_transcripts == 0 and parity.greedy_identical == 1.0
    assert parity.wer_onnx == parity.wer_torch


def test_batch_and_time_axes_are_dynamic(exported):
    session = OnnxModel(exported["fp32"], num_threads=1)
    torch.manual_seed(0)
    for batch, frames in ((1, 37), (3, 411)):  # the graph was traced on 2 × 200
        feats = torch.randn(batch, frames, 80)
        lengths = torch.tensor([frames - 50 * i for i in range(batch)])
        with torch.no_grad():
            expected, expected_lengths = exported["model"](feats, lengths)
        got, got_lengths = session(feats, lengths)
        # The bilstm front end strides by 3 with kernel 5 and padding 2: (n - 1) // 3 + 1 frames.
        assert got_lengths.tolist() == expected_lengths.tolist() == [(n - 1) // 3 + 1 for n in lengths.tolist()]
        assert got.shape == (batch, (frames - 1) // 3 + 1, 29)
        assert torch.allclose(got, expected, atol=1e-4)


def test_the_metadata_says_what_transcription_needs(exported, tiny_pipeline):
    meta = read_metadata(exported["fp32"])
    # The tiny project: ' = 0, space = 1, a–z = 2…27, blank 28; 80 log-mel bins, 10 ms hop at 16 kHz;
    # the bilstm front end subsamples by 3 (train.model.subsample).
    assert {k: meta[k] for k in ("model_type", "vocab_size", "blank_id", "subsampling_factor", "feat_dim",
                                 "sample_rate", "n_fft", "win_length", "hop_length", "window_type",
                                 "normalize_type")} == {
        "model_type": "ctcflow_ctc", "vocab_size": "29", "blank_id": "28", "subsampling_factor": "3",
        "feat_dim": "80", "sample_rate": "16000", "n_fft": "400", "win_length": "400", "hop_length": "160",
        "window_type": "hann", "normalize_type": "global"}
    assert json.loads(meta["tokenizer"]) == {"unit": "char", "alphabet": "' abcdefghijklmnopqrstuvwxyz", "blank": 28}
    assert json.loads(meta["tokens"]) == ["'", " ", *"abcdefghijklmnopqrstuvwxyz", "<blk>"]
    features = json.loads((tiny_pipeline / "data/features/features.json").read_text())
    assert json.loads(meta["mean"]) == features["mean"] and json.loads(meta["std"]) == features["std"]
    assert json.loads(meta["normalize"]) == "global"
    assert read_metadata(exported["int8"]) == meta


def transcribe(model: Path, paths: list[Path], **options) -> list:
    settings = dict(decoder="greedy", beam=None, lm_dir=None, blank_penalty=PENALTY, device="cpu",
                    chunk_seconds=30.0, overlap_seconds=4.0, batch_size=8, num_threads=1)
    return list(Transcriber(model, **{**settings, **options}).transcribe(paths))


def test_transcribing_the_onnx_file_gives_the_checkpoint_s_words_and_times(exported, tiny_pipeline):
    test = pd.read_json(tiny_pipeline / "data/manifests/test.jsonl", lines=True)
    paths = [tiny_pipeline / p for p in test["audio_path"]]
    from_checkpoint = transcribe(tiny_pipeline / "models/best.pt", paths)
    from_onnx = transcribe(exported["fp32"], paths)
    assert any(t.words for t in from_checkpoint), "the blank penalty should make the tiny model emit something"
    assert [t.to_json() for t in from_onnx] == [t.to_json() for t in from_checkpoint]
    with pytest.raises(ValueError, match="runs on the CPU"):
        transcribe(exported["fp32"], paths, device="cuda")


def test_int8_runs_and_stays_close(exported):
    parity = check_parity(exported["model"], OnnxModel(exported["int8"], num_threads=1), exported["test"],
                          batch_frames=40000)
    assert 0 < parity.max_abs_logprob_diff < INT8_MAX_DIFF  # not 0: the weights really are int8
    assert exported["int8"].stat().st_size < exported["fp32"].stat().st_size / 2


def test_a_file_that_is_not_an_export_is_refused(tmp_path, exported):
    import onnx

    graph = onnx.load(str(exported["fp32"]))
    del graph.metadata_props[:]
    onnx.save(graph, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="not a model `ctcflow export` wrote"):
        OnnxModel(tmp_path / "bare.onnx", num_threads=1)
    (tmp_path / "garbage.onnx").write_text("not a graph")
    with pytest.raises(ValueError, match="garbage.onnx: onnxruntime cannot load it"):
        OnnxModel(tmp_path / "garbage.onnx", num_threads=1)


def test_the_command_exports_checks_and_transcribes(tiny_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tiny_pipeline)
    out, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    code, printed, err = run_ctcflow(capsys, "export", "models/best.pt", str(out), "--int8", str(int8),
                             "--check-split", "data/features/test", "--threads", "1")
    assert code == 0, err
    lines = printed.splitlines()
    assert lines[:2] == [f"wrote {out}", f"wrote {int8}"]
    assert lines[2].startswith(f"{out}: largest |log-prob difference| ") and "differ on 0 of 6 utterances" in lines[2]
    assert lines[3].startswith(f"{int8}: ")
    audio = pd.read_json("data/manifests/test.jsonl", lines=True)["audio_path"][0]
    code, from_onnx, err = run_ctcflow(capsys, "transcribe", str(out), audio, "--decoder", "greedy",
                               "--blank-penalty", str(PENALTY), "--json", "--threads", "1")
    assert code == 0, err
    code, from_checkpoint, err = run_ctcflow(capsys, "transcribe", "models/best.pt", audio, "--decoder", "greedy",
                                     "--blank-penalty", str(PENALTY), "--json", "--device", "cpu")
    assert code == 0 and from_onnx == from_checkpoint, err
    code, _, err = run_ctcflow(capsys, "export", "models/none.pt", str(out))
    assert code != 0 and err.startswith("ctcflow export: error: checkpoint models/none.pt not found"), err


def test_the_command_checks_the_split_s_features_before_writing(tiny_pipeline, tmp_path, capsys):
    features = tmp_path / "features"
    shutil.copytree(tiny_pipeline / "data/features", features)
    info = json.loads((features / "features.json").read_text())
    (features / "features.json").write_text(json.dumps({**info, "logmel": {**info["logmel"], "n_mels": 40}}))
    model, out = tiny_pipeline / "models/best.pt", tmp_path / "m.onnx"
    code, printed, err = run_ctcflow(capsys, "export", str(model), str(out), "--check-split", str(features / "test"))
    assert (code, printed) == (1, "")
    assert err == (f"ctcflow export: error: {model} does not fit the features of {features} (n_mels: 80 in {model}, 40 "
                   f"in {features / 'features.json'}): rerun manifest and featurize with the settings it was trained "
                   "on, or train again\n")
    assert not out.exists()
    code, printed, err = run_ctcflow(capsys, "export", str(model), str(out), "--threads", "-3")
    assert (code, printed) == (2, "")
    assert "\nctcflow export: error: argument --threads: must be at least 1, got -3\n" in err


def test_the_command_refuses_an_opset_or_split_it_cannot_use(tiny_pipeline, tmp_path, capsys):
    model, out = tiny_pipeline / "models/best.pt", tmp_path / "m.onnx"
    for opset in ("3", "99"):  # torch's RuntimeError traceback, after the checkpoint was read
        code, printed, err = run_ctcflow(capsys, "export", str(model), str(out), "--opset", opset)
        assert (code, printed) == (2, "")
        assert f"\nctcflow export: error: argument --opset: must be 9–20, got {opset}\n" in err, err
    # The lowest opset of that range exports this model, and onnxruntime runs it.
    code, printed, err = run_ctcflow(capsys, "export", str(model), str(out), "--opset", "9",
                                     "--check-split", str(tiny_pipeline / "data/features/test"))
    assert code == 0 and "differ on 0 of 6 utterances" in printed, err
    # A misspelt split said "run the featurize stage first".
    code, printed, err = run_ctcflow(capsys, "export", str(model), str(tmp_path / "n.onnx"),
                                     "--check-split", str(tiny_pipeline / "data/features/tset"))
    assert (code, printed) == (1, "")
    assert err == (f"ctcflow export: error: --check-split {tiny_pipeline / 'data/features/tset'}: "
                   f"{tiny_pipeline / 'data/features'} has no split 'tset' (it has test, train, valid)\n")
    assert not (tmp_path / "n.onnx").exists()


@pytest.mark.parametrize(("args", "message"), [
    # The int8 copy was written over the fp32 model.
    (["m.onnx", "--int8", "m.onnx"], "--int8 m.onnx is OUT itself: the int8 copy would overwrite the fp32 model; "
                                     "name another file, e.g. m.int8.onnx"),
    (["m.onnx", "--int8", "sub/../m.onnx"], "--int8 sub/../m.onnx is OUT itself: the int8 copy would overwrite the "
                                            "fp32 model; name another file, e.g. m.int8.onnx"),
    # IsADirectoryError and FileExistsError tracebacks, the --int8 one after OUT was written.
    (["dir.onnx"], "OUT dir.onnx is a directory: name the file to write, e.g. dir.onnx/model.onnx"),
    (["m.onnx", "--int8", "dir.onnx"], "--int8 dir.onnx is a directory: name the file to write, e.g. "
                                       "dir.onnx/model.onnx"),
    (["file.txt/m.onnx"], "OUT file.txt/m.onnx: file.txt is a file, not a directory"),
    (["m.onnx", "--int8", "file.txt/deeper/m.int8.onnx"], "--int8 file.txt/deeper/m.int8.onnx: file.txt is a file, "
                                                           "not a directory"),
    # An ONNX file named .pt, which `ctcflow transcribe` then read as a checkpoint.
    (["m.pt"], "OUT m.pt: the file name must end in .onnx (`ctcflow transcribe` reads any other as a checkpoint)"),
    (["m.onnx", "--int8", "m.int8"], "--int8 m.int8: the file name must end in .onnx (`ctcflow transcribe` reads "
                                     "any other as a checkpoint)"),
])
def test_the_command_refuses_files_it_cannot_write_before_loading_the_model(tmp_path, capsys, monkeypatch, args,
                                                                             message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "sub").mkdir()
    # The model does not exist: it would be the first error if it were read before the files are checked.
    assert run_ctcflow(capsys, "export", "no/model.pt", *args) == (1, "", f"ctcflow export: error: {message}\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dir.onnx", "file.txt", "sub"]  # nothing written


def test_the_command_names_the_splits_when_given_the_whole_store(tiny_pipeline, tmp_path, capsys):
    # It said "data/features.json not found".
    store = tiny_pipeline / "data/features"
    code, printed, err = run_ctcflow(capsys, "export", str(tiny_pipeline / "models/best.pt"), str(tmp_path / "m.onnx"),
                                     "--check-split", str(store))
    assert (code, printed) == (1, "")
    assert err == (f"ctcflow export: error: --check-split {store} is a whole feature store: name one of its split "
                   f"folders, such as {store / 'test'} (the store has splits test, train, valid)\n")
    assert not (tmp_path / "m.onnx").exists()


def test_the_command_writes_the_int8_copy_into_a_new_directory(tiny_pipeline, tmp_path, capsys):
    out, int8 = tmp_path / "a/m.onnx", tmp_path / "b/c/m.int8.onnx"
    code, printed, err = run_ctcflow(capsys, "export", str(tiny_pipeline / "models/best.pt"), str(out),
                                     "--int8", str(int8))
    assert code == 0 and printed == f"wrote {out}\nwrote {int8}\n", err
    assert read_metadata(int8) == read_metadata(out)


def test_the_stage_takes_the_opsets_its_exporter_writes():
    # 21 was a torch traceback after the checkpoint was read.
    for opset, bound in ((13, "greater than or equal to 14"), (21, "less than or equal to 20")):
        with pytest.raises(ValueError, match=f"opset\n  Input should be {bound}"):
            section("export", export_stage.ExportParams, opset=opset)
    assert section("export", export_stage.ExportParams, opset=20).opset == 20


def test_the_stage_writes_both_files_and_the_check(tiny_pipeline, tmp_path):
    params = section("export", export_stage.ExportParams, num_threads=1)
    assert params.int8 and params.checkpoint == "best"
    (tmp_path / "export").mkdir()
    (tmp_path / "export/stale.onnx").write_text("an earlier run's")
    metrics = export_stage.run(params, model_dir=tiny_pipeline / "models", features_dir=tiny_pipeline / "data/features",
                               out_dir=tmp_path / "export", metrics_file=tmp_path / "metrics/export.json")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.int8.onnx", "model.onnx"]
    assert json.loads((tmp_path / "metrics/export.json").read_text()) == metrics
    assert metrics["utterances"] == 6 and metrics["opset"] == 17 and metrics["checkpoint_epoch"] == 1
    assert metrics["fp32"]["differing_transcripts"] == 0 and metrics["fp32"]["greedy_identical"] == 1.0
    assert metrics["fp32"]["max_abs_logprob_diff"] < 1e-4 and metrics["fp32"]["wer"] == metrics["pytorch_wer"]
    assert 0 < metrics["int8"]["max_abs_logprob_diff"] < INT8_MAX_DIFF
    assert metrics["int8"]["size_mb"] < metrics["fp32"]["size_mb"] / 2
    evaluated = json.loads((tiny_pipeline / "metrics/eval.json").read_text())
    assert metrics["pytorch_wer"] == evaluated["greedy"]["wer"]  # evaluate's greedy WER: no blank penalty there

    no_int8 = section("export", export_stage.ExportParams, num_threads=1, int8=False)
    metrics = export_stage.run(no_int8, model_dir=tiny_pipeline / "models", features_dir=tiny_pipeline / "data/features",
                               out_dir=tmp_path / "export", metrics_file=tmp_path / "metrics/export.json")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["model.onnx"] and "int8" not in metrics


def test_the_rtf_benchmark_times_all_four_and_scores_each(tiny_pipeline, tmp_path):
    run_python([str(REPO / "benchmarks/rtf.py"), "--project-dir", str(tiny_pipeline), "--quick", "--threads", "1",
                "--out", str(tmp_path / "rtf.json")], REPO)
    results = json.loads((tmp_path / "rtf.json").read_text())
    assert results["utterances"] == 6 and results["threads"] == 1
    runs = results["runs"]
    assert list(runs) == ["bare forward", "pytorch", "onnxruntime fp32", "onnxruntime int8"]
    assert all(run["rtf"] > 0 and 0 <= run["greedy_wer"] for run in runs.values())
    # The same model on the same audio: fp32 onnxruntime transcribes as PyTorch does.
    assert runs["onnxruntime fp32"]["greedy_wer"] == runs["pytorch"]["greedy_wer"]

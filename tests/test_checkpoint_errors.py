"""Files that are not the model checkpoint a command needs: garbage, a checkpoint short of a key,
weights that do not fit their own model_config, and features the model was not trained on. Each is
one clear line naming the file, before any work, and nothing is lost."""

from __future__ import annotations

import contextlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_ctcflow, section, tiny_params
from ctcflow.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from stages import export as export_stage
from stages.runner import StageError
from stages.train import TrainParams
from stages.train import run as train_run

NOT_LOADABLE = "not a checkpoint that loads with weights_only=True"


def utterance(root: Path) -> Path:
    return root / "data/corpus/wav/test" / sorted(p.name for p in (root / "data/corpus/wav/test").glob("*.wav"))[0]


@pytest.fixture(scope="module")
def garbage(tiny_pipeline, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Files that torch.load cannot read as a checkpoint, each with the error it must give."""
    root = tmp_path_factory.mktemp("garbage")
    files = {}

    def add(name: str, reason: str) -> Path:
        files[name] = (root / name, f"{root / name}: {reason}")
        return root / name

    shutil.copy(utterance(tiny_pipeline), add("speech.wav", f"{NOT_LOADABLE} (IndexError: pop from empty list)"))
    shutil.copy(tiny_pipeline / "params.yaml", add("params.yaml", f"{NOT_LOADABLE} (IndexError: pop from empty list)"))
    add("random.pt", f"{NOT_LOADABLE} (UnpicklingError: Unsupported operand 95)").write_bytes(
        np.random.default_rng(0).bytes(5000))
    with zipfile.ZipFile(add("notes.zip", f"{NOT_LOADABLE} (RuntimeError: file in archive is not in a "
                                          "subdirectory: a.txt)"), "w") as archive:
        archive.writestr("a.txt", "hello")
    add("empty.pt", "an empty file, not a checkpoint").write_bytes(b"")
    whole = (tiny_pipeline / "models/best.pt").read_bytes()
    add("truncated.pt", f"{NOT_LOADABLE} (RuntimeError: PytorchStreamReader failed reading zip archive: failed "
                        "finding central directory)").write_bytes(whole[:len(whole) // 2])
    torch.save(torch.zeros(3), add("tensor.pt", "holds a Tensor, not a checkpoint's dict"))
    return files


GARBAGE = ["speech.wav", "params.yaml", "random.pt", "notes.zip", "empty.pt", "truncated.pt", "tensor.pt"]


@pytest.mark.parametrize("name", GARBAGE)
def test_load_checkpoint_names_the_file_and_a_short_reason(garbage, name):
    path, message = garbage[name]
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    assert str(raised.value) == message


@pytest.mark.parametrize("name", GARBAGE)
def test_transcribe_and_export_of_garbage_are_one_line(garbage, tiny_pipeline, capsys, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # no params.yaml: greedy decoding
    path, message = garbage[name]
    code, out, err = run_ctcflow(capsys, "transcribe", str(path), str(utterance(tiny_pipeline)), "--device", "cpu")
    assert (code, out, err) == (1, "", f"ctcflow transcribe: error: {message}\n")
    code, out, err = run_ctcflow(capsys, "export", str(path), str(tmp_path / "model.onnx"))
    assert (code, out, err) == (1, "", f"ctcflow export: error: {message}\n")
    assert not (tmp_path / "model.onnx").exists()


def test_init_from_a_wav_file_is_a_stage_error(garbage, tiny_pipeline, tmp_path):
    path, message = garbage["speech.wav"]
    with pytest.raises(StageError) as raised:
        train_run(section("train", TrainParams, init_from=str(path)), features_dir=tiny_pipeline / "data/features",
                  model_dir=tmp_path / "models", live_dir=tmp_path / "live", resume_dir=tmp_path / "checkpoints")
    assert str(raised.value) == f"train.init_from {path}: cannot read the checkpoint: {message}"


@pytest.fixture(scope="module")
def best(tiny_pipeline) -> dict:
    return load_checkpoint(tiny_pipeline / "models/best.pt")


def test_a_checkpoint_short_of_a_key_names_what_it_lacks(best, tiny_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"a": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError) as raised:
        load_model(tmp_path / "plain.pt")
    assert str(raised.value) == (f"{tmp_path / 'plain.pt'}: not a model checkpoint: it lacks model, model_config, "
                                 "tokenizer, n_mels, logmel, mean, std")
    # Transcription reads the training split's mean; the model itself loads without it.
    save_checkpoint(tmp_path / "no_mean.pt", **{k: v for k, v in best.items() if k != "mean"})
    code, out, err = run_ctcflow(capsys, "transcribe", str(tmp_path / "no_mean.pt"), str(utterance(tiny_pipeline)),
                                 "--device", "cpu")
    assert (code, out) == (1, "")
    assert err == f"ctcflow transcribe: error: {tmp_path / 'no_mean.pt'}: not a model checkpoint: it lacks mean\n"


def test_weights_that_do_not_fit_their_own_model_config_are_named(best, tiny_pipeline, tmp_path, capsys):
    # The tiny model has 32 LSTM units; a config of 16 builds smaller matrices than the weights saved.
    path = tmp_path / "resized.pt"
    save_checkpoint(path, **{**best, "model_config": {**best["model_config"], "hidden_size": 16}})
    code, out, err = run_ctcflow(capsys, "export", str(path), str(tmp_path / "model.onnx"))
    assert (code, out) == (1, "")
    assert err == (f"ctcflow export: error: {path}: its weights do not fit its own model_config ("
                   "layers.0.ahead.weight_ih_l0: [128, 32] saved, [64, 32] built; "
                   "layers.0.ahead.weight_hh_l0: [128, 32] saved, [64, 16] built; "
                   "layers.0.ahead.bias_ih_l0: [128] saved, [64] built; 6 more)\n")


def test_another_architectures_keys_are_counted_not_listed(best, tiny_pipeline, tmp_path, capsys):
    # A BiLSTM's weights under a Conformer's config: load_state_dict lists every missing and
    # unexpected key on one line each (a 3,000-character error for the demo model).
    path = tmp_path / "relabelled.pt"
    save_checkpoint(path, **{**best, "model_config": {**best["model_config"], "arch": "conformer"}})
    code, out, err = run_ctcflow(capsys, "export", str(path), str(tmp_path / "model.onnx"))
    assert (code, out) == (1, "")
    assert err == (f"ctcflow export: error: {path}: its weights do not fit its own model_config (60 missing key(s): "
                   "blocks.0.ffn1.sequential.0.weight, blocks.0.ffn1.sequential.0.bias, "
                   "blocks.0.ffn1.sequential.1.weight, 57 more; 8 unexpected key(s): layers.0.ahead.weight_ih_l0, "
                   "layers.0.ahead.weight_hh_l0, layers.0.ahead.bias_ih_l0, 5 more; "
                   "front.conv1.weight: [32, 80, 5] saved, [144, 80, 5] built; 4 more)\n")


def test_damaged_feature_settings_are_one_line(best, tiny_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "damaged.pt"
    save_checkpoint(path, **{**best, "logmel": {**best["logmel"], "n_melz": 80}})
    code, out, err = run_ctcflow(capsys, "transcribe", str(path), str(utterance(tiny_pipeline)), "--device", "cpu")
    assert (code, out) == (1, "")  # it was a TypeError traceback
    assert err == (f"ctcflow transcribe: error: {path}: its feature settings do not load (TypeError: "
                   "LogMelConfig.__init__() got an unexpected keyword argument 'n_melz')\n")


def test_a_directory_given_as_the_checkpoint_is_named_as_one(tiny_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models = tiny_pipeline / "models"
    code, out, err = run_ctcflow(capsys, "transcribe", str(models), str(utterance(tiny_pipeline)), "--device", "cpu")
    assert (code, out) == (1, "")  # it said "checkpoint models not found"
    assert err == f"ctcflow transcribe: error: {models} is a directory: name a checkpoint file in it, e.g. {models / 'best.pt'}\n"


def test_init_from_a_checkpoint_without_weights_or_with_misfit_weights_is_a_stage_error(best, tiny_pipeline,
                                                                                         tmp_path):
    def init_from(path: Path) -> str:
        with pytest.raises(CheckpointError) as raised:
            train_run(section("train", TrainParams, init_from=str(path)), features_dir=tiny_pipeline / "data/features",
                      model_dir=tmp_path / "models", live_dir=tmp_path / "live", resume_dir=tmp_path / "checkpoints")
        return str(raised.value)

    save_checkpoint(tmp_path / "no_weights.pt", **{k: v for k, v in best.items() if k != "model"})
    assert init_from(tmp_path / "no_weights.pt") == (f"train.init_from {tmp_path / 'no_weights.pt'}: not a model "
                                                     "checkpoint: it lacks model")
    # Its config says what this run builds, but the weights saved are another model's.
    head = {**best["model"], "head.weight": best["model"]["head.weight"][:, :7]}
    save_checkpoint(tmp_path / "misfit.pt", **{**best, "model": head})
    assert init_from(tmp_path / "misfit.pt").startswith(
        f"train.init_from {tmp_path / 'misfit.pt'}: its weights do not fit its own model_config (head.weight: ")


def project(root: Path, tiny: Path, features: Path, models: Path) -> Path:
    """A folder laid out as `ctcflow evaluate` reads it: the tiny params, and links to a models
    folder, a feature store and the tiny LM."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    (root / "data").mkdir()
    (root / "models").symlink_to(models)
    (root / "data/features").symlink_to(features)
    (root / "data/lm").symlink_to(tiny / "data/lm")
    return root


def test_evaluate_refuses_a_checkpoint_without_its_vocabulary(best, tiny_pipeline, tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    save_checkpoint(models / "best.pt", **{k: v for k, v in best.items() if k != "tokenizer"})
    monkeypatch.chdir(project(tmp_path / "project", tiny_pipeline, tiny_pipeline / "data/features", models))
    code, out, err = run_ctcflow(capsys, "evaluate")
    assert (code, out) == (1, "")
    assert err == "ctcflow evaluate: error: models/best.pt: not a model checkpoint: it lacks tokenizer\n"
    assert not Path("reports").exists() and not Path("metrics").exists()


@pytest.fixture(scope="module")
def features_40(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny corpus featurized again with 40 log-mel bins; its model was trained on 80."""
    from stages import featurize

    out = tmp_path_factory.mktemp("mels40")
    with contextlib.chdir(tiny_pipeline):  # the manifests name the audio relative to the project root
        featurize.run(section("featurize", featurize.FeaturizeParams, n_mels=40), out_dir=out / "features",
                      metrics_file=out / "featurize.json")
    assert json.loads((out / "features/features.json").read_text())["logmel"]["n_mels"] == 40
    return out / "features"


def test_evaluate_refuses_features_of_other_n_mels_before_decoding(features_40, tiny_pipeline, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(project(tmp_path, tiny_pipeline, features_40, tiny_pipeline / "models"))
    code, out, err = run_ctcflow(capsys, "evaluate")
    assert (code, out) == (1, "")
    assert err == ("ctcflow evaluate: error: models/best.pt does not fit the features of data/features (n_mels: 80 "
                   "in models/best.pt, 40 in data/features/features.json): rerun manifest and featurize with the "
                   "settings it was trained on, or train again\n")
    assert not (tmp_path / "reports").exists() and not (tmp_path / "metrics").exists()


def test_evaluate_refuses_features_of_other_label_units(tiny_pipeline, tmp_path, capsys, monkeypatch):
    features = tmp_path / "features"
    shutil.copytree(tiny_pipeline / "data/features", features)
    # One unit more: the texts still encode in the model's units, so only the check catches it.
    (features / "tokens.json").write_text(json.dumps({"unit": "char", "alphabet": "' abcdefghijklmnopqrstuvwxyz0"}))
    monkeypatch.chdir(project(tmp_path / "project", tiny_pipeline, features, tiny_pipeline / "models"))
    code, out, err = run_ctcflow(capsys, "evaluate")
    assert (code, out) == (1, "")
    assert err == ("ctcflow evaluate: error: models/best.pt does not fit the features of data/features (label "
                   "units: \"' abcdefghijklmnopqrstuvwxyz\" in models/best.pt, \"' abcdefghijklmnopqrstuvwxyz0\" in "
                   "data/features/tokens.json): rerun manifest and featurize with the settings it was trained on, "
                   "or train again\n")


def test_export_refuses_features_of_other_n_mels_and_keeps_the_last_export(features_40, tiny_pipeline, tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export/model.onnx").write_text("the last run's")
    models = tiny_pipeline / "models"
    with pytest.raises(CheckpointError) as raised:
        export_stage.run(section("export", export_stage.ExportParams, num_threads=1), model_dir=models,
                         features_dir=features_40, out_dir=tmp_path / "export",
                         metrics_file=tmp_path / "metrics/export.json")
    assert str(raised.value) == (f"{models / 'best.pt'} does not fit the features of {features_40} (n_mels: 80 in "
                                 f"{models / 'best.pt'}, 40 in {features_40 / 'features.json'}): rerun manifest and "
                                 "featurize with the settings it was trained on, or train again")
    assert (tmp_path / "export/model.onnx").read_text() == "the last run's"
    assert not (tmp_path / "metrics").exists()


def test_export_keeps_the_last_export_when_the_checkpoint_lacks_a_key(best, tiny_pipeline, tmp_path):
    save_checkpoint(tmp_path / "models/best.pt", **{k: v for k, v in best.items() if k != "logmel"})
    (tmp_path / "export").mkdir()
    (tmp_path / "export/model.onnx").write_text("the last run's")
    with pytest.raises(CheckpointError) as raised:
        export_stage.run(section("export", export_stage.ExportParams, num_threads=1), model_dir=tmp_path / "models",
                         features_dir=tiny_pipeline / "data/features", out_dir=tmp_path / "export",
                         metrics_file=tmp_path / "metrics/export.json")
    assert str(raised.value) == f"{tmp_path / 'models/best.pt'}: not a model checkpoint: it lacks logmel"
    assert (tmp_path / "export/model.onnx").read_text() == "the last run's"

"""What a user of the train stage meets: bad params, damaged or mismatched resume checkpoints, empty
splits, frozen models; each a one-line error naming the key, or a run that says what it does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import section, tiny_params
from ctcflow.data import EmptySplitError
from ctcflow.params import ParamsError, load_section
from stages import train as train_stage
from stages.runner import StageError
from stages.train import TrainParams, run, stopping_epoch


def train(features, root, **params) -> dict:
    """Train on `features` (the tiny project's train params, `params` merged in) under `root`; the
    summary's run block and the epochs logged."""
    run(section("train", TrainParams, **params), features_dir=features, model_dir=root / "models",
        live_dir=root / "live", resume_dir=root / "checkpoints")
    summary = json.loads((root / "live/metrics.json").read_text())
    epochs = pd.read_csv(root / "live/plots/metrics/valid/wer.tsv", sep="\t")["step"].tolist()
    return {**summary["run"], "epochs": epochs}


def bad_train_params(tmp_path, **overrides) -> str:
    """The error load_section gives for the tiny project's train params with `overrides`."""
    params = tiny_params()
    params["train"].update(overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ParamsError) as err:
        load_section("train", TrainParams, tmp_path / "params.yaml")
    return str(err.value).split("\n", 1)[1]


def test_a_bad_ctc_blank_is_one_line_naming_the_key(tmp_path):
    # Not one line per member of the union, under keys that do not exist (train.ctc.blank.constrained-int).
    for value in (-1, "middle", 2.5):
        assert bad_train_params(tmp_path, ctc={"blank": value, "zero_infinity": True}) == (
            f"  train.ctc.blank: Value error, should be an index (0 or more), 'first' or 'last' (got {value!r})")
    for value in (0, 28, "first", "last"):
        assert section("train", TrainParams, ctc={"blank": value}).ctc.blank == value


def test_yaml_booleans_are_not_numbers(tmp_path):
    # YAML reads yes/no/on/off as booleans; pydantic would take them as 1 and 0 (`epochs: yes` trained 1 epoch).
    assert bad_train_params(tmp_path, epochs=True) == (
        "  train.epochs: Value error, should be a number, not true or false (YAML reads yes/no/on/off as booleans) (got True)")
    assert bad_train_params(tmp_path, clip_grad_norm=False) == (
        "  train.clip_grad_norm: Value error, should be a number, not true or false (YAML reads yes/no/on/off as booleans) (got False)")
    model = {**tiny_params()["train"]["model"], "dropout": False}
    assert bad_train_params(tmp_path, model=model) == (
        "  train.model.dropout: Value error, should be a number, not true or false (YAML reads yes/no/on/off as booleans) (got False)")
    assert bad_train_params(tmp_path, ctc={"blank": True, "zero_infinity": True}) == (
        "  train.ctc.blank: Value error, should be an index (0 or more), 'first' or 'last' (got True)")
    # Booleans stay booleans.
    params = section("train", TrainParams, resume=False, specaugment={"enabled": True}, ctc={"zero_infinity": False})
    assert (params.resume, params.specaugment.enabled, params.ctc.zero_infinity) == (False, True, False)


def test_an_empty_init_from_is_an_error_not_random_weights(tmp_path):
    for value in ("", "  "):
        assert bad_train_params(tmp_path, init_from=value) == (
            "  train.init_from: Value error, an empty path: name a checkpoint, or write null to start from random "
            f"weights (got {value!r})")
    assert section("train", TrainParams, init_from=None).init_from is None


def test_infinite_rates_and_weights_are_errors(tmp_path):
    assert bad_train_params(tmp_path, lr=float("inf")) == "  train.lr: Input should be a finite number (got inf)"
    assert bad_train_params(tmp_path, weight_decay=float("nan")) == (
        "  train.weight_decay: Input should be a finite number (got nan)")
    assert bad_train_params(tmp_path, blank_penalty={"mode": "soft_ratio", "weight": float("inf")}) == (
        "  train.blank_penalty.weight: Input should be a finite number (got inf)")


def test_freezing_every_weight_is_a_clear_error(tiny_pipeline, tmp_path):
    # Not torch's "optimizer got an empty parameter list" traceback.
    with pytest.raises(StageError, match=r"^train.freeze: front, layers, head cover every parameter of the model: "
                                         r"nothing would train$"):
        train(tiny_pipeline / "data/features", tmp_path, freeze=["front", "layers", "head"])


@pytest.mark.parametrize("split", ["train", "valid"])
def test_an_empty_split_is_a_clear_error(tiny_pipeline, tmp_path, split):
    features = tmp_path / "features"
    shutil.copytree(tiny_pipeline / "data/features", features)
    index = features / split / "index.csv"
    index.write_text(index.read_text().splitlines()[0] + "\n")  # the header alone
    with pytest.raises(EmptySplitError, match=rf"^{features / split / 'index.csv'} lists no utterances \(run the "
                                              r"featurize stage again\)$"):
        train(features, tmp_path / "run")


def test_a_damaged_resume_checkpoint_says_how_to_start_afresh(tiny_pipeline, tmp_path):
    resume = tmp_path / "checkpoints/resume.pt"
    resume.parent.mkdir(parents=True)
    resume.write_bytes(b"")
    with pytest.raises(StageError, match=rf"^train.resume: cannot resume from {resume}: an empty file, not a "
                                         r"checkpoint; delete it, or set train.resume: false, to start afresh$"):
        train(tiny_pipeline / "data/features", tmp_path)
    assert train(tiny_pipeline / "data/features", tmp_path, resume=False)["epochs"] == [1]


def test_the_epoch_a_run_stops_after():
    # Validation WER per epoch: better at 1 and 2, then not.
    history = [{"epoch": e, "metrics": {"valid/wer": wer}} for e, wer in enumerate((0.5, 0.4, 0.45, 0.4), 1)]
    assert stopping_epoch(history, epochs=10, patience=0) is None
    assert stopping_epoch(history, epochs=4, patience=0) == 4
    assert stopping_epoch(history, epochs=3, patience=0) == 3
    assert stopping_epoch(history, epochs=10, patience=1) == 3  # epoch 3 did not beat epoch 2
    assert stopping_epoch(history, epochs=10, patience=2) == 4  # 0.4 again is not better
    assert stopping_epoch(history, epochs=10, patience=3) is None
    assert stopping_epoch([], epochs=1, patience=1) is None


class Killed(Exception):
    pass


def test_a_checkpoint_with_epochs_the_new_params_never_train_is_not_resumed(tiny_pipeline, tmp_path, monkeypatch,
                                                                             capsys):
    # A run of 3 epochs at lr ~ 0 (validation WER 1.0 after each) killed after its last checkpoint.
    features, settings = tiny_pipeline / "data/features", {"lr": 1e-9, "epochs": 3}
    with monkeypatch.context() as patch:
        patch.setattr(train_stage, "validate_best", lambda *args: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            train(features, tmp_path / "killed", **settings)
    snapshot = tmp_path / "killed/checkpoints"
    assert (snapshot / "resume.pt").is_file()
    capsys.readouterr()

    def rerun(tag: str, **changes) -> dict:
        shutil.copytree(snapshot, tmp_path / tag / "checkpoints")
        return train(features, tmp_path / tag, **{**settings, **changes})

    # The same params: it resumes after epoch 3 and is done.
    done = rerun("same")
    assert (done["resumed_from_epoch"], done["epochs"]) == (3, [1, 2, 3])
    assert "resuming after epoch 3 from" in capsys.readouterr().out
    # Fewer epochs: a 3-epoch model and history under train.epochs 2 would be a lie; start afresh.
    fewer = rerun("fewer", epochs=2)
    assert (fewer["resumed_from_epoch"], fewer["epochs"]) == (0, [1, 2])
    assert "it holds 3 epochs, but train.epochs or train.early_stopping_patience now stop after epoch 2: " \
           "starting afresh" in capsys.readouterr().out
    # Patience 1 stops a fresh run after epoch 2 (no better WER than epoch 1's): so here too.
    patient = rerun("patience", early_stopping_patience=1)
    assert (patient["resumed_from_epoch"], patient["early_stopped_epoch"], patient["epochs"]) == (0, 2, [1, 2])
    assert "now stop after epoch 2: starting afresh" in capsys.readouterr().out


def test_help_describes_the_stage(capsys):
    with pytest.raises(SystemExit) as done:
        train_stage.main(["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: ctcflow train [-h] [--params PARAMS]" in out
    # SpecAugment is off in params.yaml: the help must not say every epoch uses it.
    assert "length-bucketed batches (with SpecAugment when train.specaugment.enabled)" in out


def test_output_lengths_are_those_the_models_give():
    import torch

    from ctcflow.model import build_model, output_lengths

    lengths = torch.tensor([100, 5])
    config = section("train", TrainParams).model.model_dump()  # bilstm, subsample 3
    # (100 + 2·2 − 5) // 3 + 1 = 34, (5 + 4 − 5) // 3 + 1 = 2; recipe: (100 + 2·5 − 10) // 2 + 1 = 51, 3.
    for arch, expected in (("bilstm", [34, 2]), ("conformer", [34, 2]), ("recipe", [51, 3])):
        model = build_model({**config, "arch": arch}, 80, 29).eval()
        _, given = model(torch.zeros(2, 100, 80), lengths)
        assert output_lengths({**config, "arch": arch}, lengths).tolist() == given.tolist() == expected, arch


def test_ctc_frames_needed_counts_a_blank_between_repeats_within_an_utterance_only():
    from array import array

    from ctcflow.data import FeatureSplit

    split = FeatureSplit.__new__(FeatureSplit)
    # Utterances [1 1 2], [2], [4 4 4], []: the 2, 2 across the first two is no repeat.
    split.token_ids = np.array([1, 1, 2, 2, 4, 4, 4], dtype=np.int32)
    split.token_bounds, split.index = array("q", [0, 3, 4, 7, 7]), [None] * 4
    assert split.ctc_frames_needed().tolist() == [4, 1, 5, 0]


def test_utterances_too_short_for_the_model_stride_are_reported(tiny_pipeline, tmp_path, capsys):
    # At time stride 8 (12.5 output frames a second), 26 of the 30 tiny training utterances have fewer
    # output frames than characters: with zero_infinity their loss was silently 0 (valid loss 0.0000).
    train(tiny_pipeline / "data/features", tmp_path / "eight", model={"subsample": 8})
    assert ("warning: 26 of 30 training utterances are too short for their transcripts at train.model.subsample 8 "
            "(CTC needs an output frame per unit, and one between repeats): their CTC loss is zeroed "
            "(train.ctc.zero_infinity): they teach nothing; use a lower train.model.subsample, or set "
            "manifest.ctc_frame_rate to the model's frame rate to reject them") in capsys.readouterr().out
    train(tiny_pipeline / "data/features", tmp_path / "three", model={"subsample": 3})
    assert "warning" not in capsys.readouterr().out

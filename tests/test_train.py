"""Training behaviours that a short run on the tiny project can show."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ctcflow.stage import StageError
from stages.train import TrainParams, run

TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "conv_channels": 32}


def train(tiny_pipeline, tmp_path, **params) -> pd.DataFrame:
    """Train on the tiny project's features; return the per-epoch history."""
    settings = {"epochs": 1, "batch_frames": 6000, "warmup_steps": 0, "model": TINY_MODEL, **params}
    live = tmp_path / "live"
    run(TrainParams.model_validate(settings), features_dir=tiny_pipeline / "data/features",
        model_dir=tmp_path / "models", live_dir=live)
    history = {}
    for name in ("lr", "valid/ctc_loss", "train/loss"):
        frame = pd.read_csv(live / "plots/metrics" / f"{name}.tsv", sep="\t")
        history[name] = frame.set_index("step").iloc[:, -1]
    return pd.DataFrame(history)


def test_plateau_scheduler_is_stepped_on_validation_loss(tiny_pipeline, tmp_path):
    # A learning rate too small to change anything: validation loss plateaus at once.
    history = train(tiny_pipeline, tmp_path, epochs=3, lr=1e-6,
                    scheduler={"enabled": True, "factor": 0.5, "patience": 0})
    assert history["lr"].tolist() == pytest.approx([1e-6, 5e-7, 2.5e-7])


def test_disabled_scheduler_keeps_the_learning_rate_like_the_recipe(tiny_pipeline, tmp_path):
    history = train(tiny_pipeline, tmp_path, epochs=3, lr=1e-6,
                    scheduler={"enabled": False, "factor": 0.5, "patience": 0})
    assert history["lr"].tolist() == pytest.approx([1e-6] * 3)


def test_warmup_rises_linearly_to_the_base_rate(tiny_pipeline, tmp_path):
    # The tiny train split fits in a few batches; with a long warm-up the rate is still rising.
    history = train(tiny_pipeline, tmp_path, epochs=1, lr=1e-3, warmup_steps=1000)
    assert 0 < history["lr"].iloc[0] < 1e-4


def test_init_from_starts_where_the_checkpoint_left_off(tiny_pipeline, tmp_path):
    scratch = train(tiny_pipeline, tmp_path / "scratch", lr=1e-9, model=TINY_MODEL)
    warm = train(tiny_pipeline, tmp_path / "warm", lr=1e-9, model=TINY_MODEL,
                 init_from=str(tiny_pipeline / "models/best.pt"))
    reference = json.loads((tiny_pipeline / "metrics/train/metrics.json").read_text())
    # lr ~ 0: the warm start keeps the pre-trained model's validation loss, the scratch one does not.
    assert warm["valid/ctc_loss"].iloc[0] == pytest.approx(reference["valid"]["ctc_loss"], rel=1e-3)
    assert scratch["valid/ctc_loss"].iloc[0] != pytest.approx(reference["valid"]["ctc_loss"], rel=1e-3)


def test_init_from_a_different_architecture_is_a_clear_error(tiny_pipeline, tmp_path):
    with pytest.raises(StageError, match="train.init_from .*cannot load weights.*hidden_size: 32 there, 48 here"):
        train(tiny_pipeline, tmp_path, model={**TINY_MODEL, "hidden_size": 48},
              init_from=str(tiny_pipeline / "models/best.pt"))


def test_init_from_ignores_keys_the_architecture_does_not_use(tiny_pipeline, tmp_path):
    recipe = {"arch": "recipe", "hidden_size": 32, "num_layers": 1}
    train(tiny_pipeline, tmp_path / "first", lr=1e-6, model={**recipe, "conv_channels": 32})
    # conv_channels belongs to bilstm: a recipe checkpoint loads whatever it says.
    train(tiny_pipeline, tmp_path / "second", lr=1e-6, model={**recipe, "conv_channels": 64, "dropout": 0.3},
          init_from=str(tmp_path / "first/models/best.pt"))
    with pytest.raises(StageError, match="arch: 'recipe' there, 'bilstm' here"):
        train(tiny_pipeline, tmp_path / "third", model=TINY_MODEL, init_from=str(tmp_path / "first/models/best.pt"))


def test_same_seed_same_metrics(tiny_pipeline, tmp_path):
    first = train(tiny_pipeline, tmp_path / "a", epochs=2, seed=3)
    second = train(tiny_pipeline, tmp_path / "b", epochs=2, seed=3)
    pd.testing.assert_frame_equal(first, second)

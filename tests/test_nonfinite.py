"""A real batch whose features hold NaN: its step is skipped and counted; too many in a row stop training."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import merge, section, tiny_params
from ctcflow.checkpoint import load_checkpoint
from ctcflow.data import LengthBatchSampler, read_index, shard_path
from stages.train import TrainParams, main, run

TINY = {"epochs": 2, "batch_frames": 1500, "num_threads": 1}


def poisoned_features(tiny_pipeline, root, ids=None):
    """A copy of the tiny feature store whose utterances `ids` (all if None) have NaN frames."""
    features = root / "data/features"
    shutil.copytree(tiny_pipeline / "data/features", features)
    index = read_index(features / "train")
    for row in index.itertuples():
        if ids is None or row.id in ids:
            shard = np.load(shard_path(features / "train", row.shard), mmap_mode="r+")
            shard[row.offset : row.offset + row.num_frames, :5] = np.nan
            shard.flush()
    return features, index


def test_a_nan_batch_is_skipped_and_counted(tiny_pipeline, tmp_path):
    index = read_index(tiny_pipeline / "data/features/train")
    features, _ = poisoned_features(tiny_pipeline, tmp_path, ids={index["id"].iloc[0]})
    live = tmp_path / "metrics/train"
    metrics = run(section("train", TrainParams, **TINY, max_consecutive_nonfinite=2), features_dir=features,
                  model_dir=tmp_path / "models", live_dir=live, resume_dir=tmp_path / "checkpoints")

    # One batch per epoch holds the poisoned utterance: one skipped step per epoch, the rest trained.
    per_epoch = pd.read_csv(live / "plots/metrics/train/nonfinite_steps.tsv", sep="\t")
    assert per_epoch["nonfinite_steps"].tolist() == [1, 1]
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["run"]["nonfinite_steps"] == 2
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["valid/loss"])
    weights = load_checkpoint(tmp_path / "models/last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_steps_in_a_row_stop_training_with_the_utterance_ids(tiny_pipeline, tmp_path, capsys):
    params = tiny_params()
    params["train"] = merge(params["train"], {**TINY, "max_consecutive_nonfinite": 3})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _, index = poisoned_features(tiny_pipeline, tmp_path)  # every utterance: every step is non-finite

    with contextlib.chdir(tmp_path), pytest.raises(SystemExit) as stop:
        main(["--params", "params.yaml"])

    # The third step of epoch 1 is the third in a row; the error names that batch's utterances.
    sampler = LengthBatchSampler(index["num_frames"].to_numpy(), TINY["batch_frames"], shuffle=True, seed=0)
    sampler.set_epoch(1)
    message = str(stop.value.code)
    assert message.startswith("ctcflow train: error: training stopped in epoch 1: 3 steps in a row had a "
                              "non-finite loss or gradient (train.max_consecutive_nonfinite = 3)")
    assert "\n" not in message
    named = message.split("the last batch held utterances ")[1].split(":")[0].split(", ")
    assert sorted(named) == sorted(index["id"][i] for i in sampler.batches[2])
    # The two skipped steps before it were reported as they happened.
    assert capsys.readouterr().out.count("skipped a step with a non-finite loss or gradient") == 2

"""Each stage on the tiny project: what it writes, and what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import merge, section, tiny_params, tiny_tokenizer
from ctcflow.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from ctcflow.data import FeatureSplit, read_feature_info
from ctcflow.manifest import read_manifest
from ctcflow.params import ParamsError, load_section
from stages.train import TrainParams


def test_manifest_lists_every_synthesized_utterance(tiny_pipeline):
    corpus = pd.read_csv(tiny_pipeline / "data/corpus/metadata.csv", dtype=str, keep_default_na=False)
    metrics = json.loads((tiny_pipeline / "metrics/manifest.json").read_text())
    for split, expected in {"train": 30, "valid": 6, "test": 6}.items():
        path = tiny_pipeline / f"data/manifests/{split}.jsonl"
        first = json.loads(path.read_text().splitlines()[0])
        assert list(first) == ["id", "audio_path", "duration", "sample_rate", "num_channels", "text",
                               "text_normalized", "speaker", "split"]
        assert first["text_normalized"] == first["text"]  # the demo corpus is already clean
        rows = read_manifest(path)
        assert len(rows) == expected == metrics[split]["utterances"]
        assert set(rows["split"]) == {split}
        assert (rows["sample_rate"] == 16000).all() and (rows["num_channels"] == 1).all()
        source = corpus[corpus["split"] == split].set_index("id")
        for row in rows.itertuples():
            assert row.text == source.loc[row.id, "text"]
            assert row.speaker == source.loc[row.id, "speaker"]
            assert row.duration == pytest.approx(float(source.loc[row.id, "duration"]), abs=2e-3)
            assert (tiny_pipeline / row.audio_path).is_file()
    assert metrics["rejected"] == {"total": 0}


def test_featurize_stores_every_utterance_with_training_statistics(tiny_pipeline):
    info = read_feature_info(tiny_pipeline / "data/features")
    assert info["logmel"]["n_mels"] == 80 and len(info["mean"]) == 80
    train = FeatureSplit(tiny_pipeline / "data/features", "train", tiny_tokenizer())
    frames = np.concatenate([train[i][0].numpy() for i in range(len(train))])
    # Normalized by the training split's own statistics: mean 0, std 1 per bin (float16 storage).
    assert np.abs(frames.mean(axis=0)).max() < 0.01
    assert np.abs(frames.std(axis=0) - 1).max() < 0.01
    manifest = read_manifest(tiny_pipeline / "data/manifests/train.jsonl").set_index("id")
    for i in range(len(train)):
        row = train.index.iloc[i]
        # 10 ms hop: one frame per 160 samples, plus one (centered frames).
        assert row.num_frames == int(manifest.loc[row.id, "duration"] * 16000) // 160 + 1


def test_train_writes_checkpoints_and_per_epoch_metrics(tiny_pipeline):
    metrics = json.loads((tiny_pipeline / "metrics/train/metrics.json").read_text())
    for key in ("loss", "ctc_loss", "blank_penalty", "blank_ratio", "grad_norm"):
        assert np.isfinite(metrics["train"][key])
    for key in ("loss", "wer", "cer", "sentence_accuracy", "blank_ratio"):
        assert np.isfinite(metrics["valid"][key])
    assert metrics["step"] == 1 and metrics["best"]["epoch"] == 1
    assert (tiny_pipeline / "metrics/train/plots/metrics/train/loss.tsv").is_file()
    best = load_checkpoint(tiny_pipeline / "models/best.pt")
    last = load_checkpoint(tiny_pipeline / "models/last.pt")
    assert best["epoch"] == last["epoch"] == 1
    assert "optimizer" in last and "scheduler" in last
    model, tokenizer = model_from_checkpoint(best)
    assert tokenizer.blank == 28
    log_probs, lengths = model(torch.zeros(1, 50, 80), torch.tensor([50]))
    assert log_probs.shape == (1, 17, 29)  # 50 frames, strided by 3


def test_evaluate_scores_the_test_split(tiny_pipeline):
    metrics = json.loads((tiny_pipeline / "metrics/eval.json").read_text())
    assert metrics["utterances"] == 6
    assert 0 <= metrics["cer"] and 0 <= metrics["wer"] and 0 <= metrics["sentence_accuracy"] <= 1
    table = pd.read_csv(tiny_pipeline / "reports/eval/utterances.csv", keep_default_na=False)
    assert len(table) == 6
    assert {"id", "reference", "hypothesis", "word_errors", "char_errors"} <= set(table.columns)
    assert table["word_errors"].sum() / table["words"].sum() == pytest.approx(metrics["wer"])
    examples = (tiny_pipeline / "reports/eval/examples.txt").read_text()
    assert examples.count("REF:") == 3 and examples.count("HYP:") == 3


def test_plots_are_written(tiny_pipeline):
    for name in ("loss", "error_rates", "blank_ratio"):
        png = tiny_pipeline / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_train_params_name_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  blank_penalty: {mode: argmax}\n  clip_grad_norm: -1\n  epochz: 3\n")
    with pytest.raises(ParamsError) as err:
        load_section("train", TrainParams, params)
    message = str(err.value)
    assert "train.blank_penalty.mode" in message and "argmax" in message
    assert "train.clip_grad_norm" in message
    assert "train.epochz" in message


def test_train_params_the_run_cannot_take_fail_before_any_work(tmp_path):
    # A negative seed used to fail in torch after the features loaded; a Conformer whose heads
    # cannot split model_dim, when the model was built.
    params = merge(tiny_params(), {"train": {"seed": -1, "model": {"arch": "conformer", "attention_heads": 5}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as err:
        load_section("train", TrainParams, tmp_path / "params.yaml")
    message = str(err.value)
    assert "train.seed: Input should be greater than or equal to 0" in message
    assert "model_dim 144 must split into 5 heads of even width" in message
    # The same heads are fine for the BiLSTM, which has none.
    params["train"]["seed"], params["train"]["model"]["arch"] = 0, "bilstm"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_section("train", TrainParams, tmp_path / "params.yaml").model.attention_heads == 5


def test_evaluate_scores_the_checkpoint_named_in_params(tiny_pipeline, tmp_path):
    from stages import evaluate

    best = load_checkpoint(tiny_pipeline / "models/best.pt")
    models = tmp_path / "models"
    save_checkpoint(models / "best.pt", **best)
    save_checkpoint(models / "best_epoch.pt", **{**best, "epoch": 7})  # told apart by the epoch it says it is
    for name, epoch in (("best", best["epoch"]), ("best_epoch", 7)):
        metrics = evaluate.run(section("evaluate", evaluate.EvaluateParams, checkpoint=name, decoder="greedy"),
                               features_dir=tiny_pipeline / "data/features", model_dir=models,
                               report_dir=tmp_path / name, metrics_file=tmp_path / f"{name}.json",
                               lm_dir=tiny_pipeline / "data/lm")
        assert metrics["checkpoint_epoch"] == epoch, name


def test_ctrl_c_in_a_stage_is_one_line_and_an_interrupted_exit(tmp_path):
    # Not a KeyboardInterrupt traceback from wherever it landed; and the process dies of SIGINT, as
    # Python's own handling does, so that DVC and shells see an interrupted command.
    import signal
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "params.yaml").write_text("demo:\n  n: 1\n")
    script = ("import sys\nfrom ctcflow.params import Section\nfrom stages.runner import stage_main\n"
              "class P(Section):\n    n: int\n"
              "def run(params):\n    raise KeyboardInterrupt\n"
              "stage_main('demo', P, run, None, ['--params', sys.argv[1]])\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "params.yaml")], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert done.stderr == "ctcflow demo: interrupted\n"
    assert done.returncode == -signal.SIGINT

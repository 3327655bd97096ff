"""Training behaviours that a short run on the tiny project can show."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import section, tiny_params
from ctcflow.checkpoint import CheckpointError, average_weights, load_checkpoint, model_from_checkpoint
from ctcflow.data import FeatureSplit
from ctcflow.inference import decode_split
from ctcflow.losses import CTCObjective
from ctcflow.metrics import error_rates
from stages.runner import StageError
from stages import train as train_stage
from stages.train import RunState, TrainParams, run

# The tiny project's training split; with batch_frames 1, each of its utterances is a batch of its own.
TRAINING_UTTERANCES = 30


def train(tiny_pipeline, tmp_path, **params) -> pd.DataFrame:
    """Train on the tiny project's features (its train params, `params` merged in); return the per-epoch history."""
    live = tmp_path / "live"
    run(section("train", TrainParams, **params), features_dir=tiny_pipeline / "data/features",
        model_dir=tmp_path / "models", live_dir=live, resume_dir=tmp_path / "checkpoints")
    history = {}
    for name in ("lr", "valid/ctc_loss", "train/loss"):
        frame = pd.read_csv(live / "plots/metrics" / f"{name}.tsv", sep="\t")
        history[name] = frame.set_index("step").iloc[:, -1]
    return pd.DataFrame(history)


def test_plateau_scheduler_is_stepped_on_validation_loss(tiny_pipeline, tmp_path):
    # A learning rate too small to change anything: validation loss plateaus at once.
    history = train(tiny_pipeline, tmp_path, epochs=3, lr=1e-6,
                    scheduler={"enabled": True, "kind": "plateau", "factor": 0.5, "patience": 0})
    assert history["lr"].tolist() == pytest.approx([1e-6, 5e-7, 2.5e-7])


def test_disabled_scheduler_keeps_the_learning_rate_like_the_recipe(tiny_pipeline, tmp_path):
    history = train(tiny_pipeline, tmp_path, epochs=3, lr=1e-6,
                    scheduler={"enabled": False, "factor": 0.5, "patience": 0})
    assert history["lr"].tolist() == pytest.approx([1e-6] * 3)


def test_cosine_scheduler_decays_over_the_epochs_whatever_the_loss(tiny_pipeline, tmp_path):
    # The same plateauing loss as above; after epoch e of 4 the rate is lr × (1 + cos(π e / 4)) / 2.
    history = train(tiny_pipeline, tmp_path, epochs=4, lr=1e-6, warmup_steps=0,
                    scheduler={"enabled": True, "kind": "cosine", "factor": 0.5, "patience": 0})
    assert history["lr"].tolist() == pytest.approx([8.5355e-7, 5e-7, 1.4645e-7, 0.0], abs=1e-11)


def test_warmup_rises_linearly_to_the_base_rate(tiny_pipeline, tmp_path):
    assert len(pd.read_csv(tiny_pipeline / "data/features/train/index.csv")) == TRAINING_UTTERANCES
    # 30 steps an epoch; the k-th step of the warm-up runs at lr × k / 75, then lr stays (the plateau
    # scheduler, off here, is the only other thing that moves it). The series logs the rate of each
    # next epoch's first step: the 31st, the 61st, then lr.
    history = train(tiny_pipeline, tmp_path, epochs=3, lr=1e-3, warmup_steps=75, scheduler={"enabled": False},
                    batch_frames=1)
    assert history["lr"].tolist() == pytest.approx([1e-3 * 31 / 75, 1e-3 * 61 / 75, 1e-3])


def test_a_warmup_longer_than_an_epoch_scales_the_cosine_rate(tiny_pipeline, tmp_path):
    # Every step's rate, as AdamW sees it: the warm-up's k / 75 of the rate cosine sets, which is lr
    # in epoch 1, lr × 0.75 after it and lr × 0.25 after epoch 2 of 3. A warm-up that set the rate
    # itself would run epoch 2 at lr × k / 75, and lr after the warm-up, whatever cosine said.
    rates = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: rates.append(optimizer.param_groups[0]["lr"]))
    try:
        history = train(tiny_pipeline, tmp_path, epochs=3, lr=1e-3, warmup_steps=75, batch_frames=1,
                        scheduler={"enabled": True, "kind": "cosine"})
    finally:
        hook.remove()
    assert len(rates) == 3 * TRAINING_UTTERANCES
    assert rates[:30] == pytest.approx([1e-3 * k / 75 for k in range(1, 31)])
    assert rates[30:60] == pytest.approx([0.75e-3 * k / 75 for k in range(31, 61)])
    assert rates[60:75] == pytest.approx([0.25e-3 * k / 75 for k in range(61, 76)])
    assert rates[75:] == pytest.approx([0.25e-3] * 15)
    assert history["lr"].tolist() == pytest.approx([0.75e-3 * 31 / 75, 0.25e-3 * 61 / 75, 0.0], abs=1e-12)


def test_init_from_starts_where_the_checkpoint_left_off(tiny_pipeline, tmp_path):
    scratch = train(tiny_pipeline, tmp_path / "scratch", lr=1e-9)
    warm = train(tiny_pipeline, tmp_path / "warm", lr=1e-9, init_from=str(tiny_pipeline / "models/best.pt"))
    reference = json.loads((tiny_pipeline / "metrics/train/metrics.json").read_text())
    # lr ~ 0: the warm start keeps the pre-trained model's validation loss, the scratch one does not.
    assert warm["valid/ctc_loss"].iloc[0] == pytest.approx(reference["valid"]["ctc_loss"], rel=1e-3)
    assert scratch["valid/ctc_loss"].iloc[0] != pytest.approx(reference["valid"]["ctc_loss"], rel=1e-3)


def test_init_from_a_different_architecture_is_a_clear_error(tiny_pipeline, tmp_path):
    with pytest.raises(CheckpointError, match="train.init_from .*cannot load weights.*hidden_size: 32 there, 48 here"):
        train(tiny_pipeline, tmp_path, model={"hidden_size": 48}, init_from=str(tiny_pipeline / "models/best.pt"))


def test_init_from_ignores_keys_the_architecture_does_not_use(tiny_pipeline, tmp_path):
    recipe = {"arch": "recipe", "hidden_size": 32, "num_layers": 1}
    train(tiny_pipeline, tmp_path / "first", lr=1e-6, model={**recipe, "conv_channels": 32})
    # conv_channels belongs to bilstm: a recipe checkpoint loads whatever it says.
    train(tiny_pipeline, tmp_path / "second", lr=1e-6, model={**recipe, "conv_channels": 64, "dropout": 0.3},
          init_from=str(tmp_path / "first/models/best.pt"))
    with pytest.raises(CheckpointError, match="arch: 'recipe' there, 'bilstm' here"):
        train(tiny_pipeline, tmp_path / "third", init_from=str(tmp_path / "first/models/best.pt"))


def test_init_from_another_vocabulary_is_a_clear_error(tiny_pipeline, tmp_path):
    # Another blank index is another output layer meaning: the weights would load but read wrong.
    with pytest.raises(CheckpointError, match="train.init_from .*cannot load weights.*vocabulary: "
                                              ".*'blank': 28.* there, .*'blank': 0.* here"):
        train(tiny_pipeline, tmp_path, ctc={"blank": 0}, init_from=str(tiny_pipeline / "models/best.pt"))


def test_freeze_keeps_the_named_weights_where_init_from_left_them(tiny_pipeline, tmp_path):
    start = load_checkpoint(tiny_pipeline / "models/best.pt")["model"]
    # weight_decay too: a frozen weight must not decay either.
    train(tiny_pipeline, tmp_path, epochs=2, lr=1e-2, weight_decay=0.1, freeze=["front", "layers.0.ahead"],
          init_from=str(tiny_pipeline / "models/best.pt"))
    end = load_checkpoint(tmp_path / "models/last.pt")["model"]
    frozen = [k for k in start if k.startswith(("front.", "layers.0.ahead."))]
    assert len(frozen) == 4 + 4  # conv1, conv2: weight and bias; the forward LSTM: 2 matrices, 2 biases
    assert all(torch.equal(end[k], start[k]) for k in frozen)
    assert not any(torch.equal(end[k], start[k]) for k in start if k not in frozen)  # layers.0.back, the head


def test_a_freeze_prefix_that_names_no_parameter_is_a_clear_error(tiny_pipeline, tmp_path):
    # Prefixes end at a dot: "layers.0.ah" is not the forward LSTM.
    for prefix in ("encoder", "layers.0.ah"):
        with pytest.raises(StageError, match=rf"train.freeze: '{prefix}' names no parameter of the model; its "
                                             r"modules: front.conv1, front.conv2, head, layers.0.ahead, layers.0.back"):
            train(tiny_pipeline, tmp_path, freeze=[prefix])


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tiny_pipeline, tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(StageError, match="train.init_from .*notes.pt: cannot read the checkpoint: .*notes.pt: not a "
                                         "checkpoint that loads with weights_only=True"):
        train(tiny_pipeline, tmp_path, init_from=str(tmp_path / "notes.pt"))


def run_files(root) -> tuple[dict, dict, dict]:
    """Every per-epoch series, the summary and the final weights, timings left out."""
    series = {str(f.relative_to(root)): f.read_text() for f in (root / "live/plots").rglob("*.tsv")
              if "audio_seconds" not in f.name}
    summary = json.loads((root / "live/metrics.json").read_text())
    del summary["audio_seconds_per_second"]
    return series, summary, load_checkpoint(root / "models/last.pt")["model"]


def test_same_seed_same_metrics(tiny_pipeline, tmp_path):
    first = train(tiny_pipeline, tmp_path / "a", epochs=2, seed=3)
    second = train(tiny_pipeline, tmp_path / "b", epochs=2, seed=3)
    pd.testing.assert_frame_equal(first, second)
    (series_a, summary_a, weights_a), (series_b, summary_b, weights_b) = run_files(tmp_path / "a"), run_files(tmp_path / "b")
    assert len(series_a) == 13 and series_a == series_b and summary_a == summary_b  # bit for bit, as text
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    other = train(tiny_pipeline, tmp_path / "c", epochs=2, seed=4)
    assert not first.equals(other)  # the seed does reach the training


def test_loader_workers_train_the_same_weights(tiny_pipeline, tmp_path):
    # Two epochs: without workers the loader makes an iterator each epoch, with persistent workers
    # only once; neither may draw from the stream SpecAugment and dropout draw from.
    train(tiny_pipeline, tmp_path / "in_process", epochs=2, batch_frames=1500, loader_workers=0)
    train(tiny_pipeline, tmp_path / "workers", epochs=2, batch_frames=1500, loader_workers=2)
    (series_a, summary_a, weights_a), (series_b, summary_b, weights_b) = (run_files(tmp_path / "in_process"),
                                                                          run_files(tmp_path / "workers"))
    assert len(series_a) == 13 and series_a == series_b and summary_a == summary_b  # bit for bit, as text
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_gradient_accumulation_steps_once_per_group_of_batches(tiny_pipeline, tmp_path):
    assert len(pd.read_csv(tiny_pipeline / "data/features/train/index.csv")) == TRAINING_UTTERANCES
    # During a long warm-up the learning rate counts optimizer steps: the series logs the next
    # step's, lr × (steps + 1) / warmup_steps. 30 batches in groups of 4: 7 full groups and a last
    # one of 2, so 8 steps.
    history = train(tiny_pipeline, tmp_path, lr=1.0, warmup_steps=1000, grad_accumulation=4, batch_frames=1)
    assert history["lr"].tolist() == pytest.approx([9 / 1000])


def test_bf16_autocast_trains_on_cpu(tiny_pipeline, tmp_path):
    fp32 = train(tiny_pipeline, tmp_path / "fp32")
    bf16 = train(tiny_pipeline, tmp_path / "bf16", precision="bf16")
    assert np.isfinite(bf16.to_numpy()).all()
    # bfloat16 keeps 8 bits of mantissa: close to the float32 run, but not equal to it.
    assert bf16["train/loss"].to_numpy() == pytest.approx(fp32["train/loss"].to_numpy(), rel=0.05)
    assert not bf16["train/loss"].equals(fp32["train/loss"])


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    for native, auto in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(train_stage, "native_bf16", lambda device, native=native: native)
        assert [train_stage.resolve_precision(p, cpu) for p in ("auto", "fp32", "bf16")] == [auto, "fp32", "bf16"]


def test_the_precision_trained_in_is_in_the_metrics(tiny_pipeline, tmp_path):
    train(tiny_pipeline, tmp_path / "auto", precision="auto")
    train(tiny_pipeline, tmp_path / "bf16", precision="bf16")
    runs = [json.loads((tmp_path / name / "live/metrics.json").read_text())["run"] for name in ("auto", "bf16")]
    this_cpu = "bf16" if train_stage.native_bf16(torch.device("cpu")) else "fp32"
    assert [r["precision"] for r in runs] == [this_cpu, "bf16"]


def test_early_stopping_on_validation_wer(tiny_pipeline, tmp_path):
    # lr ~ 0: the validation WER of epoch 1 is never beaten, so patience 2 stops before epoch 4.
    history = train(tiny_pipeline, tmp_path, epochs=6, lr=1e-9, early_stopping_patience=2)
    assert history.index.tolist() == [1, 2, 3]
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert summary["run"]["early_stopped_epoch"] == 3 and summary["best"]["epoch"] == 1


def test_average_weights_is_the_mean_of_floats_and_keeps_the_newest_integers():
    older = {"weight": torch.tensor([1.0, -2.0]), "half": torch.tensor([1.0], dtype=torch.float16),
             "count": torch.tensor(3)}
    newer = {"weight": torch.tensor([2.0, 4.0]), "half": torch.tensor([2.0], dtype=torch.float16),
             "count": torch.tensor(5)}
    mean = average_weights([older, newer])
    assert torch.equal(mean["weight"], torch.tensor([1.5, 1.0]))
    assert mean["half"].dtype == torch.float16 and mean["half"].item() == 1.5
    assert mean["count"].item() == 5
    assert average_weights([older]) is older  # one epoch: its own weights, untouched


def test_best_model_is_the_mean_of_the_best_epoch_and_those_before_it():
    # One weight per epoch (1, 3, 5, 7) and validation WERs that improve at epochs 1, 2 and 4.
    epochs = [(1.0, 0.5), (3.0, 0.4), (5.0, 0.6), (7.0, 0.3)]
    for average_epochs, best_after_each_epoch in ((1, [1.0, 3.0, 3.0, 7.0]), (2, [1.0, 2.0, 2.0, 6.0]),
                                                  (3, [1.0, 2.0, 2.0, 5.0])):
        state, bests = RunState(), []
        for epoch, (weight, wer) in enumerate(epochs, start=1):
            weights = {"w": torch.tensor([weight])}
            state.end_epoch(epoch, {"valid/wer": wer}, weights, average_epochs)
            weights["w"] += 100  # training goes on in place: the state must hold copies
            bests.append(state.best_model["w"].item())
            assert len(state.recent_models) == min(epoch, average_epochs - 1)
        assert bests == best_after_each_epoch, average_epochs
        assert state.best_epoch == 4


def epoch_valid_loss(run, epoch: int) -> float:
    return pd.read_csv(run / "live/plots/metrics/valid/loss.tsv", sep="\t").set_index("step")["loss"][epoch]


def test_average_epochs_writes_the_mean_into_best_pt(tiny_pipeline, tmp_path, capsys):
    # Epoch k's weights are the last.pt of a run of k epochs: nothing in a run depends on train.epochs.
    # At this seed and rate the tiny model's validation WER improves after epoch 1 (1.0, 0.978, 0.956
    # here), so the best epoch has one before it to average with.
    settings = {"lr": 1e-3, "warmup_steps": 0, "seed": 0}
    for epochs in (1, 2, 3):
        train(tiny_pipeline, tmp_path / f"epochs{epochs}", epochs=epochs, average_epochs=1, **settings)
    capsys.readouterr()
    train(tiny_pipeline, tmp_path / "averaged", epochs=3, average_epochs=2, **settings)
    best = load_checkpoint(tmp_path / "averaged/models/best.pt")
    epoch = best["epoch"]
    assert epoch >= 2, "the tiny model's validation WER no longer improves after epoch 1: pick another seed"
    out = capsys.readouterr().out
    assert f"best.pt: the mean of the weights of epochs {epoch - 1} to {epoch}: valid WER " in out
    # The summary's averaged_valid_wer is the WER of best.pt's weights on valid, decoded afresh here.
    model, tokenizer = model_from_checkpoint(best)
    valid = FeatureSplit(tiny_pipeline / "data/features", "valid", tokenizer)
    decoded = decode_split(model, valid, tokenizer, CTCObjective.plain(tokenizer.blank), 5000)
    wer = error_rates(valid.index["text_normalized"].tolist(), decoded.hypotheses)["wer"]
    summary = json.loads((tmp_path / "averaged/live/metrics.json").read_text())["best"]
    assert summary["epoch"] == epoch and summary["averaged_valid_wer"] == pytest.approx(wer, abs=1e-9)
    assert summary["averaged_valid_loss"] == pytest.approx(decoded.loss, rel=1e-5)
    assert summary["averaged_valid_loss"] != pytest.approx(epoch_valid_loss(tmp_path / "averaged", epoch), rel=1e-3)
    # average_epochs 1: best.pt holds the best epoch's own weights, and the summary that epoch's figures.
    single = json.loads((tmp_path / "epochs3/live/metrics.json").read_text())["best"]
    assert single["averaged_valid_wer"] == single["valid_wer"]
    own_loss = epoch_valid_loss(tmp_path / "epochs3", single["epoch"])
    assert single["averaged_valid_loss"] == pytest.approx(own_loss, rel=1e-9)
    before, own = (load_checkpoint(tmp_path / f"epochs{k}/models/last.pt")["model"] for k in (epoch - 1, epoch))
    assert any(not torch.equal(before[k], own[k]) for k in own)  # two different epochs are averaged
    for name, value in best["model"].items():
        assert torch.allclose(value, (before[name] + own[name]) / 2, rtol=0, atol=1e-6), name
    # best_epoch.pt, what fine-tuning starts from: the best epoch's own weights, bit for bit.
    best_epoch = load_checkpoint(tmp_path / "averaged/models/best_epoch.pt")
    assert best_epoch["epoch"] == epoch and best_epoch["valid_wer"] == summary["valid_wer"]
    assert all(torch.equal(best_epoch["model"][k], own[k]) for k in own)
    # average_epochs 1: best.pt holds the best epoch's own weights, bit for bit.
    alone = load_checkpoint(tmp_path / "epochs3/models/best.pt")
    assert alone["epoch"] == epoch and all(torch.equal(alone["model"][k], own[k]) for k in own)
    alone_epoch = load_checkpoint(tmp_path / "epochs3/models/best_epoch.pt")
    assert all(torch.equal(alone_epoch["model"][k], own[k]) for k in own)


def test_bad_new_params_name_the_key():
    for key, value in (("precision", "fp16"), ("grad_accumulation", 0), ("nproc", 0), ("device", "tpu"),
                       ("early_stopping_patience", -1), ("max_consecutive_nonfinite", 0), ("loader_workers", -1),
                       ("checkpoint_every", -1), ("average_epochs", 0)):
        with pytest.raises(ValidationError) as err:
            section("train", TrainParams, **{key: value})
        assert [e["loc"] for e in err.value.errors()] == [(key,)]


def test_a_missing_key_is_an_error_naming_it():
    # params.yaml is the one home of every value: the schema fills in none.
    params = tiny_params()["train"]
    del params["warmup_steps"], params["model"]["dropout"]
    with pytest.raises(ValidationError) as err:
        TrainParams.model_validate(params)
    assert [(e["loc"], e["type"]) for e in err.value.errors()] == [(("warmup_steps",), "missing"),
                                                                    (("model", "dropout"), "missing")]


def test_device_cuda_trains_on_a_gpu_or_says_there_is_none(tiny_pipeline, tmp_path):
    if torch.cuda.is_available():
        assert np.isfinite(train(tiny_pipeline, tmp_path, device="cuda", precision="bf16").to_numpy()).all()
    else:
        with pytest.raises(StageError, match="train.device is cuda, but torch sees 0 GPUs for train.nproc = 1"):
            train(tiny_pipeline, tmp_path, device="cuda")

"""Stage train: fit a CTC acoustic model on the training split, select it on the validation split.

One epoch = a pass over length-bucketed batches with SpecAugment, the loss = CTC + blank penalty
(train.blank_penalty), AdamW with linear warm-up, gradient clipping (train.clip_grad_norm), then a
validation pass whose loss steps ReduceLROnPlateau (unless train.scheduler.enabled is false, which
reproduces the original recipe's never-stepped scheduler). Per-epoch metrics go to metrics/train
through dvclive; models/best.pt (lowest validation WER) and models/last.pt are kept.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from dvclive import Live
from pydantic import Field
from torch.utils.data import DataLoader
from tqdm import tqdm

from ctcflow.checkpoint import load_checkpoint, save_checkpoint
from ctcflow.data import FeatureSplit, LengthBatchSampler, collate, read_feature_info
from ctcflow.features import spec_augment
from ctcflow.inference import decode_split
from ctcflow.losses import BLANK_PENALTY_MODES, CTCObjective, LossTally
from ctcflow.metrics import error_rates
from ctcflow.model import ARCHITECTURE_KEYS, ARCHITECTURES, build_model, count_parameters
from ctcflow.params import Section
from ctcflow.stage import StageError, stage_main
from ctcflow.text import RECIPE_ALPHABET, Tokenizer

FEATURES_DIR = Path("data/features")
MODEL_DIR = Path("models")
LIVE_DIR = Path("metrics/train")


class ModelParams(Section):
    arch: Literal[ARCHITECTURES] = "bilstm"
    hidden_size: int = Field(192, gt=0)
    num_layers: int = Field(3, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    subsample: int = Field(3, ge=1, le=8)  # bilstm only; recipe always strides by 2
    conv_channels: int = Field(192, gt=0)  # bilstm only


class CTCParams(Section):
    # An index, or first/last; checked against the label unit's size when training starts.
    blank: Annotated[int, Field(ge=0)] | Literal["first", "last"] = len(RECIPE_ALPHABET)
    zero_infinity: bool = True


class BlankPenaltyParams(Section):
    mode: Literal[BLANK_PENALTY_MODES] = "none"
    weight: float = Field(0.5, ge=0)


class SchedulerParams(Section):
    enabled: bool = True
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(6, ge=0)


class SpecAugmentParams(Section):
    enabled: bool = True
    n_freq_masks: int = Field(2, ge=0)
    freq_mask: int = Field(15, ge=0)
    n_time_masks: int = Field(2, ge=0)
    time_mask: int = Field(25, ge=0)
    max_time_fraction: float = Field(0.2, gt=0, le=1)


class TrainParams(Section):
    seed: int = 0
    epochs: int = Field(10, gt=0)
    batch_frames: int = Field(5000, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    clip_grad_norm: float = Field(5.0, ge=0)  # 0 turns clipping off
    num_threads: int = Field(2, ge=1)
    init_from: str | None = None
    model: ModelParams = ModelParams()
    ctc: CTCParams = CTCParams()
    blank_penalty: BlankPenaltyParams = BlankPenaltyParams()
    scheduler: SchedulerParams = SchedulerParams()
    specaugment: SpecAugmentParams = SpecAugmentParams()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_weights(model: torch.nn.Module, model_config: dict, path: str) -> None:
    """Start from pre-trained weights (the fix note's "Stage 1"): same architecture, any dropout."""
    try:
        checkpoint = load_checkpoint(path)
    except (FileNotFoundError, RuntimeError) as err:
        raise StageError(f"train.init_from {path}: cannot read the checkpoint: {err}") from err
    theirs = checkpoint.get("model_config", {})
    shape = ["arch", *(k for k in ARCHITECTURE_KEYS[model_config["arch"]] if k != "dropout")]
    differ = [k for k in shape if theirs.get(k) != model_config[k]]
    if differ:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {model_config[k]!r} here" for k in differ)
        raise StageError(f"train.init_from {path}: cannot load weights into this model ({detail})")
    model.load_state_dict(checkpoint["model"])


def run(params: TrainParams, features_dir: Path = FEATURES_DIR, model_dir: Path = MODEL_DIR,
        live_dir: Path = LIVE_DIR) -> dict:
    seed_everything(params.seed)
    torch.set_num_threads(params.num_threads)
    try:  # the label unit travels with the features (tokens.json, from the manifest stage)
        tokenizer = Tokenizer.load(features_dir, blank=params.ctc.blank)
    except ValueError as err:
        raise StageError(f"train.ctc.blank {params.ctc.blank!r} with the units of {features_dir}: {err}") from err
    feature_info = read_feature_info(features_dir)
    n_mels = feature_info["logmel"]["n_mels"]
    train_set = FeatureSplit(features_dir, "train", tokenizer)
    valid_set = FeatureSplit(features_dir, "valid", tokenizer)

    model_config = params.model.model_dump()
    model = build_model(model_config, n_mels, tokenizer.num_classes)
    if params.init_from:
        init_weights(model, model_config, params.init_from)
    print(f"model {params.model.arch}: {count_parameters(model) / 1e6:.2f} M parameters; "
          f"{len(train_set)} training and {len(valid_set)} validation utterances")

    objective = CTCObjective(tokenizer.blank, params.ctc.zero_infinity, params.blank_penalty.mode,
                             params.blank_penalty.weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=params.scheduler.factor, patience=params.scheduler.patience)
    augment = spec_augment(**params.specaugment.model_dump(exclude={"enabled"}))
    sampler = LengthBatchSampler(train_set.num_frames, params.batch_frames, shuffle=True, seed=params.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
    max_norm = params.clip_grad_norm or float("inf")
    frame_seconds = feature_info["logmel"]["hop_length"] / feature_info["logmel"]["sample_rate"]

    checkpoint_meta = {"model_config": model_config, "tokenizer": tokenizer.to_dict(), "n_mels": n_mels,
                       "logmel": feature_info["logmel"]}
    best_wer, step = float("inf"), 0
    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) as live:
        for epoch in range(1, params.epochs + 1):
            live.step = epoch  # plots and metrics count epochs from 1
            model.train()
            sampler.set_epoch(epoch)
            tally, grad_norm_sum, audio_seconds, started = LossTally(), 0.0, 0.0, time.perf_counter()
            progress = tqdm(loader, desc=f"epoch {epoch}/{params.epochs}", unit="batch", leave=False)
            for batch in progress:
                if step < params.warmup_steps:
                    for group in optimizer.param_groups:
                        group["lr"] = params.lr * (step + 1) / params.warmup_steps
                feats = batch.feats
                if params.specaugment.enabled:
                    feats = augment(feats.transpose(1, 2)).transpose(1, 2)
                log_probs, lengths = model(feats, batch.lengths)
                parts = objective(log_probs, lengths, batch.targets, batch.target_lengths)
                optimizer.zero_grad(set_to_none=True)
                parts.total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                step += 1

                tally.add(parts, log_probs, lengths, tokenizer.blank)
                grad_norm_sum += grad_norm.item()
                audio_seconds += batch.lengths.sum().item() * frame_seconds
                progress.set_postfix(loss=f"{tally.means()['loss']:.3f}")
            train_seconds = time.perf_counter() - started

            valid = decode_split(model, valid_set, tokenizer, objective, params.batch_frames)
            rates = error_rates(valid_set.index["text_normalized"].tolist(), valid.hypotheses)
            if params.scheduler.enabled:
                scheduler.step(valid.ctc_loss)
            epoch_metrics = {
                **{f"train/{name}": value for name, value in tally.means().items()},
                "train/grad_norm": grad_norm_sum / len(loader),
                "valid/loss": valid.loss,
                "valid/ctc_loss": valid.ctc_loss,
                "valid/blank_ratio": valid.blank_ratio,
                "valid/wer": rates["wer"],
                "valid/cer": rates["cer"],
                "valid/sentence_accuracy": rates["sentence_accuracy"],
                "lr": optimizer.param_groups[0]["lr"],
                "audio_seconds_per_second": audio_seconds / train_seconds,
            }
            for name, value in epoch_metrics.items():
                live.log_metric(name, value)
            print(f"epoch {epoch}: loss {epoch_metrics['train/loss']:.4f} (CTC {epoch_metrics['train/ctc_loss']:.4f}, "
                  f"penalty {epoch_metrics['train/blank_penalty']:.4f}), blank ratio {epoch_metrics['train/blank_ratio']:.3f}; "
                  f"valid loss {valid.loss:.4f}, WER {rates['wer']:.2%}, CER {rates['cer']:.2%}; "
                  f"{train_seconds:.0f} s, {epoch_metrics['audio_seconds_per_second']:.0f} audio-s/s", flush=True)

            state = {"model": model.state_dict(), "epoch": epoch, "valid_wer": rates["wer"], **checkpoint_meta}
            if rates["wer"] < best_wer:
                best_wer = rates["wer"]
                save_checkpoint(model_dir / "best.pt", **state)
                live.summary["best"] = {"epoch": epoch, "valid_wer": best_wer}
            save_checkpoint(model_dir / "last.pt", **state, optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict())
            live.sync()
    return epoch_metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("train", TrainParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

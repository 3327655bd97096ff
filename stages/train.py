"""Stage train: fit a CTC acoustic model on the training split, select it on the validation split.

One epoch = a pass over length-bucketed batches with SpecAugment, the loss = CTC + blank penalty
(train.blank_penalty), AdamW with linear warm-up, gradient clipping (train.clip_grad_norm), then a
validation pass whose loss steps ReduceLROnPlateau (unless train.scheduler.enabled is false, which
reproduces the original recipe's never-stepped scheduler). Per-epoch metrics go to metrics/train
through dvclive; models/best.pt (lowest validation WER) and models/last.pt are kept.

Surviving crashes: after every epoch checkpoints/train/resume.pt holds the whole training state
(weights, optimizer, scheduler, random streams, metric history). A rerun after a crash resumes
from it when the params and the features are those of the crashed run, and starts afresh (saying
why) when they are not; it is deleted once training finishes. A step whose loss or gradient is
not finite is skipped and counted; train.max_consecutive_nonfinite in a row stop training.
train.nproc > 1 runs the same command as distributed data parallel processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from dvclive import Live
from pydantic import Field
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ctcflow.checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ctcflow.data import DistributedLengthBatchSampler, FeatureSplit, LengthBatchSampler, collate, read_feature_info
from ctcflow.distributed import World, all_gather, all_sum, all_true, broadcast, join, launch, launched, leave
from ctcflow.features import spec_augment
from ctcflow.inference import decode_split
from ctcflow.losses import BLANK_PENALTY_MODES, CTCObjective, LossTally
from ctcflow.metrics import error_rates
from ctcflow.model import ARCHITECTURES, build_model, count_parameters
from ctcflow.params import Section, flatten
from stages.runner import StageError, stage_main
from ctcflow.text import RECIPE_ALPHABET, Tokenizer

FEATURES_DIR = Path("data/features")
MODEL_DIR = Path("models")
LIVE_DIR = Path("metrics/train")
# Not a DVC output: DVC deletes a stage's outputs before it reruns the stage, and the point of
# this file is to outlive a killed run. Relative to the folder that holds model_dir.
RESUME_DIR = Path("checkpoints/train")
# Params that may change between a killed run and its resumption: none changes the epochs done.
RESUMABLE_CHANGES = {"epochs", "early_stopping_patience", "max_consecutive_nonfinite", "num_threads", "nproc",
                     "device", "resume"}


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
    num_threads: int = Field(2, ge=1)  # per process
    init_from: str | None = None
    grad_accumulation: int = Field(1, ge=1)  # batches per optimizer step
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = torch.autocast to bfloat16
    early_stopping_patience: int = Field(0, ge=0)  # epochs without a better validation WER; 0 = off
    max_consecutive_nonfinite: int = Field(10, ge=1)  # skipped non-finite steps in a row that stop training
    resume: bool = True  # resume from checkpoints/train/resume.pt when it fits these params
    nproc: int = Field(1, ge=1)  # processes (distributed data parallel); batch_frames is per step, all together
    device: Literal["cpu", "cuda"] = "cpu"
    model: ModelParams = ModelParams()
    ctc: CTCParams = CTCParams()
    blank_penalty: BlankPenaltyParams = BlankPenaltyParams()
    scheduler: SchedulerParams = SchedulerParams()
    specaugment: SpecAugmentParams = SpecAugmentParams()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_weights(model: torch.nn.Module, model_config: dict, tokenizer: Tokenizer, n_mels: int, path: str) -> None:
    """Start from pre-trained weights (the fix note's "Stage 1"): same architecture, any dropout."""
    try:
        checkpoint = load_checkpoint(path)
    except (FileNotFoundError, StageError) as err:
        raise StageError(f"train.init_from {path}: cannot read the checkpoint: {err}") from err
    check_compatible(checkpoint, model_config, tokenizer, n_mels, f"train.init_from {path}")
    model.load_state_dict(checkpoint["model"])


def run_fingerprint(params: TrainParams, features_dir: Path, world_size: int) -> dict:
    """What a run must share with the crashed run whose checkpoint it resumes."""
    data = hashlib.sha256()
    for name in ("features.json", "train.csv", "valid.csv"):
        data.update((Path(features_dir) / name).read_bytes())
    return {**flatten(params.model_dump(exclude=RESUMABLE_CHANGES)), "features": data.hexdigest()[:16],
            "processes": world_size}


def read_resume(path: Path, fingerprint: dict) -> dict | None:
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    theirs = state.get("fingerprint", {})
    differ = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in fingerprint.items() if theirs.get(k) != v]
    if differ:
        print(f"not resuming from {path}, written with other settings ({'; '.join(differ)}): starting afresh",
              flush=True)
        return None
    return state


def rewrite_outputs(live: Live, resumed: dict, model_dir: Path, checkpoint_meta: dict) -> None:
    """The outputs of the epochs a resumed run inherits, rewritten from its checkpoint: DVC deletes a
    stage's outputs before it reruns it, and a kill may leave an epoch that the checkpoint lacks.
    So the history holds every epoch exactly once."""
    for record in resumed["history"]:
        live.step = record["epoch"]
        for name, value in record["metrics"].items():
            live.log_metric(name, value)
    live.summary["best"] = {"epoch": resumed["best_epoch"], "valid_wer": resumed["best_wer"]}
    save_checkpoint(model_dir / "best.pt", model=resumed["best_model"], epoch=resumed["best_epoch"],
                    valid_wer=resumed["best_wer"], **checkpoint_meta)
    save_checkpoint(model_dir / "last.pt", model=resumed["model"], epoch=resumed["epoch"],
                    valid_wer=resumed["history"][-1]["metrics"]["valid/wer"], **checkpoint_meta,
                    optimizer=resumed["optimizer"], scheduler=resumed["scheduler"])


def run(params: TrainParams, features_dir: Path = FEATURES_DIR, model_dir: Path = MODEL_DIR,
        live_dir: Path = LIVE_DIR, resume_dir: Path | None = None) -> dict:
    resume_dir = resume_dir or Path(model_dir).parent / RESUME_DIR  # models/ → checkpoints/train
    if params.device == "cuda" and torch.cuda.device_count() < (1 if launched() else params.nproc):
        raise StageError(f"train.device is cuda, but torch sees {torch.cuda.device_count()} GPUs "
                         f"for train.nproc = {params.nproc} processes (use cpu, or fewer processes)")
    if params.nproc > 1 and not launched():
        # The same stage command on several processes: this function again, through torchrun's launcher.
        return launch(params.nproc, run, params, features_dir, model_dir, live_dir, resume_dir)
    world = join(params.device)
    try:
        return train(params, world, Path(features_dir), Path(model_dir), Path(live_dir), Path(resume_dir))
    finally:
        leave(world)


def train(params: TrainParams, world: World, features_dir: Path, model_dir: Path, live_dir: Path,
          resume_dir: Path) -> dict:
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
    raw_model = build_model(model_config, n_mels, tokenizer.num_classes)
    if params.init_from:
        init_weights(raw_model, model_config, tokenizer, n_mels, params.init_from)
    if world.master:
        print(f"model {params.model.arch}: {count_parameters(raw_model) / 1e6:.2f} M parameters; "
              f"{len(train_set)} training and {len(valid_set)} validation utterances"
              + (f"; {world.world_size} processes" if world.distributed else ""))
    raw_model.to(world.device)
    # DDP averages the gradients of all ranks after each backward pass; raw_model is the plain model.
    model = DistributedDataParallel(raw_model) if world.distributed else raw_model
    if world.rank:
        seed_everything(params.seed + world.rank)  # own SpecAugment masks and dropout; rank 0 keeps the 1-process stream

    objective = CTCObjective(tokenizer.blank, params.ctc.zero_infinity, params.blank_penalty.mode,
                             params.blank_penalty.weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=params.scheduler.factor, patience=params.scheduler.patience)
    augment = spec_augment(**params.specaugment.model_dump(exclude={"enabled"}))
    if world.distributed:
        sampler = DistributedLengthBatchSampler(train_set.num_frames, params.batch_frames, shuffle=True,
                                                seed=params.seed, rank=world.rank, world_size=world.world_size)
    else:
        sampler = LengthBatchSampler(train_set.num_frames, params.batch_frames, shuffle=True, seed=params.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
    max_norm = params.clip_grad_norm or float("inf")
    frame_seconds = feature_info["logmel"]["hop_length"] / feature_info["logmel"]["sample_rate"]
    autocast = torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=params.precision == "bf16")

    # Resume from the last completed epoch of a killed run, if there is one and it fits.
    # The feature mean/std travel with the weights, so a checkpoint transcribes on its own.
    checkpoint_meta = {"model_config": model_config, "tokenizer": tokenizer.to_dict(), "n_mels": n_mels,
                       "logmel": feature_info["logmel"], "mean": feature_info["mean"], "std": feature_info["std"]}
    resume_path = resume_dir / "resume.pt"
    fingerprint = run_fingerprint(params, features_dir, world.world_size)
    resumed = broadcast(world, read_resume(resume_path, fingerprint) if world.master and params.resume else None)
    history, best_wer, best_epoch, best_model, step, nonfinite_total = [], float("inf"), 0, None, 0, 0
    if resumed:
        check_compatible(resumed, model_config, tokenizer, n_mels, str(resume_path))
        raw_model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        set_rng_state(resumed["rng"][world.rank])
        history, best_wer, best_epoch, best_model = (resumed[k] for k in ("history", "best_wer", "best_epoch",
                                                                          "best_model"))
        step, nonfinite_total = resumed["step"], resumed["nonfinite_steps"]
    resumed_from = resumed["epoch"] if resumed else 0
    epoch_metrics = history[-1]["metrics"] if history else {}

    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) if world.master else contextlib.nullcontext() as live:
        if resumed and world.master:
            print(f"resuming after epoch {resumed_from} from {resume_path}", flush=True)
            rewrite_outputs(live, resumed, model_dir, checkpoint_meta)

        early_stopped, nonfinite_in_a_row = 0, 0
        for epoch in range(resumed_from + 1, params.epochs + 1):
            if params.early_stopping_patience and epoch - 1 - best_epoch >= params.early_stopping_patience:
                early_stopped = epoch - 1
                if world.master:
                    print(f"early stop: no better validation WER since epoch {best_epoch}", flush=True)
                break
            model.train()
            sampler.set_epoch(epoch)
            tally, grad_norm_sum, updates, skipped = LossTally(), 0.0, 0, 0
            audio_seconds, started = 0.0, time.perf_counter()
            quiet = {} if world.master else {"disable": True}  # rank 0 shows progress; TQDM_DISABLE still works
            progress = tqdm(loader, desc=f"epoch {epoch}/{params.epochs}", unit="batch", leave=False, **quiet)
            for i, batch in enumerate(progress):
                # One optimizer step per grad_accumulation batches (fewer at the end of the epoch).
                if i % params.grad_accumulation == 0:
                    group_tally, group_rows = LossTally(), []
                    group_size = min(params.grad_accumulation, len(loader) - i)
                last_of_group = (i + 1) % params.grad_accumulation == 0 or i + 1 == len(loader)
                # DDP averages over ranks; weighting each rank's batch mean by its share of the global
                # batch's utterances makes that the gradient of the global batch's mean loss.
                share = len(batch.indices) * world.world_size / sampler.global_sizes[i] if world.distributed else 1.0
                batch = batch.to(world.device)
                feats = batch.feats
                if params.specaugment.enabled:
                    feats = augment(feats.transpose(1, 2)).transpose(1, 2)
                # Gradients are exchanged between ranks once per optimizer step, on its last batch.
                with model.no_sync() if world.distributed and not last_of_group else contextlib.nullcontext():
                    with autocast:
                        log_probs, lengths = model(feats, batch.lengths)
                        parts = objective(log_probs, lengths, batch.targets, batch.target_lengths)
                    (parts.total * (share / group_size)).backward()
                group_tally.add(parts, log_probs, lengths, tokenizer.blank)
                group_rows += batch.indices
                audio_seconds += batch.lengths.sum().item() * frame_seconds
                if not last_of_group:
                    continue

                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                # A non-finite loss or gradient (bad features, an overflow) would poison the weights:
                # skip the step on every rank alike.
                if all_true(world, math.isfinite(group_tally.sums["loss"]) and math.isfinite(grad_norm.item())):
                    if step < params.warmup_steps:
                        for group in optimizer.param_groups:
                            group["lr"] = params.lr * (step + 1) / params.warmup_steps
                    optimizer.step()
                    step += 1
                    updates += 1
                    nonfinite_in_a_row = 0
                    tally.utterances += group_tally.utterances
                    for name, value in group_tally.sums.items():
                        tally.sums[name] += value
                    grad_norm_sum += grad_norm.item()
                    progress.set_postfix(loss=f"{tally.means()['loss']:.3f}")
                else:
                    skipped += 1
                    nonfinite_in_a_row += 1
                    ids = [u for rows in all_gather(world, group_rows) for u in train_set.index["id"].iloc[rows]]
                    if nonfinite_in_a_row >= params.max_consecutive_nonfinite:
                        raise StageError(
                            f"training stopped in epoch {epoch}: {nonfinite_in_a_row} steps in a row had a "
                            f"non-finite loss or gradient (train.max_consecutive_nonfinite = "
                            f"{params.max_consecutive_nonfinite}); the last batch held utterances "
                            f"{', '.join(ids)}: check their features and transcripts")
                    if world.master:
                        tqdm.write(f"epoch {epoch}: skipped a step with a non-finite loss or gradient "
                                   f"(utterances {', '.join(ids)})")
                optimizer.zero_grad(set_to_none=True)
            train_seconds = time.perf_counter() - started

            # Every rank's share of the epoch (a no-op in one process).
            tally.utterances, *sums, audio_seconds = all_sum(world, [tally.utterances, *tally.sums.values(),
                                                                     audio_seconds])
            tally.sums = dict(zip(tally.sums, sums))
            nonfinite_total += skipped
            # Each rank validates its identical copy of the model: no broadcast needed for the decisions below.
            with autocast:
                valid = decode_split(raw_model, valid_set, tokenizer, objective, params.batch_frames)
            rates = error_rates(valid_set.index["text_normalized"].tolist(), valid.hypotheses)
            if params.scheduler.enabled:
                scheduler.step(valid.ctc_loss)
            train_means = tally.means() if tally.utterances else dict.fromkeys(tally.sums, math.nan)  # all skipped
            epoch_metrics = {
                **{f"train/{name}": value for name, value in train_means.items()},
                "train/grad_norm": grad_norm_sum / updates if updates else math.nan,
                "train/nonfinite_steps": skipped,
                "valid/loss": valid.loss,
                "valid/ctc_loss": valid.ctc_loss,
                "valid/blank_ratio": valid.blank_ratio,
                "valid/wer": rates["wer"],
                "valid/cer": rates["cer"],
                "valid/sentence_accuracy": rates["sentence_accuracy"],
                "lr": optimizer.param_groups[0]["lr"],
                "audio_seconds_per_second": audio_seconds / train_seconds,
            }
            history.append({"epoch": epoch, "metrics": epoch_metrics})
            improved = rates["wer"] < best_wer
            if improved:
                best_wer, best_epoch = rates["wer"], epoch
            rngs = all_gather(world, rng_state())  # every rank's streams, so a resumed run draws what this one would
            if not world.master:
                continue

            live.step = epoch  # plots and metrics count epochs from 1
            for name, value in epoch_metrics.items():
                live.log_metric(name, value)
            print(f"epoch {epoch}: loss {epoch_metrics['train/loss']:.4f} (CTC {epoch_metrics['train/ctc_loss']:.4f}, "
                  f"penalty {epoch_metrics['train/blank_penalty']:.4f}), blank ratio {epoch_metrics['train/blank_ratio']:.3f}; "
                  f"valid loss {valid.loss:.4f}, WER {rates['wer']:.2%}, CER {rates['cer']:.2%}; "
                  f"{train_seconds:.0f} s, {epoch_metrics['audio_seconds_per_second']:.0f} audio-s/s"
                  + (f"; {skipped} non-finite steps skipped" if skipped else ""), flush=True)

            state = {"model": raw_model.state_dict(), "epoch": epoch, "valid_wer": rates["wer"], **checkpoint_meta}
            if improved:
                best_model = {k: v.detach().clone() for k, v in state["model"].items()}
                save_checkpoint(model_dir / "best.pt", **state)
                live.summary["best"] = {"epoch": best_epoch, "valid_wer": best_wer}
            save_checkpoint(model_dir / "last.pt", **state, optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict())
            save_checkpoint(resume_path, **state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            rng=rngs, step=step, history=history, best_wer=best_wer, best_epoch=best_epoch,
                            best_model=best_model, nonfinite_steps=nonfinite_total, fingerprint=fingerprint)
            live.summary["run"] = {"nonfinite_steps": nonfinite_total, "resumed_from_epoch": resumed_from,
                                   "early_stopped_epoch": 0}
            live.sync()

        if world.master:
            live.summary["run"] = {"nonfinite_steps": nonfinite_total, "resumed_from_epoch": resumed_from,
                                   "early_stopped_epoch": early_stopped}
            live.sync()
            resume_path.unlink(missing_ok=True)  # finished: a rerun trains afresh
    return epoch_metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("train", TrainParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

"""Stage train: fit a CTC acoustic model on the training split, select it on the validation split.

One epoch = a pass over length-bucketed batches (with SpecAugment when train.specaugment.enabled), the
loss = CTC + blank penalty (train.blank_penalty), AdamW with linear warm-up, gradient clipping
(train.clip_grad_norm), then a validation pass; the learning rate then follows train.scheduler
(ReduceLROnPlateau on the validation loss, or a cosine decay over the epochs; train.scheduler.enabled
false reproduces the original recipe's never-stepped scheduler). Per-epoch metrics go to metrics/train
through dvclive; models/best.pt (lowest validation WER; with train.average_epochs > 1, the mean of
that epoch's weights and those of the epochs just before it), models/best_epoch.pt (that epoch's
own weights, what a fine-tuning run starts from) and models/last.pt are kept.

Surviving crashes: after every epoch, and every train.checkpoint_every optimizer steps within
one, checkpoints/train/resume.pt holds the whole training state (weights, optimizer, scheduler,
random streams, metric history, and within an epoch the sampler's position and the epoch's sums so
far). A rerun after a crash resumes from it when the params and the features are those of the
crashed run, neither replaying nor skipping a batch, and starts afresh (saying why) when they are
not; it is deleted once training finishes. A step whose loss or gradient is not finite is skipped
and counted; train.max_consecutive_nonfinite in a row stop training. train.nproc > 1 runs the same
command as distributed data parallel processes; train.loader_workers processes read the batches.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from dvclive import Live
from pydantic import Field, ValidationError, field_validator, model_validator
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ctcflow.checkpoint import (BUILD_KEYS, CheckpointError, average_weights, check_compatible, load_checkpoint,
                                load_weights, require_keys, rng_state, save_checkpoint, set_rng_state)
from ctcflow.data import (DistributedLengthBatchSampler, FeatureSplit, LengthBatchSampler, collate, normalization,
                          read_feature_info)
from ctcflow.distributed import World, all_gather, all_sum, all_true, broadcast, join, launch, launched, leave
from ctcflow.features import spec_augment
from ctcflow.inference import decode_split
from ctcflow.losses import BLANK_PENALTY_MODES, CTCObjective, LossTally
from ctcflow.metrics import error_rates
from ctcflow.model import (ARCHITECTURES, build_model, check_conformer_shape, count_parameters, freeze,
                           output_lengths)
from ctcflow.params import Section, flatten
from ctcflow.text import Tokenizer
from stages.runner import StageError, stage_main

FEATURES_DIR = Path("data/features")
MODEL_DIR = Path("models")
LIVE_DIR = Path("metrics/train")
# Not a DVC output: DVC deletes a stage's outputs before it reruns the stage, and the point of
# this file is to outlive a killed run. Relative to the folder that holds model_dir.
RESUME_DIR = Path("checkpoints/train")
# Params that may change between a killed run and its resumption: none changes the epochs done.
RESUMABLE_CHANGES = {"epochs", "early_stopping_patience", "max_consecutive_nonfinite", "num_threads", "nproc",
                     "device", "resume", "loader_workers", "checkpoint_every"}
# The resume checkpoint's layout; one of another layout, written by other code, is not resumed.
RESUME_LAYOUT = 4  # 2: checkpoints within an epoch too; 3: the recent epochs' weights that best.pt averages;
# 4: the best epoch's own weights


class ModelParams(Section):
    arch: Literal[ARCHITECTURES]
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    subsample: int = Field(ge=1, le=8)  # bilstm and conformer; recipe always strides by 2
    conv_channels: int = Field(gt=0)  # bilstm only
    model_dim: int = Field(gt=0)  # conformer only, like the keys below
    blocks: int = Field(gt=0)
    attention_heads: int = Field(gt=0)
    ffn_size: int = Field(gt=0)
    conv_kernel: int = Field(gt=0)

    @model_validator(mode="after")
    def conformer_fits(self):
        if self.arch == "conformer":  # here too, so a bad pair fails before the features load
            check_conformer_shape(self.model_dim, self.attention_heads, self.conv_kernel)
        return self


class CTCParams(Section):
    # An index, or first/last; checked against the label unit's size when training starts.
    blank: Annotated[int, Field(ge=0)] | Literal["first", "last"]
    zero_infinity: bool

    @field_validator("blank", mode="wrap")
    @classmethod
    def one_error_for_blank(cls, value, handler):
        """One line naming train.ctc.blank, not one per member of the union under keys of pydantic's."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("should be an index (0 or more), 'first' or 'last'") from None


class BlankPenaltyParams(Section):
    mode: Literal[BLANK_PENALTY_MODES]
    weight: float = Field(ge=0, allow_inf_nan=False)


class SchedulerParams(Section):
    enabled: bool
    kind: Literal["plateau", "cosine"]
    factor: float = Field(gt=0, lt=1)
    patience: int = Field(ge=0)


class SpecAugmentParams(Section):
    enabled: bool
    n_freq_masks: int = Field(ge=0)
    freq_mask: int = Field(ge=0)
    n_time_masks: int = Field(ge=0)
    time_mask: int = Field(ge=0)
    max_time_fraction: float = Field(gt=0, le=1)


class TrainParams(Section):
    seed: int = Field(ge=0)
    epochs: int = Field(gt=0)
    batch_frames: int = Field(gt=0)
    lr: float = Field(gt=0, allow_inf_nan=False)
    weight_decay: float = Field(ge=0, allow_inf_nan=False)
    warmup_steps: int = Field(ge=0)
    clip_grad_norm: float = Field(ge=0)  # 0 turns clipping off
    num_threads: int = Field(ge=1)  # per process
    init_from: str | None
    freeze: list[str]  # parameter-name prefixes kept at their starting weights
    grad_accumulation: int = Field(ge=1)  # batches per optimizer step
    precision: Literal["fp32", "bf16", "auto"]  # bf16 = torch.autocast to bfloat16; auto = bf16 where native
    early_stopping_patience: int = Field(ge=0)  # epochs without a better validation WER; 0 = off
    average_epochs: int = Field(ge=1)  # best.pt = the mean of the best epoch and those before it, this many; 1 = its own
    max_consecutive_nonfinite: int = Field(ge=1)  # skipped non-finite steps in a row that stop training
    resume: bool  # resume from checkpoints/train/resume.pt when it fits these params
    nproc: int = Field(ge=1)  # processes (distributed data parallel); batch_frames is per step, all together
    device: Literal["cpu", "cuda"]
    loader_workers: int = Field(ge=0)  # DataLoader worker processes; 0 = the training process reads the batches
    checkpoint_every: int = Field(ge=0)  # optimizer steps between resume checkpoints within an epoch; 0 = none
    model: ModelParams
    ctc: CTCParams
    blank_penalty: BlankPenaltyParams
    scheduler: SchedulerParams
    specaugment: SpecAugmentParams

    @field_validator("init_from")
    @classmethod
    def a_path_or_null(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():  # would train from random weights without a word
            raise ValueError("an empty path: name a checkpoint, or write null to start from random weights")
        return value


# The run state's part of the resume checkpoint.
CHECKPOINTED = ("step", "history", "best_wer", "best_epoch", "best_model", "best_epoch_model", "recent_models",
                "nonfinite_steps", "nonfinite_in_a_row")


@dataclass
class RunState:
    """What training carries from one epoch into the next; the resume checkpoint keeps it between runs."""

    step: int = 0  # optimizer steps taken: the warm-up counts them
    history: list[dict] = field(default_factory=list)  # {"epoch", "metrics"} of every epoch done
    best_wer: float = math.inf  # the validation WER of best_epoch
    best_epoch: int = 0
    best_model: dict | None = None  # the weights of best_epoch (averaged with the epochs before it)
    best_epoch_model: dict | None = None  # the weights of best_epoch alone
    recent_models: list[dict] = field(default_factory=list)  # the last average_epochs - 1 epochs' weights
    nonfinite_steps: int = 0  # skipped, over the whole run
    nonfinite_in_a_row: int = 0

    @property
    def epochs_done(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    def out_of_patience(self, patience: int) -> bool:
        """True after `patience` epochs (0 = never) without a better validation WER."""
        return bool(patience) and self.epochs_done - self.best_epoch >= patience

    def record(self, epoch: int, metrics: dict) -> bool:
        """Add an epoch to the history; True when its validation WER is the best so far."""
        self.history.append({"epoch": epoch, "metrics": metrics})
        improved = metrics["valid/wer"] < self.best_wer
        if improved:
            self.best_wer, self.best_epoch = metrics["valid/wer"], epoch
        return improved

    def end_epoch(self, epoch: int, metrics: dict, weights: dict, average_epochs: int) -> bool:
        """Record a finished epoch; True when its validation WER is the best so far. The best
        model is then the mean of this epoch's weights and those of the average_epochs - 1 before it
        (fewer in the first epochs)."""
        window = (self.recent_models + [{k: v.detach().clone() for k, v in weights.items()}])[-average_epochs:]
        improved = self.record(epoch, metrics)
        if improved:
            self.best_model, self.best_epoch_model = average_weights(window), window[-1]
        self.recent_models = window[1 - average_epochs:] if average_epochs > 1 else []
        return improved

    def to_checkpoint(self) -> dict:
        return {name: getattr(self, name) for name in CHECKPOINTED}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> RunState:
        return cls(**{name: checkpoint[name] for name in CHECKPOINTED})


@dataclass
class EpochProgress:
    """How far one process got through an epoch, and the sums its training metrics come from. A
    resume checkpoint written within an epoch keeps every rank's, and the resumed epoch carries on
    from them."""

    batches_done: int = 0  # the sampler's position in the epoch, the same on every rank
    tally: LossTally = field(default_factory=LossTally)  # over the steps taken, not those skipped
    grad_norm_sum: float = 0.0
    updates: int = 0  # optimizer steps taken
    skipped: int = 0  # optimizer steps skipped (non-finite)
    audio_seconds: float = 0.0
    seconds: float = 0.0  # spent in training steps (not checkpoints), for the throughput

    def add(self, tally: LossTally, grad_norm: float) -> None:
        """A step taken: its losses and gradient norm."""
        self.updates += 1
        self.tally.utterances += tally.utterances
        for name, value in tally.sums.items():
            self.tally.sums[name] += value
        self.grad_norm_sum += grad_norm

    def to_checkpoint(self) -> dict:
        saved = {name: getattr(self, name) for name in ("batches_done", "grad_norm_sum", "updates", "skipped",
                                                         "audio_seconds", "seconds")}
        return {**saved, "utterances": self.tally.utterances, "loss_sums": dict(self.tally.sums)}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> EpochProgress:
        progress = cls(**{name: value for name, value in saved.items() if name not in ("utterances", "loss_sums")})
        progress.tally.utterances, progress.tally.sums = saved["utterances"], dict(saved["loss_sums"])
        return progress


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items, the last one shorter if need be (itertools.batched of Python 3.12)."""
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def load_tokenizer(features_dir: Path, blank: int | str) -> Tokenizer:
    """The label unit travels with the features (tokens.json, from the manifest stage)."""
    try:
        return Tokenizer.load(features_dir, blank=blank)
    except ValueError as err:
        raise StageError(f"train.ctc.blank {blank!r} with the units of {features_dir}: {err}") from err


def init_weights(model: torch.nn.Module, model_config: dict, tokenizer: Tokenizer, n_mels: int, path: str) -> None:
    """Start from pre-trained weights (the fix note's "Stage 1"): same architecture, any dropout."""
    try:
        checkpoint = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as err:
        raise StageError(f"train.init_from {path}: cannot read the checkpoint: {err}") from err
    source = f"train.init_from {path}"
    require_keys(checkpoint, BUILD_KEYS, source)
    check_compatible(checkpoint, model_config, tokenizer, n_mels, source)
    load_weights(model, checkpoint["model"], source)


def warn_too_short(params: TrainParams, train_set: FeatureSplit) -> None:
    """Say so when the model's time stride leaves utterances fewer output frames than CTC needs for
    their transcripts (manifest.ctc_frame_rate, which rejects them, assumes another stride): their
    loss is infinite, so zeroed by train.ctc.zero_infinity (they teach nothing) or skipped as
    non-finite steps."""
    frames = output_lengths(params.model.model_dump(), torch.tensor(train_set.num_frames)).numpy()
    short = int((frames < train_set.ctc_frames_needed()).sum())
    if short:
        where, fix = ((f"train.model.subsample {params.model.subsample}", "a lower train.model.subsample")
                      if params.model.arch != "recipe" else ("the recipe network's time stride 2",
                                                             "another train.model.arch"))
        outcome = ("their CTC loss is zeroed (train.ctc.zero_infinity): they teach nothing" if params.ctc.zero_infinity
                   else "their CTC loss is infinite: their batches' steps are skipped as non-finite")
        print(f"warning: {short} of {len(train_set)} training utterances are too short for their transcripts at "
              f"{where} (CTC needs an output frame per unit, and one between repeats): {outcome}; use {fix}, or "
              f"set manifest.ctc_frame_rate to the model's frame rate to reject them", flush=True)


def train_sampler(params: TrainParams, world: World, train_set: FeatureSplit) -> LengthBatchSampler:
    if world.distributed:
        return DistributedLengthBatchSampler(train_set.num_frames, params.batch_frames, shuffle=True,
                                             seed=params.seed, rank=world.rank, world_size=world.world_size)
    return LengthBatchSampler(train_set.num_frames, params.batch_frames, shuffle=True, seed=params.seed)


def pinned(world: World) -> bool:
    """Batches for a GPU go through page-locked memory, and are copied from it without waiting."""
    return world.device.type == "cuda"


def make_scheduler(params: TrainParams, optimizer: torch.optim.Optimizer):
    """plateau: the rate × factor after patience + 1 epochs without a lower validation CTC loss.
    cosine: after epoch e of E, lr × (1 + cos(π e / E)) / 2, from lr down to nearly 0 in the last
    epoch, whatever the validation loss does (the warm-up scales the first steps' rates)."""
    if params.scheduler.kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: (1 + math.cos(math.pi * done / params.epochs)) / 2)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=params.scheduler.factor, patience=params.scheduler.patience)


def make_loader(params: TrainParams, world: World, train_set: FeatureSplit) -> DataLoader:
    """The training batches, read and collated by train.loader_workers processes (0: by this one).
    The workers draw no random numbers (SpecAugment masks each batch here), and the loader draws
    their seeds from a generator of its own, not from the torch stream that SpecAugment and dropout
    draw from: the weights are the same for any number of workers, and after a resume."""
    workers = params.loader_workers
    return DataLoader(train_set, batch_sampler=train_sampler(params, world, train_set), collate_fn=collate,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=pinned(world),
                      generator=torch.Generator().manual_seed(params.seed))


def loss_shares(sampler: LengthBatchSampler, world: World) -> Iterable[float]:
    """Each batch's weight on its mean loss, from the sampler's start on. DDP averages the gradients
    over ranks; weighting each rank's batch mean by its share of the global batch's utterances makes
    that the gradient of the global batch's mean loss."""
    if not world.distributed:
        return itertools.repeat(1.0)
    return [len(batch) * world.world_size / size
            for batch, size in zip(sampler.batches[sampler.start :], sampler.global_sizes[sampler.start :])]


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 in hardware. Elsewhere autocast to bfloat16 is emulated
    and slower than float32 (benchmarks/train.py: 2× slower on AVX-512 without bf16, 17× on AVX2 only)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # torch.cpu's probes are private, but the only ones torch ships (cpuinfo, any OS); ARM CPUs count as without.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as trained: auto is bf16 on a device with native bfloat16, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def mixed_precision(params: TrainParams, world: World) -> torch.autocast:
    return torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=params.precision == "bf16")


def run_fingerprint(params: TrainParams, features_dir: Path, world_size: int) -> dict:
    """What a run must share with the crashed run whose checkpoint it resumes."""
    data = hashlib.sha256()
    for name in ("features.json", "train/index.csv", "valid/index.csv"):
        data.update((Path(features_dir) / name).read_bytes())
    return {**flatten(params.model_dump(exclude=RESUMABLE_CHANGES)), "features": data.hexdigest()[:16],
            "processes": world_size, "layout": RESUME_LAYOUT}


def stopping_epoch(history: list[dict], epochs: int, patience: int) -> int | None:
    """The epoch of `history` after which a run with these train.epochs and train.early_stopping_patience
    stops (its last, or the first out of patience), or None when it would train on after them all."""
    replay = RunState()
    for record in history:
        replay.record(record["epoch"], record["metrics"])
        if replay.epochs_done >= epochs or replay.out_of_patience(patience):
            return replay.epochs_done
    return None


def read_resume(path: Path, fingerprint: dict, params: TrainParams) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise StageError(f"train.resume: cannot resume from {err}; delete it, or set train.resume: false, "
                         f"to start afresh") from err
    theirs = state.get("fingerprint", {})
    differ = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in fingerprint.items() if theirs.get(k) != v]
    if differ:
        print(f"not resuming from {path}, written with other settings ({'; '.join(differ)}): starting afresh",
              flush=True)
        return None
    done = RunState.from_checkpoint(state)
    stop = stopping_epoch(done.history, params.epochs, params.early_stopping_patience)
    if state["progress"] and stop is not None:
        # That epoch's end, and with it models/last.pt, would never come.
        print(f"not resuming from {path}: it was written within epoch {done.epochs_done + 1}, which "
              f"train.epochs or train.early_stopping_patience now leave out: starting afresh", flush=True)
        return None
    if stop is not None and stop < done.epochs_done:
        # Its weights and history hold epochs that a run with these params never trains.
        print(f"not resuming from {path}: it holds {done.epochs_done} epochs, but train.epochs or "
              f"train.early_stopping_patience now stop after epoch {stop}: starting afresh", flush=True)
        return None
    return state


def restore(resumed: dict, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler) -> tuple[RunState, EpochProgress]:
    """Training as the killed run left it at its last checkpoint, after an epoch or within one (then
    with this rank's progress through it), this rank's random streams included."""
    model.load_state_dict(resumed["model"])
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    set_rng_state(resumed["rng"][world.rank])
    within = resumed["progress"]  # every rank's, in a checkpoint written within an epoch
    progress = EpochProgress.from_checkpoint(within[world.rank]) if within else EpochProgress()
    return RunState.from_checkpoint(resumed), progress


def train_one_epoch(epoch: int, params: TrainParams, world: World, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, objective: CTCObjective, loader: DataLoader, state: RunState,
                    progress: EpochProgress, frame_seconds: float,
                    checkpoint: Callable[[EpochProgress], None]) -> tuple[dict, float, float]:
    """The training batches from `progress`'s position on (its first, or where a killed run left
    off), an optimizer step per group of train.grad_accumulation of them (the epoch's last group may
    be smaller), and `checkpoint(progress)` after every train.checkpoint_every steps but the last.
    Returns the epoch's training metrics over every rank, the audio seconds trained on and the
    seconds it took."""
    model.train()
    sampler = loader.batch_sampler
    sampler.set_epoch(epoch, start=progress.batches_done)
    if not progress.batches_done:
        # Until the loader had a generator of its own, it drew one number from the torch stream as an
        # epoch started; drawing it keeps SpecAugment's masks and dropout, so the weights, as they were.
        torch.empty((), dtype=torch.int64).random_()
    augment = spec_augment(**params.specaugment.model_dump(exclude={"enabled"})) if params.specaugment.enabled else None
    quiet = {} if world.master else {"disable": True}  # rank 0 shows progress; TQDM_DISABLE still works
    bar = tqdm(loader, desc=f"epoch {epoch}/{params.epochs}", unit="batch", leave=False, initial=sampler.start,
               total=len(sampler.batches), **quiet)
    started = time.perf_counter()
    for group in chunked(zip(bar, loss_shares(sampler, world)), params.grad_accumulation):
        group_tally, rows = accumulate_gradients(group, params, world, model, objective, augment)
        progress.batches_done += len(group)
        for batch, _ in group:
            progress.audio_seconds += batch.lengths.sum().item() * frame_seconds
        grad_norm = optimizer_step(params, world, model, optimizer, state, group_tally.sums["loss"])
        if grad_norm is None:
            progress.skipped += 1
            skip_step(epoch, params, world, state,
                      [u for rank_rows in all_gather(world, rows) for u in loader.dataset.index["id"].iloc[rank_rows]])
        else:
            progress.add(group_tally, grad_norm)
            bar.set_postfix(loss=f"{progress.tally.means()['loss']:.3f}")
        steps, epoch_over = progress.updates + progress.skipped, progress.batches_done == len(sampler.batches)
        if params.checkpoint_every and steps % params.checkpoint_every == 0 and not epoch_over:
            progress.seconds += time.perf_counter() - started
            checkpoint(progress)
            started = time.perf_counter()
    progress.seconds += time.perf_counter() - started

    # Every rank's share of the epoch (a no-op in one process).
    tally = progress.tally
    tally.utterances, *sums, audio_seconds = all_sum(world, [tally.utterances, *tally.sums.values(),
                                                             progress.audio_seconds])
    tally.sums = dict(zip(tally.sums, sums))
    means = tally.means() if tally.utterances else dict.fromkeys(tally.sums, math.nan)  # every step skipped
    metrics = {**{f"train/{name}": value for name, value in means.items()},
               "train/grad_norm": progress.grad_norm_sum / progress.updates if progress.updates else math.nan,
               "train/nonfinite_steps": progress.skipped}
    return metrics, audio_seconds, progress.seconds


def accumulate_gradients(group: list, params: TrainParams, world: World, model: torch.nn.Module,
                         objective: CTCObjective, augment: Callable | None) -> tuple[LossTally, list[int]]:
    """Forward and backward passes over one optimizer step's (batch, loss share) pairs, so that the
    gradients add up to that of the step's mean loss. Returns the loss tally and the batches' rows."""
    tally, rows = LossTally(), []
    for position, (batch, share) in enumerate(group, 1):
        batch = batch.to(world.device, non_blocking=pinned(world))
        feats = augment(batch.feats.transpose(1, 2)).transpose(1, 2) if augment is not None else batch.feats
        # Gradients are exchanged between ranks once per optimizer step, on its last batch.
        last = position == len(group)
        with model.no_sync() if world.distributed and not last else contextlib.nullcontext():
            with mixed_precision(params, world):
                log_probs, lengths = model(feats, batch.lengths)
                parts = objective(log_probs, lengths, batch.targets, batch.target_lengths)
            (parts.total * (share / len(group))).backward()
        tally.add(parts, log_probs, lengths, objective.blank)
        rows += batch.indices
    return tally, rows


def optimizer_step(params: TrainParams, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   state: RunState, loss: float) -> float | None:
    """Clip the accumulated gradient and step with it, at the warm-up's share of the scheduler's rate
    while the warm-up lasts; the optimizer keeps the scheduler's rate, so a warm-up longer than an
    epoch neither undoes a scheduler step nor is undone by one. A non-finite loss or gradient (bad
    features, an overflow) would poison the weights: every rank skips the step then. Returns the
    gradient norm of a step taken, None for a step skipped."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), params.clip_grad_norm or float("inf")).item()
    finite = all_true(world, math.isfinite(loss) and math.isfinite(grad_norm))
    if finite:
        scheduled = [param_group["lr"] for param_group in optimizer.param_groups]
        for param_group, lr in zip(optimizer.param_groups, scheduled):
            param_group["lr"] = warmed_up(params, lr, state.step)
        optimizer.step()
        for param_group, lr in zip(optimizer.param_groups, scheduled):
            param_group["lr"] = lr
        state.step += 1
        state.nonfinite_in_a_row = 0
    optimizer.zero_grad(set_to_none=True)
    return grad_norm if finite else None


def warmed_up(params: TrainParams, lr: float, step: int) -> float:
    """The rate optimizer step `step` (from 0) runs at: linear, lr × (step + 1) / warmup_steps, while
    the warm-up lasts; lr after it."""
    return lr * (step + 1) / params.warmup_steps if step < params.warmup_steps else lr


def skip_step(epoch: int, params: TrainParams, world: World, state: RunState, utterance_ids: list[str]) -> None:
    """Count a skipped step, say so, and stop training at train.max_consecutive_nonfinite in a row."""
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    ids = ", ".join(utterance_ids)
    if state.nonfinite_in_a_row >= params.max_consecutive_nonfinite:
        raise StageError(f"training stopped in epoch {epoch}: {state.nonfinite_in_a_row} steps in a row had a "
                         f"non-finite loss or gradient (train.max_consecutive_nonfinite = "
                         f"{params.max_consecutive_nonfinite}); the last batch held utterances {ids}: "
                         f"check their features and transcripts")
    if world.master:
        tqdm.write(f"epoch {epoch}: skipped a step with a non-finite loss or gradient (utterances {ids})")


def validate(model: torch.nn.Module, valid_set: FeatureSplit, tokenizer: Tokenizer, objective: CTCObjective,
             params: TrainParams, world: World) -> dict:
    # Each rank validates its identical copy of the model: no broadcast needed for the decisions it informs.
    with mixed_precision(params, world):
        valid = decode_split(model, valid_set, tokenizer, objective, params.batch_frames)
    rates = error_rates(valid_set.index["text_normalized"].tolist(), valid.hypotheses)
    return {"valid/loss": valid.loss, "valid/ctc_loss": valid.ctc_loss, "valid/blank_ratio": valid.blank_ratio,
            "valid/wer": rates["wer"], "valid/cer": rates["cer"], "valid/sentence_accuracy": rates["sentence_accuracy"]}


def epoch_line(epoch: int, metrics: dict, seconds: float) -> str:
    skipped = metrics["train/nonfinite_steps"]
    return (f"epoch {epoch}: loss {metrics['train/loss']:.4f} (CTC {metrics['train/ctc_loss']:.4f}, "
            f"penalty {metrics['train/blank_penalty']:.4f}), blank ratio {metrics['train/blank_ratio']:.3f}; "
            f"valid loss {metrics['valid/loss']:.4f}, WER {metrics['valid/wer']:.2%}, CER {metrics['valid/cer']:.2%}; "
            f"{seconds:.0f} s, {metrics['audio_seconds_per_second']:.0f} audio-s/s"
            + (f"; {skipped} non-finite steps skipped" if skipped else ""))


def log_epoch(live: Live, epoch: int, metrics: dict) -> None:
    live.step = epoch  # plots and metrics count epochs from 1
    for name, value in metrics.items():
        live.log_metric(name, value)


def save_model(path: Path, weights: dict, epoch: int, valid_wer: float, meta: dict, **training) -> None:
    """`meta` holds what rebuilds the model and its input (the feature mean/std too), so a checkpoint
    transcribes on its own; `training` (optimizer, scheduler, ...) lets training carry on from it."""
    save_checkpoint(path, model=weights, epoch=epoch, valid_wer=valid_wer, **meta, **training)


def save_best(live: Live, model_dir: Path, state: RunState, meta: dict) -> None:
    """models/best.pt (averaged, to transcribe and evaluate) and models/best_epoch.pt (the epoch's
    own weights, to fine-tune: a mean of epochs fine-tuned worse on FSDD)."""
    save_model(model_dir / "best.pt", state.best_model, state.best_epoch, state.best_wer, meta)
    save_model(model_dir / "best_epoch.pt", state.best_epoch_model, state.best_epoch, state.best_wer, meta)
    live.summary["best"] = {"epoch": state.best_epoch, "valid_wer": state.best_wer}


def save_epoch(live: Live, model_dir: Path, resume_path: Path, meta: dict, fingerprint: dict, state: RunState,
               improved: bool, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, rngs: list) -> None:
    """models/best.pt and best_epoch.pt when the epoch improved on them, models/last.pt, and the resume
    checkpoint."""
    weights, record = model.state_dict(), state.history[-1]
    if improved:
        save_best(live, model_dir, state, meta)
    training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    save_model(model_dir / "last.pt", weights, record["epoch"], record["metrics"]["valid/wer"], meta, **training)
    save_resume(resume_path, meta, fingerprint, state, model, optimizer, scheduler, rngs, progress=None)


def save_resume(path: Path, meta: dict, fingerprint: dict, state: RunState, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, scheduler, rngs: list, progress: list[dict] | None) -> None:
    """The resume checkpoint: the weights with what rebuilds their model, the optimizer and scheduler,
    every rank's random streams, the run state, and every rank's progress through the epoch when it
    is written within one (None after an epoch)."""
    save_checkpoint(path, model=model.state_dict(), **meta, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), rng=rngs, **state.to_checkpoint(), progress=progress,
                    fingerprint=fingerprint)


def checkpoint_within_epoch(progress: EpochProgress, world: World, path: Path, meta: dict, fingerprint: dict,
                            state: RunState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler) -> None:
    """The resume checkpoint between two steps of an epoch. Every rank calls it at the same step:
    gathering their random streams and progress is a collective; rank 0 writes them."""
    rngs, progresses = all_gather(world, rng_state()), all_gather(world, progress.to_checkpoint())
    if world.master:
        save_resume(path, meta, fingerprint, state, model, optimizer, scheduler, rngs, progresses)


def rewrite_outputs(live: Live, model_dir: Path, resumed: dict, state: RunState, meta: dict) -> None:
    """The outputs of the epochs a resumed run inherits, rewritten from its checkpoint: DVC deletes a
    stage's outputs before it reruns it, and a kill may leave an epoch that the checkpoint lacks.
    So the history holds every epoch exactly once. From a checkpoint written within an epoch,
    models/last.pt comes back when that epoch ends."""
    for record in state.history:
        log_epoch(live, record["epoch"], record["metrics"])
    if state.history:
        save_best(live, model_dir, state, meta)
    if not resumed["progress"]:
        save_model(model_dir / "last.pt", resumed["model"], state.epochs_done,
                   state.history[-1]["metrics"]["valid/wer"], meta, optimizer=resumed["optimizer"],
                   scheduler=resumed["scheduler"])


def validate_best(live: Live, model_dir: Path, state: RunState, params: TrainParams, model: torch.nn.Module,
                  valid_set: FeatureSplit, tokenizer: Tokenizer, objective: CTCObjective, world: World) -> None:
    """The validation WER and loss of models/best.pt's own weights into the summary: with
    train.average_epochs > 1 they are a mean of epochs, whose WER no epoch's line shows. Training
    is over, so the model may take them."""
    best = state.history[state.best_epoch - 1]["metrics"]
    first = max(1, state.best_epoch - params.average_epochs + 1)
    if first < state.best_epoch:
        model.load_state_dict(state.best_model)
        best = validate(model, valid_set, tokenizer, objective, params, world)
        print(f"{model_dir / 'best.pt'}: the mean of the weights of epochs {first} to {state.best_epoch}: "
              f"valid WER {best['valid/wer']:.2%} (epoch {state.best_epoch} alone: {state.best_wer:.2%})", flush=True)
    live.summary["best"] = {**live.summary["best"], "averaged_valid_wer": best["valid/wer"],
                            "averaged_valid_loss": best["valid/loss"]}


def summarize(live: Live, state: RunState, resumed_from: int, early_stopped: int, precision: str) -> None:
    live.summary["run"] = {"nonfinite_steps": state.nonfinite_steps, "resumed_from_epoch": resumed_from,
                           "early_stopped_epoch": early_stopped, "precision": precision}
    live.sync()


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
    requested_precision, precision = params.precision, resolve_precision(params.precision, world.device)
    if world.master and precision == "bf16" and not native_bf16(world.device):
        print(f"warning: train.precision bf16 on a {world.device.type.upper()} without native bfloat16: emulated, "
              f"slower than fp32 (2-17× in benchmarks/train.py); fp32 or auto would be faster", flush=True)
    params = params.model_copy(update={"precision": precision})
    tokenizer = load_tokenizer(features_dir, params.ctc.blank)
    feature_info = read_feature_info(features_dir)
    n_mels = feature_info["logmel"]["n_mels"]
    train_set = FeatureSplit(features_dir, "train", tokenizer)
    valid_set = FeatureSplit(features_dir, "valid", tokenizer)

    model_config = params.model.model_dump()
    raw_model = build_model(model_config, n_mels, tokenizer.num_classes)
    if params.init_from:
        init_weights(raw_model, model_config, tokenizer, n_mels, params.init_from)
    try:
        freeze(raw_model, params.freeze)
    except ValueError as err:
        raise StageError(f"train.freeze: {err}") from err
    if world.master:
        frozen = count_parameters(raw_model) - count_parameters(raw_model, trainable_only=True)
        print(f"model {params.model.arch}: {count_parameters(raw_model) / 1e6:.2f} M parameters"
              + (f" ({frozen / 1e6:.2f} M frozen: {', '.join(params.freeze)})" if frozen else "") + "; "
              f"{len(train_set)} training and {len(valid_set)} validation utterances"
              + (f"; {world.world_size} processes" if world.distributed else "") + f"; {precision}"
              + (" (train.precision auto)" if requested_precision == "auto" else ""))
        warn_too_short(params, train_set)
    raw_model.to(world.device)
    # DDP averages the gradients of all ranks after each backward pass; raw_model is the plain model.
    model = DistributedDataParallel(raw_model) if world.distributed else raw_model
    if world.rank:
        seed_everything(params.seed + world.rank)  # own SpecAugment masks and dropout; rank 0 keeps the 1-process stream

    objective = CTCObjective(tokenizer.blank, params.ctc.zero_infinity, params.blank_penalty.mode,
                             params.blank_penalty.weight)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.lr,
                                  weight_decay=params.weight_decay)
    scheduler = make_scheduler(params, optimizer)
    loader = make_loader(params, world, train_set)
    frame_seconds = feature_info["logmel"]["hop_length"] / feature_info["logmel"]["sample_rate"]

    meta = {"model_config": model_config, "tokenizer": tokenizer.to_dict(), "n_mels": n_mels,
            "logmel": feature_info["logmel"], "mean": feature_info["mean"], "std": feature_info["std"],
            "normalize": normalization(feature_info)}

    # Resume where the last checkpoint of a killed run left off, if there is one and it fits.
    resume_path = resume_dir / "resume.pt"
    fingerprint = run_fingerprint(params, features_dir, world.world_size)
    resumed = broadcast(world, read_resume(resume_path, fingerprint, params) if world.master and params.resume
                        else None)
    if resumed:
        check_compatible(resumed, model_config, tokenizer, n_mels, str(resume_path))
    state, progress = restore(resumed, world, raw_model, optimizer, scheduler) if resumed \
        else (RunState(), EpochProgress())
    resumed_from = state.epochs_done
    checkpoint = functools.partial(checkpoint_within_epoch, world=world, path=resume_path, meta=meta,
                                   fingerprint=fingerprint, state=state, model=raw_model, optimizer=optimizer,
                                   scheduler=scheduler)

    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) if world.master else contextlib.nullcontext() as live:
        if resumed and world.master:
            where = (f"epoch {resumed_from + 1} at its batch {progress.batches_done + 1}" if progress.batches_done
                     else f"after epoch {resumed_from}")
            print(f"resuming {where} from {resume_path}", flush=True)
            rewrite_outputs(live, model_dir, resumed, state, meta)
        early_stopped = 0
        for epoch in range(resumed_from + 1, params.epochs + 1):
            if state.out_of_patience(params.early_stopping_patience):
                early_stopped = state.epochs_done
                if world.master:
                    print(f"early stop: no better validation WER since epoch {state.best_epoch}", flush=True)
                break
            train_metrics, audio_seconds, seconds = train_one_epoch(epoch, params, world, model, optimizer, objective,
                                                                    loader, state, progress, frame_seconds, checkpoint)
            progress = EpochProgress()  # the next epoch starts at its first batch
            valid_metrics = validate(raw_model, valid_set, tokenizer, objective, params, world)
            if params.scheduler.enabled and params.scheduler.kind == "plateau":
                scheduler.step(valid_metrics["valid/ctc_loss"])
            elif params.scheduler.enabled:
                scheduler.step()
            next_rate = warmed_up(params, optimizer.param_groups[0]["lr"], state.step)
            metrics = {**train_metrics, **valid_metrics, "lr": next_rate,
                       "audio_seconds_per_second": audio_seconds / seconds}
            improved = state.end_epoch(epoch, metrics, raw_model.state_dict(), params.average_epochs)
            rngs = all_gather(world, rng_state())  # every rank's streams, so a resumed run draws what this one would
            if world.master:
                log_epoch(live, epoch, metrics)
                print(epoch_line(epoch, metrics, seconds), flush=True)
                save_epoch(live, model_dir, resume_path, meta, fingerprint, state, improved, raw_model, optimizer,
                           scheduler, rngs)
                summarize(live, state, resumed_from, early_stopped=0, precision=precision)
        if world.master:
            validate_best(live, model_dir, state, params, raw_model, valid_set, tokenizer, objective, world)
            summarize(live, state, resumed_from, early_stopped, precision)
            resume_path.unlink(missing_ok=True)  # finished: a rerun trains afresh
    return state.history[-1]["metrics"]


def main(argv: list[str] | None = None) -> None:
    stage_main("train", TrainParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

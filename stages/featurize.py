"""Stage featurize: features for every accepted utterance, normalized by training statistics.

Audio is down-mixed to mono and resampled to featurize.sample_rate, then turned into
torchaudio log-mel frames. Each split is stored as float16 shards of at most featurize.shard_mb
plus an index, written as the utterances are computed; the manifests are read a chunk at a time,
so the stage's memory does not grow with the corpus (see ctcflow/data.py). features.json holds
the settings and the training split's per-bin mean and std (running float64 sums), which train
and evaluate apply when they load features. A manifest of precomputed feature
arrays (.npy) is only normalized: the arrays are stored as they are, in float32.

This is the first stage that reads the samples, so it rejects audio that cannot be decoded,
holds NaN or infinite samples, is silent (peak at or below featurize.silence_db) or has no more
samples than featurize.n_fft (shorter_than_window); rejects go
to data/features/rejects.jsonl and are counted in metrics/featurize.json, so nothing the manifest
accepted disappears uncounted. Clipped audio is kept and listed in data/features/warnings.jsonl.
The label unit (data/manifests/tokens.json) is copied to data/features/tokens.json for train.
The extra test sets the manifest lists (data/manifests/test_sets.json) are featurized like the test
split, to data/features/<name>/, their names copied to data/features/test_sets.json (not
to features.json, which train reads: a new test set must not retrain).

Augmented copies (featurize.augment, Kaldi's speed-perturbation way, with ctcflow/augment.py's
whole chain): with copies = N, the training split holds each accepted utterance as it is and then N
augmented versions of it (ids `<id>_aug1` … `<id>_augN`, same transcript and speaker): copy 1 of every
utterance in manifest order, then copy 2, and so on. Copy k of the utterance at manifest position i
draws everything from a generator seeded with (augment.seed, k, i), babble included, which mixes
other accepted training utterances that generator picks; so the bytes depend on neither the number
of workers nor the order of work. Each copy's duration is its own (a 0.9× copy is 11 % longer than
the original whose length the manifest checked). The training statistics are those of the clean
utterances only: they describe the audio the model meets when it transcribes, and they stay the
same whatever the augmentation settings. valid and test are never augmented.

featurize.normalize (global, utterance_mean, utterance_mean_var) is recorded in features.json;
train, evaluate and (through the checkpoint) `ctcflow transcribe` apply it after the training
statistics (ctcflow.data.normalize_utterance).

Files are read and turned into features in featurize.num_workers processes (ctcflow/workers.py),
or with featurize.executor dask on a Dask cluster (featurize.scheduler_address, or the environment's
CTCFLOW_DASK_SCHEDULER, which overrides both; docs/orchestration.md).
The shards, statistics, rejects and warnings are written here in manifest order, so any number
of workers, on either executor, writes the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from ctcflow.audio import AudioError, decode_audio
from ctcflow.augment import (AugmentConfig, ChannelConfig, Checked, NoiseConfig, PitchConfig, ReverbConfig, SpeedConfig,
                             augment)
from ctcflow.data import Normalize, SplitWriter
from ctcflow.features import LogMel, LogMelConfig, RunningStats, is_feature_file, load_feature_array, mel_filters
from ctcflow.errors import Rejected
from ctcflow.manifest import SPLITS, Reject, iter_manifest, read_test_set_names, tally_rejects, write_test_set_names
from ctcflow.params import Float, Section
from ctcflow.workers import DASK_SCHEDULER_ENV, dask_map, ordered_map
from stages.runner import StageError, fail_if_strict, stage_main
from ctcflow.text import TOKENS_FILE

MANIFEST_DIR = Path("data/manifests")
OUT_DIR = Path("data/features")
METRICS_FILE = Path("metrics/featurize.json")


class AugmentParams(Section):
    copies: int = Field(ge=0)  # augmented versions of each training utterance; 0 = off
    seed: int = Field(ge=0)
    speed: SpeedConfig
    pitch: PitchConfig
    reverb: ReverbConfig
    noise: NoiseConfig
    channel: ChannelConfig
    gain_db: Checked("gain_db", tuple[Float, Float])

    @property
    def config(self) -> AugmentConfig:
        return AugmentConfig(self.speed, self.pitch, self.reverb, self.noise, self.channel, self.gain_db)

    @model_validator(mode="after")
    def chain_fits(self):
        self.config  # AugmentConfig checks the chain's own settings (gain_db) when the params are read
        return self


class FeaturizeParams(Section):
    sample_rate: int = Field(ge=4000)
    n_fft: int = Field(gt=0)
    win_length: int = Field(gt=0)
    hop_length: int = Field(gt=0)
    n_mels: int = Field(gt=0)
    num_threads: int = Field(ge=1)  # torch threads per worker
    num_workers: int = Field(ge=1, le=64)  # processes reading audio and computing features
    executor: Literal["local", "dask"]  # where: processes of this machine, or a Dask cluster
    scheduler_address: str | None  # executor dask: the scheduler; null = a local cluster of num_workers
    silence_db: float | None = Field(le=0)  # peak at or below → silent_audio; null = keep all
    clip_warn_fraction: float = Field(gt=0, le=1)  # share of full-scale samples → clipped_audio warning
    strict: bool  # true: any reject fails the stage
    normalize: Normalize  # after the training statistics: global (nothing more) or per utterance
    # the most frames a shard file of the store holds, in MB (10**6 bytes); .inf has no byte count
    shard_mb: float = Field(gt=0, allow_inf_nan=False)
    augment: AugmentParams

    @property
    def logmel(self) -> LogMelConfig:
        return LogMelConfig(self.sample_rate, self.n_fft, self.win_length, self.hop_length, self.n_mels)

    @model_validator(mode="after")
    def window_fits(self):
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length {self.win_length} must not exceed n_fft {self.n_fft}")
        if self.hop_length > self.win_length:
            raise ValueError(f"hop_length {self.hop_length} must not exceed win_length {self.win_length}: the samples "
                             "between two windows would be heard by no frame")
        # A mel band narrower than the FFT's bin spacing gets no bin: its filter is all zeros and its
        # feature a constant log(1e-10), which the training statistics' std floor blows up.
        with warnings.catch_warnings():  # torchaudio's own warning says less than the error below
            warnings.simplefilter("ignore")
            filters = mel_filters(self.logmel)
        if empty := int((filters.sum(0) == 0).sum()):
            raise ValueError(f"n_mels: {self.n_mels} mel bands leave {empty} without an FFT bin at n_fft "
                             f"{self.n_fft} and {self.sample_rate} Hz (all-zero filters, constant features); "
                             "use fewer mel bands or a larger n_fft")
        return self

    @model_validator(mode="after")
    def channel_below_nyquist(self):
        # A peaking EQ or a high-pass at or above Nyquist has poles outside the unit circle: NaN frames.
        channel, nyquist = self.augment.channel, self.sample_rate / 2
        if not self.augment.copies or channel.prob == 0:
            return self  # the channel never runs
        for key, bounds, used in (("low_cut_hz", channel.low_cut_hz, channel.telephone_prob < 1),
                                  ("eq_hz", channel.eq_hz, channel.eq_bands > 0)):
            if used and bounds[1] >= nyquist:
                raise ValueError(f"augment: channel.{key} {list(bounds)} must stay below the Nyquist frequency, "
                                 f"{nyquist:g} Hz at featurize.sample_rate {self.sample_rate} (above it: NaN frames)")
        return self


def input_kind(manifests: dict[str, Path]) -> str:
    """"features" when every row points to a .npy array, "audio" when none does."""
    flags = {is_feature_file(utt.audio_path) for path in manifests.values() for utt in iter_manifest(path)}
    if len(flags) > 1:
        raise StageError("the manifests mix audio files and .npy feature arrays; set manifest.input and rerun manifest")
    return "features" if flags == {True} else "audio"


_LOGMEL: dict[LogMelConfig, LogMel] = {}  # one transform per process, built on first use


class Extracted(NamedTuple):
    frames: np.ndarray  # as stored: float16 log-mel, or a precomputed array in float32
    clipped_fraction: float
    sums: tuple | None  # RunningStats.frame_sums of the float32 frames (training split only)


def log_mel(waveform: torch.Tensor, config: LogMelConfig) -> np.ndarray:
    if config not in _LOGMEL:
        _LOGMEL[config] = LogMel(config)
    return _LOGMEL[config](waveform).numpy()


def to_float16(feats: np.ndarray) -> np.ndarray:
    # Through torch: the same bits as numpy's cast (round to nearest even), several times faster.
    return torch.from_numpy(feats).to(torch.float16).numpy()


def extract(path: str, params: FeaturizeParams, precomputed: bool, with_stats: bool) -> Extracted | Rejected:
    """One file's frames as stored, its share of clipped samples and its share of the statistics,
    or the reject: returned, not raised, so one bad file never stops a worker. The statistics and
    the float16 cast are done here, so with several workers they run in the workers too."""
    try:
        if precomputed:
            feats, clipped_fraction = load_feature_array(path), 0.0
        else:
            decoded = decode_audio(path, params.sample_rate, params.silence_db)
            if decoded.waveform.numel() <= params.n_fft:
                # The centred STFT needs more than n_fft / 2 samples, and a copy at speed 2 halves them.
                raise AudioError("shorter_than_window", f"{path}: {decoded.waveform.numel()} samples at "
                                 f"{params.sample_rate} Hz, not more than featurize.n_fft {params.n_fft}")
            feats, clipped_fraction = log_mel(decoded.waveform, params.logmel), decoded.clipped_fraction
    except Rejected as err:
        return err
    sums = RunningStats.frame_sums(feats) if with_stats else None
    # Precomputed arrays keep float32: their range is unknown, and float16 spacing is 0.5 at 1000.
    stored = feats if precomputed else to_float16(feats)
    return Extracted(stored, clipped_fraction, sums)


class Utterances(Sequence):
    """Waveforms of audio files, each read only when asked for: babble draws a few of thousands."""

    def __init__(self, paths: Sequence[str], sample_rate: int):
        self.paths, self.sample_rate = paths, sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_audio(self.paths[index], self.sample_rate).waveform


class CopyJob(NamedTuple):
    copy: int  # 1 … augment.copies
    position: int  # the utterance's row in the training manifest: with the copy, it seeds the draws
    original: int  # its place among the accepted training utterances


class Augmented(NamedTuple):
    frames: np.ndarray  # float16 log-mel
    duration: float  # seconds, to 0.1 ms as the manifest writes them: a speed-perturbed copy is longer or shorter


def extract_copy(job: CopyJob, params: FeaturizeParams, originals: tuple[str, ...]) -> Augmented:
    """One augmented copy of one accepted training utterance (`originals` lists their paths)."""
    seed = np.random.SeedSequence([params.augment.seed, job.copy, job.position]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(seed))
    others = Utterances(originals[: job.original] + originals[job.original + 1 :], params.sample_rate)
    waveform = decode_audio(originals[job.original], params.sample_rate).waveform
    waveform = augment(waveform, params.sample_rate, params.augment.config, generator, others)
    return Augmented(to_float16(log_mel(waveform, params.logmel)), round(waveform.numel() / params.sample_rate, 4))


def augmented_copies(map_files: Callable, params: FeaturizeParams, originals: list[tuple[int, tuple]]
                     ) -> Iterator[tuple[dict, np.ndarray]]:
    """Index row (as SplitWriter takes it) and frames of every augmented copy of the accepted training
    utterances, given as (manifest position, manifest row): copy 1 of each in order, then copy 2, ..."""
    jobs = [CopyJob(copy, position, original) for copy in range(1, params.augment.copies + 1)
            for original, (position, _) in enumerate(originals)]
    paths = tuple(utt.audio_path for _, utt in originals)
    results = map_files(partial(extract_copy, params=params, originals=paths), jobs)
    for job, result in tqdm(zip(jobs, results), total=len(jobs), desc="featurize train (augmented)", unit="utt"):
        utt = originals[job.original][1]
        yield ({"id": f"{utt.id}_aug{job.copy}", "speaker": utt.speaker, "duration": result.duration,
                "text_normalized": utt.text_normalized, "num_frames": len(result.frames)}, result.frames)


@dataclass
class Tally:
    """A split's size as metrics/featurize.json reports it, summed as its utterances are written."""
    utterances: int = 0
    frames: int = 0
    seconds: float = 0.0

    def add(self, row: dict) -> None:
        self.utterances += 1
        self.frames += row["num_frames"]
        self.seconds += row["duration"]

    def metrics(self) -> dict:
        return {"utterances": self.utterances, "frames": self.frames, "hours": round(self.seconds / 3600, 4)}


def file_map(params: FeaturizeParams):
    """Where the files are read: processes of this machine or a Dask cluster (ctcflow/workers.py)."""
    setup = {"preload": __name__, "max_chunk": 32, "initializer": torch.set_num_threads,
             "initargs": (params.num_threads,)}
    if address := os.environ.get(DASK_SCHEDULER_ENV):
        print(f"featurize: {DASK_SCHEDULER_ENV}={address} overrides featurize.executor and "
              "featurize.scheduler_address", file=sys.stderr)
        return dask_map(address, params.num_workers, "featurize", **setup, address_from=DASK_SCHEDULER_ENV)
    if params.executor == "dask":
        return dask_map(params.scheduler_address, params.num_workers, "featurize", **setup)
    return ordered_map(params.num_workers, "featurize.num_workers", **setup)


def run(params: FeaturizeParams, manifest_dir: Path = MANIFEST_DIR, out_dir: Path = OUT_DIR,
        metrics_file: Path = METRICS_FILE) -> dict:
    torch.set_num_threads(params.num_threads)
    test_sets = read_test_set_names(manifest_dir)
    # Read a chunk at a time, never whole: a split's manifest is as long as the corpus.
    manifests = {name: manifest_dir / f"{name}.jsonl" for name in (*SPLITS, *test_sets)}
    precomputed = input_kind(manifests) == "features"
    if precomputed and params.augment.copies:
        raise StageError("featurize.augment.copies: augmentation works on audio; precomputed feature arrays "
                         "cannot be augmented (set copies: 0)")
    if precomputed:
        first = next(iter_manifest(manifests["train"]), None)
        dims = int(first.num_channels) if first else 0
        frame_rate = float(first.sample_rate) if first else 0.0
    else:
        config = params.logmel
        dims = params.n_mels
    store_dtype = np.float32 if precomputed else np.float16
    out_dir.mkdir(parents=True, exist_ok=True)
    rejects_file = out_dir / "rejects.jsonl"
    stats = RunningStats(dims)
    rejects: list[Reject] = []
    warnings: list[Reject] = []
    metrics: dict = {}
    # Results come back in manifest order, so the float64 sums of the statistics add up in the
    # same order, and to the same bits, whatever the number of workers.
    with file_map(params) as map_files:
        for split, manifest in manifests.items():
            augmenting = split == "train" and params.augment.copies > 0
            accepted = []  # (manifest position, row) of each utterance kept, when copies are made of them
            tally = Tally()
            paths = [utt.audio_path for utt in iter_manifest(manifest)]
            results = map_files(partial(extract, params=params, precomputed=precomputed, with_stats=split == "train"),
                                paths)
            with SplitWriter(out_dir / split, dims, store_dtype, int(params.shard_mb * 1e6)) as writer:
                for position, (utt, result) in enumerate(tqdm(zip(iter_manifest(manifest), results),
                                                              total=len(paths), desc=f"featurize {split}", unit="utt")):
                    try:
                        if isinstance(result, Rejected):
                            raise result
                        feats = result.frames
                        if precomputed and feats.shape[1] != dims:
                            raise Rejected("feature_dims_mismatch", f"{feats.shape[1]} dims, the corpus has {dims}")
                        if result.clipped_fraction >= params.clip_warn_fraction:
                            warnings.append(Reject(utt.id, split, utt.audio_path, utt.text, "clipped_audio",
                                                   f"{result.clipped_fraction:.2%} of samples at full scale (kept)"))
                    except Rejected as err:
                        rejects.append(Reject(utt.id, split, utt.audio_path, utt.text, err.reason, err.detail))
                        continue
                    if split == "train":
                        stats.add(result.sums)
                    row = {"id": utt.id, "speaker": utt.speaker, "duration": utt.duration,
                           "text_normalized": utt.text_normalized, "num_frames": len(feats)}
                    writer.add(row, feats)
                    tally.add(row)
                    if augmenting:
                        accepted.append((position, utt))
                if not tally.utterances:
                    tally_rejects(rejects, rejects_file, "rejected")
                    raise StageError(f"no utterance of split '{split}' could be featurized; see {rejects_file}")
                metrics[split] = tally.metrics()
                if augmenting:
                    copies = Tally()
                    for row, feats in augmented_copies(map_files, params, accepted):
                        writer.add(row, feats)
                        copies.add(row)
                    metrics["train_augmented"] = {"copies": params.augment.copies, **copies.metrics()}
    if test_sets:  # only then: a project without them keeps the metrics it had
        metrics["test_sets"] = {name: metrics.pop(name) for name in test_sets}

    mean, std = stats.mean_std()
    if precomputed:
        # train reads the frame layout from "logmel": dims, and one frame per 1/frame_rate seconds.
        info = {"input": "precomputed", "logmel": {"sample_rate": frame_rate, "hop_length": 1, "n_mels": dims},
                "normalize": params.normalize, "mean": mean.tolist(), "std": std.tolist()}
    else:
        info = {"logmel": config.to_dict(), "normalize": params.normalize, "mean": mean.tolist(), "std": std.tolist()}
    (out_dir / "features.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.copyfile(manifest_dir / TOKENS_FILE, out_dir / TOKENS_FILE)
    write_test_set_names(out_dir, test_sets)
    metrics["rejected"] = tally_rejects(rejects, rejects_file, "rejected")
    metrics["warnings"] = tally_rejects(warnings, out_dir / "warnings.jsonl", "kept with a warning")
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    fail_if_strict("featurize.strict", params.strict, metrics["rejected"], rejects_file)
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("featurize", FeaturizeParams, run, __doc__, argv)


if __name__ == "__main__":
    # As the module stages.featurize, not as __main__: Dask sends the mapped functions to its
    # workers by module and name, and a worker can import stages.featurize but not our __main__.
    from stages.featurize import main

    main()

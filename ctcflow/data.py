"""The feature store written by featurize, and batching for train and evaluate.

A split is `<split>.npy` (all frames of all utterances, float16, frames × n_mels; float32 for
precomputed features) and `<split>.csv` (id, speaker, duration, text_normalized, offset,
num_frames). `features.json` holds the log-mel settings (for precomputed features: `"input":
"precomputed"` and the frame layout), the training split's per-bin mean and std and the
normalization applied after them (`"normalize"`, see normalize_utterance);
`tokens.json` the label unit (see ctcflow.text.Tokenizer.load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from ctcflow.text import Tokenizer

INDEX_COLUMNS = ["id", "speaker", "duration", "text_normalized", "offset", "num_frames"]

# How features are normalized after the training split's per-bin mean and std (featurize.normalize).
Normalize = Literal["global", "utterance_mean", "utterance_mean_var"]
NORMALIZE_MODES = get_args(Normalize)
VARIANCE_FLOOR = 1e-8  # keeps a bin that never changes within an utterance (digital silence, one frame) finite


def write_split(directory: Path, split: str, index: pd.DataFrame, frames: list[np.ndarray], n_mels: int,
                dtype: type = np.float16) -> None:
    stacked = np.concatenate(frames) if frames else np.zeros((0, n_mels))
    np.save(directory / f"{split}.npy", stacked.astype(dtype, copy=False))
    index[INDEX_COLUMNS].to_csv(directory / f"{split}.csv", index=False)


def read_feature_info(directory: str | Path) -> dict:
    path = Path(directory) / "features.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run the featurize stage first)")
    return json.loads(path.read_text())


def normalization(info: dict) -> Normalize:
    """The normalization a features.json or a checkpoint records; those written before it was
    recorded used only the global mean and std."""
    return info.get("normalize", "global")


def normalize_utterance(feats: torch.Tensor, mode: Normalize) -> torch.Tensor:
    """(frames, dims) features, already normalized by the training statistics, normalized again by
    their own: global leaves them as they are; utterance_mean removes each bin's mean over the
    utterance (cepstral mean normalization: a fixed channel, a microphone's or a telephone's
    colouring, is a constant offset in log-mel); utterance_mean_var also scales each bin to unit
    variance over the utterance (the recording's level and dynamic range)."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {list(NORMALIZE_MODES)}, got {mode!r}")
    if mode == "global":
        return feats
    centred = feats - feats.mean(dim=0)
    if mode == "utterance_mean":
        return centred
    return centred / centred.square().mean(dim=0).clamp_min(VARIANCE_FLOOR).sqrt()


class FeatureSplit(Dataset):
    """Normalized features and token ids of one split, held in memory as float16 (float32 for
    precomputed features), normalized as features.json says when an utterance is read."""

    def __init__(self, directory: str | Path, split: str, tokenizer: Tokenizer):
        directory = Path(directory)
        info = read_feature_info(directory)
        self.mean = np.asarray(info["mean"], dtype=np.float32)
        self.std = np.asarray(info["std"], dtype=np.float32)
        self.normalize = normalization(info)
        self.index = pd.read_csv(directory / f"{split}.csv", dtype={"id": str, "speaker": str},
                                 keep_default_na=False)
        self.frames = np.load(directory / f"{split}.npy")
        self.tokens = [torch.tensor(tokenizer.encode(t), dtype=torch.long) for t in self.index["text_normalized"]]
        self.num_frames = self.index["num_frames"].to_numpy()
        self.offsets = self.index["offset"].to_numpy()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        start = self.offsets[i]
        feats = (self.frames[start : start + self.num_frames[i]].astype(np.float32) - self.mean) / self.std
        return normalize_utterance(torch.from_numpy(feats), self.normalize), self.tokens[i], i


@dataclass
class Batch:
    feats: torch.Tensor  # (batch, frames, n_mels), zero-padded
    lengths: torch.Tensor  # (batch,)
    targets: torch.Tensor  # all targets concatenated, as CTCLoss accepts
    target_lengths: torch.Tensor  # (batch,)
    indices: list[int]  # rows of the split's index

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """On `device`; non_blocking copies from pinned memory overlap with the work already queued there."""
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()), self.indices)

    def pin_memory(self) -> "Batch":
        """In page-locked memory, which a GPU copies from without a staging copy (DataLoader's pin_memory)."""
        return Batch(*(t.pin_memory() for t in self.tensors()), self.indices)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.feats, self.lengths, self.targets, self.target_lengths


def frame_mask(lengths: torch.Tensor, max_frames: int) -> torch.Tensor:
    """(batch, frames) True where a frame of a padded batch lies inside its utterance."""
    return torch.arange(max_frames, device=lengths.device)[None, :] < lengths[:, None]


def collate(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Batch:
    feats, tokens, indices = zip(*items)
    return Batch(
        feats=torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
        lengths=torch.tensor([len(f) for f in feats]),
        targets=torch.cat(tokens),
        target_lengths=torch.tensor([len(t) for t in tokens]),
        indices=list(indices),
    )


class LengthBatchSampler(Sampler[list[int]]):
    """Batches of utterances of similar length, each within a budget of padded frames.

    Written here because torch has no length-bucketing sampler and lhotse's is a large
    dependency for one class. Lengths get a little seeded noise each epoch so batch
    membership varies, and batch order is shuffled. An utterance longer than the budget
    gets a batch of its own rather than an error.
    `batches` holds the whole epoch; iterating yields them from `start` on (see set_epoch).
    """

    def __init__(self, lengths: np.ndarray, max_frames: int, shuffle: bool, seed: int = 0, min_batch: int = 1):
        self.lengths = np.asarray(lengths)
        self.max_frames = max_frames
        self.shuffle = shuffle
        self.seed = seed
        self.min_batch = min_batch  # a batch closes only once it holds this many utterances
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The batches of `epoch`, drawn from (seed, epoch) alone, iterated from the `start`-th (from
        0): a run resumed after `start` batches of the epoch neither replays nor skips any."""
        rng = np.random.default_rng([self.seed, epoch])
        keys = self.lengths * (1 + 0.1 * rng.random(len(self.lengths))) if self.shuffle else self.lengths
        batches, current, longest = [], [], 0
        for i in np.argsort(keys, kind="stable"):
            longest_with_i = max(longest, self.lengths[i])
            if len(current) >= self.min_batch and longest_with_i * (len(current) + 1) > self.max_frames:
                batches.append(current)
                current, longest_with_i = [], self.lengths[i]
            current.append(int(i))
            longest = longest_with_i
        if current and len(current) < self.min_batch and batches:
            batches[-1] += current  # too few for a batch of their own: join the one before
        elif current:
            batches.append(current)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        if not 0 <= start <= len(batches):
            raise ValueError(f"cannot start epoch {epoch} at batch {start}: it has {len(batches)} batches")
        self.batches, self.start = batches, start

    def __iter__(self):
        return iter(self.batches[self.start :])

    def __len__(self) -> int:
        return len(self.batches) - self.start


class DistributedLengthBatchSampler(LengthBatchSampler):
    """One process's share of the same length-bucketed batches, for distributed data parallel.

    Every rank builds the same global batches (same lengths, seed and epoch) within the global
    frame budget, then takes every `world_size`-th utterance of each in length order, so the
    shares have nearly equal padded sizes and every rank runs the same number of steps. A
    global batch holds at least `world_size` utterances (over the budget if need be), so no
    share is ever empty.
    `global_sizes[i]` is the number of utterances of the i-th global batch.
    """

    def __init__(self, lengths: np.ndarray, max_frames: int, shuffle: bool, seed: int, rank: int, world_size: int):
        if len(lengths) < world_size:
            raise ValueError(f"{len(lengths)} utterances cannot be shared out among {world_size} processes")
        self.rank, self.world_size = rank, world_size
        super().__init__(lengths, max_frames, shuffle, seed, min_batch=world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch, start)
        self.global_sizes = [len(batch) for batch in self.batches]
        self.batches = [sorted(batch, key=lambda i: self.lengths[i])[self.rank :: self.world_size]
                        for batch in self.batches]

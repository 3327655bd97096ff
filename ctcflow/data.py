"""The feature store written by featurize, and batching for train and evaluate.

Each split (train, valid, test and every extra test set) is a folder `<split>/` of the store:
`shard-00000.npy`, `shard-00001.npy`, … hold the frames of consecutive utterances (float16, frames ×
n_mels; float32 for precomputed features), and `index.csv` one row per utterance (id, speaker,
duration, text_normalized, shard, offset, num_frames: its frames are rows offset … offset +
num_frames - 1 of that shard). An utterance is never cut: a shard closes before the utterance that
would take it past its bound (featurize.shard_mb), and an utterance larger than the bound has a
shard of its own. featurize writes each shard as its utterances are computed (SplitWriter), so no
split is ever held in memory; readers memory-map the shards (FeatureSplit), so a process keeps
only the pages it reads, and the processes of one node share them in the page cache.
`features.json` holds the log-mel settings (for precomputed features: `"input": "precomputed"` and
the frame layout), the training split's per-bin mean and std and the normalization applied after
them (`"normalize"`, see normalize_utterance); `tokens.json` the label unit (see
ctcflow.text.Tokenizer.load).
"""

from __future__ import annotations

import csv
import json
import mmap
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from ctcflow.errors import CtcflowError
from ctcflow.text import Tokenizer

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ["id", "speaker", "duration", "text_normalized", "shard", "offset", "num_frames"]

# How features are normalized after the training split's per-bin mean and std (featurize.normalize).
Normalize = Literal["global", "utterance_mean", "utterance_mean_var"]
NORMALIZE_MODES = get_args(Normalize)
VARIANCE_FLOOR = 1e-8  # keeps a bin that never changes within an utterance (digital silence, one frame) finite


class EmptySplitError(CtcflowError):
    """A split of the feature store with no utterance in it: featurize never writes one."""


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.npy"


def read_index(folder: Path) -> pd.DataFrame:
    path = folder / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run the featurize stage first)")
    # Strings all: a transcript of digits ("01") or a numeric id must not come back as a number.
    return pd.read_csv(path, dtype={"id": str, "speaker": str, "text_normalized": str}, keep_default_na=False)


class MappedShard:
    """One shard memory-mapped read-only: `frames` is a view of the file."""

    def __init__(self, path: Path):
        with path.open("rb") as file:
            major, _ = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(file)
            data_start = file.tell()
            self.pages = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)  # the mapping outlives the file object
        self.frames = np.frombuffer(self.pages, dtype, count=shape[0] * shape[1], offset=data_start).reshape(shape)

    def release(self) -> None:
        """Hands the pages this process has read back (madvise MADV_DONTNEED): they leave its RSS
        but stay in the kernel's page cache, shared by the node's processes, and a later read maps
        them again without touching the disk."""
        self.pages.madvise(mmap.MADV_DONTNEED)


def map_shards(folder: Path, index: pd.DataFrame) -> list[MappedShard]:
    """The shards the index names, memory-mapped read-only, in order."""
    return [MappedShard(shard_path(folder, k)) for k in range(int(index["shard"].max()) + 1)]


class SplitWriter:
    """Writes one split of the store, utterance by utterance, in the order given.

    Frames go straight to the open shard's file; its .npy header, which holds the number of
    frames, is written again when the shard closes. numpy leaves room in the header for that
    number to grow, so the header keeps its length and the file reads as np.save would write it.
    Use as a context manager: leaving it closes the last shard and the index.
    """

    def __init__(self, folder: Path, dims: int, dtype: np.dtype | type, shard_bytes: int):
        shutil.rmtree(folder, ignore_errors=True)  # a previous run's shards, which may outnumber this one's
        folder.mkdir(parents=True)
        self.folder, self.dims, self.dtype = folder, dims, np.dtype(dtype)
        self.shard_frames = max(1, shard_bytes // (dims * self.dtype.itemsize))  # the bound, in frames
        self.index_file = (folder / INDEX_FILE).open("w", newline="")
        self.index = csv.writer(self.index_file, lineterminator="\n")
        self.index.writerow(INDEX_COLUMNS)
        # The open shard, the frames written to it, its file and where its frames start in it.
        self.shard, self.frames, self.file, self.data_start = -1, 0, None, 0

    def add(self, row: dict, frames: np.ndarray) -> None:
        """One utterance: its index row (id, speaker, duration, text_normalized) and frames × dims."""
        if frames.ndim != 2 or frames.shape[1] != self.dims:
            raise ValueError(f"{row['id']}: frames of shape {frames.shape}, the store holds {self.dims} dims")
        if self.file is None or (self.frames and self.frames + len(frames) > self.shard_frames):
            self._close_shard()
            self.shard, self.frames = self.shard + 1, 0
            self.file = shard_path(self.folder, self.shard).open("wb")
            self.data_start = self._write_header()
        self.index.writerow([row["id"], row["speaker"], row["duration"], row["text_normalized"], self.shard,
                             self.frames, len(frames)])
        self.file.write(np.ascontiguousarray(frames, dtype=self.dtype).tobytes())
        self.frames += len(frames)

    def _write_header(self) -> int:
        """Writes the header at the file's position; returns where the frames start."""
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": (self.frames, self.dims)})
        return self.file.tell()

    def _close_shard(self) -> None:
        if self.file is None:
            return
        self.file.seek(0)
        if self._write_header() != self.data_start:  # would overwrite frames: numpy no longer pads its headers
            raise RuntimeError(f"the .npy header of {self.file.name} changed length when its frame count was written")
        self.file.close()

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._close_shard()
        self.index_file.close()


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
    """Normalized features and token ids of one split, read from the memory-mapped shards as stored
    (float16; float32 for precomputed features), normalized as features.json says when an utterance
    is read. The token ids of all transcripts are one array, encoded once (an error names a text
    outside the label unit before any work). Pickled (for DataLoader workers), it carries the
    paths, not the frames: each process maps the shards itself."""

    def __init__(self, directory: str | Path, split: str, tokenizer: Tokenizer):
        directory = Path(directory)
        info = read_feature_info(directory)
        self.mean = np.asarray(info["mean"], dtype=np.float32)
        self.std = np.asarray(info["std"], dtype=np.float32)
        self.normalize = normalization(info)
        self.folder = directory / split
        self.index = read_index(self.folder)
        if self.index.empty:
            raise EmptySplitError(f"{self.folder / INDEX_FILE} lists no utterances (run the featurize stage again)")
        self.num_frames = self.index["num_frames"].to_numpy()
        self.shard = self.index["shard"].to_numpy()
        self.offsets = self.index["offset"].to_numpy()
        token_ids, self.token_bounds = array("i"), array("q", [0])  # 4 bytes a token, no object per utterance
        for text in self.index["text_normalized"]:
            token_ids.extend(tokenizer.encode(text))
            self.token_bounds.append(len(token_ids))
        self.token_ids = np.frombuffer(token_ids, dtype=np.int32)
        self.shards = map_shards(self.folder, self.index)
        # A read page stays in the process's RSS while mapped, so an epoch would grow every process
        # to the split's size: after this many bytes of the shards read, their pages are handed back.
        self.release_every_bytes, self.read_since_release = 32 << 20, 0

    def ctc_frames_needed(self) -> np.ndarray:
        """Per utterance, the fewest output frames CTC can align its transcript to: one per unit, plus
        a blank between two equal units."""
        needed = np.diff(np.asarray(self.token_bounds))
        repeats = np.zeros(len(self), dtype=np.int64)
        same = np.flatnonzero(self.token_ids[1:] == self.token_ids[:-1])  # pairs (k, k + 1) of equal tokens
        within = np.searchsorted(self.token_bounds, same, side="right") - 1  # the utterance token k is in
        inside = same + 1 < np.asarray(self.token_bounds)[within + 1]  # token k + 1 in the same utterance
        np.add.at(repeats, within[inside], 1)
        return needed + repeats

    def __getstate__(self) -> dict:
        return {**self.__dict__, "shards": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.shards = map_shards(self.folder, self.index)

    def __len__(self) -> int:
        return len(self.index)

    def stored(self, i: int) -> np.ndarray:
        """Utterance i's frames as stored (a read-only view of its shard)."""
        start = self.offsets[i]
        return self.shards[self.shard[i]].frames[start : start + self.num_frames[i]]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        stored = self.stored(i)
        feats = (stored.astype(np.float32) - self.mean) / self.std  # a copy: the mapped pages can go
        self.read_since_release += stored.nbytes
        if self.read_since_release >= self.release_every_bytes:
            for shard in self.shards:
                shard.release()
            self.read_since_release = 0
        tokens = torch.from_numpy(self.token_ids[self.token_bounds[i] : self.token_bounds[i + 1]]).long()
        return normalize_utterance(torch.from_numpy(feats), self.normalize), tokens, i


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

"""The sharded feature store: shards of bounded size, memory-mapped reads, the same bytes from any number of workers."""

from __future__ import annotations

import contextlib
import io
import mmap
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import section, tiny_tokenizer
from ctcflow.data import FeatureSplit, SplitWriter, map_shards, read_index, shard_path
from ctcflow import manifest
from ctcflow.manifest import iter_manifest, read_manifest
from stages import featurize

DIMS = 4  # float16: 8 bytes a frame


def utterance(n: int, value: float) -> np.ndarray:
    return np.full((n, DIMS), value, dtype=np.float16)


def test_a_shard_closes_before_the_utterance_that_would_pass_the_bound(tmp_path):
    lengths = [100, 100, 100, 300, 50, 150]
    # 1,600 bytes = 200 frames: 100 + 100 fill shard 0; the third utterance starts shard 1; 300 frames
    # are over the bound, a shard of their own; 50 + 150 fill shard 3 exactly.
    with SplitWriter(tmp_path / "train", DIMS, np.float16, shard_bytes=1600) as writer:
        for i, n in enumerate(lengths):
            writer.add({"id": f"u{i}", "speaker": "s", "duration": n / 100, "text_normalized": "a b"},
                       utterance(n, i))
    index = read_index(tmp_path / "train")
    assert index["shard"].tolist() == [0, 0, 1, 2, 3, 3]
    assert index["offset"].tolist() == [0, 100, 0, 0, 0, 50]
    assert index["num_frames"].tolist() == lengths
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "index.csv", "shard-00000.npy", "shard-00001.npy", "shard-00002.npy", "shard-00003.npy"]
    # Each shard holds the bytes np.save writes for its frames: the header was rewritten in place.
    expected = [[0, 1], [2], [3], [4, 5]]
    for shard, members in enumerate(expected):
        saved = io.BytesIO()
        np.save(saved, np.concatenate([utterance(lengths[i], i) for i in members]))
        assert shard_path(tmp_path / "train", shard).read_bytes() == saved.getvalue()


def test_frames_of_the_wrong_width_are_refused(tmp_path):
    with SplitWriter(tmp_path / "train", DIMS, np.float16, shard_bytes=1600) as writer:
        with pytest.raises(ValueError, match="u0: frames of shape \\(3, 5\\), the store holds 4 dims"):
            writer.add({"id": "u0", "speaker": "s", "duration": 0.03, "text_normalized": "a"},
                       np.zeros((3, 5), dtype=np.float16))


def test_a_new_run_leaves_no_shard_of_the_previous_one(tmp_path):
    for n_utterances in (3, 1):
        with SplitWriter(tmp_path / "train", DIMS, np.float16, shard_bytes=800) as writer:  # 100 frames a shard
            for i in range(n_utterances):
                writer.add({"id": f"u{i}", "speaker": "s", "duration": 1.0, "text_normalized": "a"}, utterance(100, i))
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["index.csv", "shard-00000.npy"]


@pytest.fixture(scope="module")
def small_shards(tiny_pipeline, tmp_path_factory) -> dict[int, Path]:
    """The tiny project's features again, in shards of 50 kB (about 300 frames), by 1 and by 2 workers."""
    out = tmp_path_factory.mktemp("small_shards")
    stores = {}
    with contextlib.chdir(tiny_pipeline):  # the manifests name the audio relative to the project
        for workers in (1, 2):
            stores[workers] = out / f"workers{workers}"
            featurize.run(section("featurize", featurize.FeaturizeParams, shard_mb=0.05, num_workers=workers),
                          manifest_dir=tiny_pipeline / "data/manifests", out_dir=stores[workers] / "features",
                          metrics_file=stores[workers] / "featurize.json")
    return stores


def test_one_and_two_workers_write_the_same_shards(small_shards):
    files = {workers: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
             for workers, root in small_shards.items()}
    assert len([p for p in files[1] if p.name.startswith("shard-")]) > 3  # several shards per split
    assert files[2] == files[1]


def test_shards_are_filled_up_to_the_bound_and_no_further(small_shards):
    bound = int(0.05e6) // (80 * 2)  # frames of 80 float16 log-mel bins in 50 kB
    for split in ("train", "valid", "test"):
        index = read_index(small_shards[1] / "features" / split)
        shards = index.groupby("shard")["num_frames"]
        sizes, firsts = shards.sum().tolist(), shards.first().tolist()
        assert all(size <= bound or count == 1 for size, count in zip(sizes, shards.count()))
        # Greedy: a shard closed only because its next utterance did not fit.
        assert all(size + first > bound for size, first in zip(sizes, firsts[1:]))
        assert [len(s.frames) for s in map_shards(small_shards[1] / "features" / split, index)] == sizes


def test_memory_mapped_reads_equal_the_features_computed_directly(tiny_pipeline, small_shards):
    params = section("featurize", featurize.FeaturizeParams)
    manifest = read_manifest(tiny_pipeline / "data/manifests/test.jsonl").set_index("id")
    split = FeatureSplit(small_shards[1] / "features", "test", tiny_tokenizer())
    assert all(isinstance(shard.pages, mmap.mmap) for shard in split.shards)
    assert split.index["shard"].nunique() > 1
    for i, utt_id in enumerate(split.index["id"]):
        direct = featurize.extract(str(tiny_pipeline / manifest.loc[utt_id, "audio_path"]), params,
                                   precomputed=False, with_stats=False)
        assert np.array_equal(split.stored(i), direct.frames)


def test_utterances_read_the_same_across_shard_boundaries(tiny_pipeline, small_shards):
    one_shard = FeatureSplit(tiny_pipeline / "data/features", "train", tiny_tokenizer())
    many = FeatureSplit(small_shards[1] / "features", "train", tiny_tokenizer())
    assert one_shard.index["shard"].nunique() == 1 and many.index["shard"].nunique() > 3
    for i in range(len(one_shard)):
        (feats_a, tokens_a, _), (feats_b, tokens_b, _) = one_shard[i], many[i]
        assert torch.equal(feats_a, feats_b) and torch.equal(tokens_a, tokens_b)
        assert tokens_a.dtype == torch.long
        assert tokens_a.tolist() == tiny_tokenizer().encode(one_shard.index["text_normalized"].iloc[i])


def resident_kib(paths: set[str]) -> int:
    """Resident KiB of this process's mappings of these files (/proc/self/smaps)."""
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:  # a mapping's first line: range, perms, ..., path
            counting = len(fields) >= 6 and fields[5] in paths
        elif counting and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_reads_hand_the_shard_pages_back(tiny_pipeline):
    # Read pages would stay in RSS while mapped, so RSS would grow to the split's size.
    split = FeatureSplit(tiny_pipeline / "data/features", "train", tiny_tokenizer())
    shard = str(shard_path(split.folder, 0))
    assert len(split.shards) == 1 and split.shards[0].frames.nbytes > 1_000_000
    for i in range(len(split)):
        split.stored(i).tobytes()  # reads every page and leaves it mapped
    assert resident_kib({shard}) > 1_000_000 // 1024
    for i in range(len(split) - 1):  # the default: hand them back after 32 MiB read
        split[i]
    assert resident_kib({shard}) > 1_000_000 // 1024
    split.release_every_bytes = 1
    split[len(split) - 1]
    assert resident_kib({shard}) == 0


def test_a_pickled_split_maps_its_shards_again(small_shards):
    split = FeatureSplit(small_shards[1] / "features", "train", tiny_tokenizer())
    pickled = pickle.dumps(split)
    assert len(pickled) < sum(shard.frames.nbytes for shard in split.shards) / 10  # the paths, not the frames
    copy = pickle.loads(pickled)
    assert all(isinstance(shard.pages, mmap.mmap) for shard in copy.shards)
    assert all(torch.equal(copy[i][0], split[i][0]) for i in range(len(split)))


def test_a_manifest_read_a_chunk_at_a_time_gives_the_rows_read_whole(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(manifest, "CHUNK_ROWS", 7)  # 30 training rows: chunks of 7, 7, 7, 7 and 2
    path = tiny_pipeline / "data/manifests/train.jsonl"
    rows = list(iter_manifest(path))
    assert len(rows) == 30
    assert rows == list(read_manifest(path).itertuples(index=False))

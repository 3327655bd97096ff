"""Augmented copies of the training split (featurize.augment) on the tiny project."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_python, section
from stages import featurize
from stages.runner import StageError



def featurize_tiny(root: Path, out: Path, **overrides) -> dict[str, bytes]:
    """The featurize stage on the tiny project's manifests with these settings: its files' bytes
    (and the metrics, under "metrics")."""
    params = section("featurize", featurize.FeaturizeParams, **overrides)
    featurize.run(params, manifest_dir=root / "data/manifests", out_dir=out / "features",
                  metrics_file=out / "featurize.json")
    return {**store_files(out / "features"), "metrics": (out / "featurize.json").read_bytes()}


def store_files(features: Path) -> dict[str, bytes]:
    """features.json and every file of the three splits (index and shards), by path in the store."""
    paths = [features / "features.json", *(p for split in ("train", "valid", "test")
                                           for p in sorted((features / split).iterdir()))]
    return {str(p.relative_to(features)): p.read_bytes() for p in paths}


def index(files: dict[str, bytes], split: str) -> pd.DataFrame:
    return pd.read_csv(BytesIO(files[f"{split}/index.csv"]), dtype={"id": str, "speaker": str}, keep_default_na=False)


def utterances(files: dict[str, bytes], split: str) -> Iterator[np.ndarray]:
    """Each utterance's stored frames, in index order."""
    shards = {}
    for row in index(files, split).itertuples():
        shards.setdefault(row.shard, np.load(BytesIO(files[f"{split}/shard-{row.shard:05d}.npy"])))
        yield shards[row.shard][row.offset : row.offset + row.num_frames]


@pytest.fixture(scope="module")
def two_copies(tiny_pipeline, tmp_path_factory) -> dict[str, bytes]:
    """copies: 2 with params.yaml's augmentation settings, one worker (run from the project root:
    the manifests name the audio relative to it)."""
    with contextlib.chdir(tiny_pipeline):
        return featurize_tiny(tiny_pipeline, tmp_path_factory.mktemp("copies2"), augment={"copies": 2})


def stage_files(root: Path) -> dict[str, bytes]:
    return {**store_files(root / "data/features"), "metrics": (root / "metrics/featurize.json").read_bytes()}


def test_two_copies_add_two_augmented_versions_of_every_training_utterance(tiny_pipeline, two_copies):
    clean = stage_files(tiny_pipeline)  # the pipeline's run: copies 0
    originals, augmented = index(clean, "train"), index(two_copies, "train")
    assert len(augmented) == 3 * len(originals) == 90
    expected_ids = [*originals["id"], *(originals["id"] + "_aug1"), *(originals["id"] + "_aug2")]
    assert augmented["id"].tolist() == expected_ids
    for column in ("speaker", "text_normalized"):
        assert augmented[column].tolist() == originals[column].tolist() * 3
    # The originals come first, as they are: the clean split's rows and frames, byte for byte.
    pd.testing.assert_frame_equal(augmented.iloc[:30], originals)
    store = list(utterances(two_copies, "train"))
    assert all(np.array_equal(a, b) for a, b in zip(store[:30], utterances(clean, "train")))
    assert [len(u) for u in store] == augmented["num_frames"].tolist()
    # Each copy is its own: no two versions of an utterance hold the same frames.
    for i in range(30):
        versions = [store[i], store[i + 30], store[i + 60]]
        assert all(a.shape != b.shape or not np.array_equal(a, b) for a, b in
                   [(versions[0], versions[1]), (versions[0], versions[2]), (versions[1], versions[2])])
    # Speed perturbation: a copy's duration is its own, and its frames follow it (10 ms hop, centred frames).
    copies = augmented.iloc[30:]
    assert (copies["duration"] != originals["duration"].tolist() * 2).any()
    assert np.abs(copies["num_frames"] - (copies["duration"] * 100 + 1)).max() <= 1


def test_two_copies_leave_valid_test_and_the_statistics_as_they_were(tiny_pipeline, two_copies):
    clean = stage_files(tiny_pipeline)
    for name in ("valid/index.csv", "valid/shard-00000.npy", "test/index.csv", "test/shard-00000.npy",
                 "features.json"):
        assert two_copies[name] == clean[name], name
    metrics, clean_metrics = json.loads(two_copies["metrics"]), json.loads(clean["metrics"])
    assert metrics["train"] == clean_metrics["train"]  # the clean utterances
    augmented = index(two_copies, "train").iloc[30:]
    assert metrics["train_augmented"] == {"copies": 2, "utterances": 60, "frames": int(augmented["num_frames"].sum()),
                                          "hours": round(augmented["duration"].sum() / 3600, 4)}


def test_copies_are_a_function_of_the_seed_not_of_the_workers(tiny_pipeline, two_copies, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_pipeline)
    assert featurize_tiny(tiny_pipeline, tmp_path / "w2", augment={"copies": 2}, num_workers=2) == two_copies
    other_seed = featurize_tiny(tiny_pipeline, tmp_path / "seed1", augment={"copies": 2, "seed": 1})
    assert index(other_seed, "train")["id"].tolist() == index(two_copies, "train")["id"].tolist()
    pairs = list(zip(utterances(other_seed, "train"), utterances(two_copies, "train")))
    assert all(np.array_equal(a, b) for a, b in pairs[:30])  # the clean utterances
    assert not any(a.shape == b.shape and np.array_equal(a, b) for a, b in pairs[30:])


def test_copies_need_audio(tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    np.save(tmp_path / "a.npy", np.zeros((10, 4), dtype=np.float32))
    row = {"id": "a", "audio_path": str(tmp_path / "a.npy"), "duration": 0.4, "sample_rate": 25.0, "num_channels": 4,
           "text": "a", "text_normalized": "a", "speaker": "s"}
    for split in ("train", "valid", "test"):
        (manifests / f"{split}.jsonl").write_text(json.dumps({**row, "split": split}) + "\n")
    with pytest.raises(StageError, match="precomputed feature arrays cannot be augmented"):
        featurize.run(section("featurize", featurize.FeaturizeParams, augment={"copies": 1}), manifest_dir=manifests,
                      out_dir=tmp_path / "features", metrics_file=tmp_path / "featurize.json")


def test_augment_settings_are_checked_before_any_work():
    with pytest.raises(ValueError, match="speed.factor"):
        section("featurize", featurize.FeaturizeParams, augment={"speed": {"factor": [0.9]}})
    with pytest.raises(ValueError, match="violet"):
        section("featurize", featurize.FeaturizeParams, augment={"noise": {"kinds": ["violet"]}})
    with pytest.raises(ValueError, match="copies"):
        section("featurize", featurize.FeaturizeParams, augment={"copies": -1})
    with pytest.raises(ValueError, match=r"augment.noise\n.*prob must be between 0 and 1, got 1.5"):
        section("featurize", featurize.FeaturizeParams, augment={"noise": {"prob": 1.5}})
    with pytest.raises(ValueError, match=r"augment.reverb\n.*rt60 is a \(low, high\) range, got \[0.8, 0.2\]"):
        section("featurize", featurize.FeaturizeParams, augment={"reverb": {"rt60": [0.8, 0.2]}})


def test_augment_benchmark_times_the_stages_functions(tiny_pipeline, tmp_path):
    out = tmp_path / "augment.json"
    run_python([str(REPO / "benchmarks/augment.py"), "--project-dir", str(tiny_pipeline), "--quick", "--stage",
                "--out", str(out)], REPO)
    results = json.loads(out.read_text())
    assert results["utterances"] == 30 and results["breakdown_utterances"] == 10
    per_epoch = results["per_epoch_of_the_split"]
    assert per_epoch["read + augment + log-mel"]["cpu_s"] > per_epoch["read + log-mel"]["cpu_s"] >= 0
    assert set(results["augment_cpu_s_per_epoch_by_effect"]) == {"speed", "pitch", "reverb", "white", "pink", "brown",
                                                                 "babble", "channel"}
    # Speed factors 0.9, 1.0 and 1.1 leave the total length about where it was.
    assert results["featurize_stage"]["training_frames_added_per_copy"] == pytest.approx(1.0, abs=0.1)
    assert results["train_epoch_seconds"]["epochs"] == 1  # the tiny project trains one epoch

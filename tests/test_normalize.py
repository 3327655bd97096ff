"""Per-utterance normalization (featurize.normalize) on arrays whose results are worked out by hand."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import section, tiny_tokenizer
from ctcflow.data import FeatureSplit, SplitWriter, normalization, normalize_utterance
from stages.featurize import FeaturizeParams

R = 3 / math.sqrt(6)  # ±3 around a mean, over three frames: variance (9 + 0 + 9) / 3 = 6

# Three frames, two bins: the first rises by 3 per frame, the second never changes.
FRAMES = torch.tensor([[0.0, 10.0], [3.0, 10.0], [6.0, 10.0]])


@pytest.mark.parametrize(("mode", "expected"), [
    ("global", [[0.0, 10.0], [3.0, 10.0], [6.0, 10.0]]),
    ("utterance_mean", [[-3.0, 0.0], [0.0, 0.0], [3.0, 0.0]]),  # bin means 3 and 10 removed
    # The constant bin has no variance: it stays 0 (floored, no division by zero).
    ("utterance_mean_var", [[-R, 0.0], [0.0, 0.0], [R, 0.0]]),
])
def test_each_mode_on_a_small_array(mode, expected):
    torch.testing.assert_close(normalize_utterance(FRAMES, mode), torch.tensor(expected))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="cepstral"):
        normalize_utterance(FRAMES, "cepstral")


def store(directory, **info) -> FeatureSplit:
    """One utterance of three frames: bins stored as 1, 5, 9 and 4, 8, 12, training mean (1, 0), std (2, 1)."""
    directory.mkdir()
    frames = np.array([[1, 4], [5, 8], [9, 12]], dtype=np.float16)
    with SplitWriter(directory / "test", 2, np.float16, shard_bytes=1000) as writer:
        writer.add({"id": "u", "speaker": "s", "duration": 0.03, "text_normalized": "a"}, frames)
    (directory / "features.json").write_text(json.dumps({"mean": [1.0, 0.0], "std": [2.0, 1.0], **info}))
    return FeatureSplit(directory, "test", tiny_tokenizer())


@pytest.mark.parametrize(("info", "expected"), [
    ({}, [[0.0, 4.0], [2.0, 8.0], [4.0, 12.0]]),  # a features.json from before the key: global
    ({"normalize": "global"}, [[0.0, 4.0], [2.0, 8.0], [4.0, 12.0]]),  # (x - mean) / std
    ({"normalize": "utterance_mean"}, [[-2.0, -4.0], [0.0, 0.0], [2.0, 4.0]]),  # then minus 2 and 8
    # Then over sqrt(8/3) and sqrt(32/3): both bins end at the same ±sqrt(3/2).
    ({"normalize": "utterance_mean_var"}, [[-1.5**0.5, -1.5**0.5], [0.0, 0.0], [1.5**0.5, 1.5**0.5]]),
])
def test_feature_split_applies_features_json_normalization_after_the_training_statistics(tmp_path, info, expected):
    split = store(tmp_path / "features", **info)
    feats, _, _ = split[0]
    torch.testing.assert_close(feats, torch.tensor(expected))


def test_a_record_without_the_key_means_global():
    assert normalization({"mean": [0.0]}) == "global"
    assert normalization({"normalize": "utterance_mean"}) == "utterance_mean"


def test_featurize_accepts_only_the_three_modes():
    assert section("featurize", FeaturizeParams, normalize="utterance_mean_var").normalize == "utterance_mean_var"
    with pytest.raises(ValueError, match="normalize"):
        section("featurize", FeaturizeParams, normalize="per_speaker")

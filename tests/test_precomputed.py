"""Beyond speech: precomputed per-frame features labelled with glosses, through the real stages.

A synthetic stand-in for sign-language video features: each gloss has its own prototype
vector, an utterance is a few glosses held for a few frames each with noise and transitions,
stored as frames × dims .npy arrays at 25 frames per second.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_project, merge, section, tiny_params
from ctcflow.checkpoint import load_checkpoint
from ctcflow.data import read_feature_info, read_index, shard_path
from stages.runner import StageError
from stages import evaluate, featurize, manifest, plots, train

GLOSSES = ["TOMORROW", "RAIN", "NORTH", "SUN", "WIND", "COLD"]
DIMS = 12


def make_sign_corpus(root: Path, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(0, 1, (len(GLOSSES), DIMS)) * 3 + 100  # far from zero: stored in float32
    rows = []
    for signer in range(10):
        for n in range(10):
            glosses = [int(rng.integers(len(GLOSSES)))]
            while len(glosses) < rng.integers(2, 5):
                glosses.append(int((glosses[-1] + rng.integers(1, len(GLOSSES))) % len(GLOSSES)))
            frames = [np.linspace(prototypes[glosses[0]] * 0 + 100, prototypes[glosses[0]], 3)]
            for a, b in zip(glosses, glosses[1:] + [None]):
                frames.append(np.repeat(prototypes[a][None], rng.integers(6, 10), axis=0))
                if b is not None:
                    frames.append(np.linspace(prototypes[a], prototypes[b], 3))
            array = np.concatenate(frames) + rng.normal(0, 0.3, (sum(len(f) for f in frames), DIMS))
            path = Path("signer {:02d}".format(signer)) / f"{n}.npy"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / path, array.astype(np.float32))
            rows.append({"path": str(path), "gloss": " ".join(GLOSSES[g] for g in glosses), "signer": f"s{signer}"})
    # Its own file: the same file under a second id would be rejected as duplicate_audio first.
    np.save(root / "hail.npy", np.load(root / "signer 00/0.npy"))
    rows.append({"path": "hail.npy", "gloss": "TOMORROW HAIL", "signer": "s0", "uid": "hail"})
    np.save(root / "wide.npy", np.zeros((40, DIMS + 1), dtype=np.float32))
    rows.append({"path": "wide.npy", "gloss": "SUN", "signer": "s0", "uid": "wide"})
    frame = pd.DataFrame(rows)
    frame["uid"] = frame["uid"].fillna(frame["path"].str.replace("/", "_").str.removesuffix(".npy"))
    frame.to_csv(root / "glosses.csv", index=False)
    (root / "vocabulary.txt").write_text("\n".join(GLOSSES) + "\n")
    return rows


SIGN_PARAMS = {
    "manifest": {"source": "table", "corpus_dir": "data/signs", "table": "data/signs/glosses.csv",
                 "columns": {"path": "path", "text": "gloss", "speaker": "signer", "id": "uid"},
                 "input": "features", "feature_frame_rate": 25.0, "units": "word",
                 "vocabulary": "data/signs/vocabulary.txt", "ctc_frame_rate": 8.0,
                 "valid_fraction": 0.1, "test_fraction": 0.1},
    "train": {"epochs": 8, "num_threads": 1, "batch_frames": 400, "lr": 0.005, "ctc": {"blank": "last"},
              "specaugment": {"freq_mask": 2, "time_mask": 3}},
    # The beam search's lexicon spells words in characters: gloss units are scored greedily.
    "evaluate": {"decoder": "greedy"},
}


@pytest.fixture(scope="module")
def sign_project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("signs"), merge(tiny_params(), SIGN_PARAMS))
    make_sign_corpus(root / "data" / "signs")
    with contextlib.chdir(root):
        for stage in (manifest, featurize, train, evaluate, plots):
            stage.main(["--params", "params.yaml"])
    return root


def test_gloss_manifest_and_features(sign_project):
    m = json.loads((sign_project / "metrics/manifest.json").read_text())
    assert {s: (m[s]["utterances"], m[s]["speakers"]) for s in ("train", "valid", "test")} == \
        {"train": (80, 8), "valid": (10, 1), "test": (10, 1)}  # signers kept apart
    assert m["rejected"] == {"total": 2, "words_outside_vocabulary": 1, "feature_dims_mismatch": 1}
    units = json.loads((sign_project / "data/features/tokens.json").read_text())
    assert units == {"unit": "word", "alphabet": [g.lower() for g in GLOSSES]}
    info = read_feature_info(sign_project / "data/features")
    assert info["input"] == "precomputed" and info["logmel"] == {"sample_rate": 25.0, "hop_length": 1, "n_mels": DIMS}
    train = sign_project / "data/features/train"
    stored = np.concatenate([np.load(p) for p in sorted(train.glob("shard-*.npy"))])
    assert stored.dtype == np.float32 and stored.shape[1] == DIMS
    assert np.allclose(info["mean"], stored.mean(axis=0), atol=1e-3)  # only normalized, never transformed
    first = read_index(train).iloc[0]
    source = np.load(sign_project / "data/signs" / (first.id.replace("_", "/", 1) + ".npy"))
    assert np.array_equal(np.load(shard_path(train, first.shard))[first.offset: first.offset + first.num_frames], source)


def test_gloss_model_trains_and_is_scored_by_glosses(sign_project):
    checkpoint = load_checkpoint(sign_project / "models/best.pt")
    assert checkpoint["tokenizer"] == {"unit": "word", "alphabet": [g.lower() for g in GLOSSES], "blank": 6}
    assert checkpoint["n_mels"] == DIMS
    metrics = json.loads((sign_project / "metrics/eval.json").read_text())
    assert metrics["utterances"] == 10
    table = pd.read_csv(sign_project / "reports/eval/utterances.csv", keep_default_na=False)
    vocabulary = {g.lower() for g in GLOSSES}
    assert all(set(h.split()) <= vocabulary for h in table["hypothesis"])
    # WER counts glosses: errors over the number of reference glosses.
    assert table["word_errors"].sum() / table["words"].sum() == pytest.approx(metrics["wer"])
    assert table["words"].sum() == sum(len(r.split()) for r in table["reference"])
    # The glosses are separable: eight short epochs learn most of them (valid WER 0 by epoch 7 here).
    assert metrics["wer"] < 0.5
    for name in ("loss", "error_rates", "blank_ratio"):
        assert (sign_project / "plots" / f"{name}.png").is_file()


def test_a_blank_index_outside_the_vocabulary_is_a_clear_error(sign_project, tmp_path):
    with pytest.raises(StageError, match=r"train.ctc.blank 28 .*outside 0…6 for 6 word units"):
        train.run(section("train", train.TrainParams), features_dir=sign_project / "data/features",
                  model_dir=tmp_path / "m", live_dir=tmp_path / "live")

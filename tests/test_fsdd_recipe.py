"""Real speech through real DVC: the FSDD recipe, and an extra test set that must not retrain.

One throwaway git + DVC repo of the tiny project serves the tests below, in order. The recipe
(recipes/fsdd) runs on 40 FSDD recordings and 17 espeak utterances, tiny params, one epoch; its
train stage starts from the demo model, so `dvc repro recipes/fsdd/dvc.yaml` builds the tiny demo
pipeline first. The demo pipeline then gets a 6-file FSDD test set: manifest, featurize, evaluate
and plots rerun, train not.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import FSDD, REPO, dvc, git, make_dvc_repo, merge
from ctcflow.params import flatten

SPEAKERS = ("george", "jackson", "lucas", "nicolas")
RECIPE = "recipes/fsdd/dvc.yaml"
RECIPE_STAGES = ["synth", "manifest", "featurize", "train", "lm", "evaluate", "plots"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# The tiny demo model's shape (tests/conftest.py), so the recipe can start from it; one epoch.
TINY_RECIPE = {
    # 5 voices: 3 say a digit string and 12 single digits between them, 2 held out by synth say one string each.
    "synth": {"num_workers": 1, "splits": {"train": {"utterances": 3, "speakers": 3, "word_lists": 12},
                                           "valid": {"utterances": 1, "speakers": 1, "word_lists": 0},
                                           "test": {"utterances": 1, "speakers": 1, "word_lists": 0}}},
    "manifest": {"num_workers": 1},
    "featurize": {"num_workers": 1},
    "train": {"epochs": 1, "warmup_steps": 0, "model": {"hidden_size": 32, "num_layers": 1, "conv_channels": 32}},
    "evaluate": {"num_examples": 2},
}


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    if not FSDD.is_dir():
        pytest.skip(f"no FSDD recordings at {FSDD} (set CTCFLOW_FSDD_RECORDINGS)")
    root = make_dvc_repo(tmp_path_factory.mktemp("fsdd"))
    shutil.copytree(REPO / "recipes", root / "recipes", ignore=shutil.ignore_patterns("__pycache__"))
    recipe = root / "recipes/fsdd"
    params = merge(yaml.safe_load((recipe / "params.yaml").read_text()), TINY_RECIPE)
    (recipe / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    corpus = recipe / params["manifest"]["corpus_dir"]
    corpus.mkdir(parents=True)
    for speaker in SPEAKERS:  # every digit once from each speaker
        for digit in range(10):
            shutil.copy(FSDD / f"{digit}_{speaker}_0.wav", corpus)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "the FSDD recipe on 40 recordings", cwd=root)
    # The recipe's commands run in recipes/fsdd: this makes `python -m stages.X` import this repo's code.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(root))
        yield root


def test_the_recipe_builds_the_demo_model_first_and_fine_tunes_it(repo):
    ran = stages_run(dvc("repro", RECIPE, cwd=repo))
    recipe_stages = [f"{RECIPE}:{stage}" for stage in RECIPE_STAGES]
    # The demo pipeline up to its model (the init_from dep), none of its scoring; then the recipe.
    assert sorted(ran) == sorted(["synth", "manifest", "featurize", "train", *recipe_stages])
    assert ran.index("train") < ran.index(f"{RECIPE}:train")
    assert json.loads(dvc("status", RECIPE, "--json", cwd=repo)) == {}

    recipe = repo / "recipes/fsdd"
    lock = yaml.safe_load((recipe / "dvc.lock").read_text())["stages"]["train"]
    demo_model = next(d for d in lock["deps"] if d["path"] == "../../models/best_epoch.pt")
    assert demo_model["md5"] == hashlib.md5((repo / "models/best_epoch.pt").read_bytes()).hexdigest()
    assert lock["params"]["params.yaml"]["train.init_from"] == "../../models/best_epoch.pt"

    # Held-out speakers: jackson and lucas train, nicolas validates, george is the test; the 17
    # espeak utterances of 5 voices (manifest.train_sets.espeak) all train, whatever synth's split.
    manifest = read_json(recipe / "metrics/manifest.json")
    assert {s: (manifest[s]["utterances"], manifest[s]["speakers"]) for s in ("train", "valid", "test")} == \
        {"train": (37, 7), "valid": (10, 1), "test": (10, 1)}
    assert {k: manifest["train_sets"]["espeak"][k] for k in ("utterances", "speakers")} == {"utterances": 17, "speakers": 5}
    train = pd.read_json(recipe / "data/manifests/train.jsonl", lines=True, dtype={"id": str})
    espeak = train[train["audio_path"].str.startswith("data/corpus/")]
    assert len(espeak) == 17 and set(espeak["speaker"]) == {*(f"train-spk000{i}" for i in range(3)), "valid-spk0000", "test-spk0000"}
    assert (espeak["text_normalized"].str.split().str.len() == 1).sum() == 12  # the word lists: one digit each
    test = pd.read_json(recipe / "data/manifests/test.jsonl", lines=True, dtype={"id": str})
    assert set(test["speaker"]) == {"george"}
    assert sorted(test["text_normalized"]) == sorted(DIGITS)
    # The recipe's own LM: the ten digit words of its training transcripts.
    assert {line.split()[0] for line in (recipe / "data/lm/lexicon.txt").read_text().splitlines()} == set(DIGITS)
    assert read_json(recipe / "metrics/lm.json")["vocabulary"] == 10
    scored = read_json(recipe / "metrics/eval.json")
    assert scored["utterances"] == 10 and "test_sets" not in scored
    assert [p.name for p in sorted((recipe / "plots").glob("*.png"))] == ["blank_ratio.png", "calibration.png",
                                                                          "error_rates.png", "loss.png"]


TRAIN_READS = ["features.json", "tokens.json", "train", "valid"]  # train's deps in data/features
TEST_SET_FILES = ["1_jackson_3", "2_lucas_4", "5_nicolas_6", "8_george_7", "0_george_9", "9_nicolas_2"]


def train_reads(features: Path) -> dict[str, bytes]:
    """The bytes of every file train reads: its settings files, and the index and shards of its splits."""
    paths = [features / name for name in TRAIN_READS]
    files = [f for path in paths for f in ([path] if path.is_file() else sorted(path.iterdir()))]
    return {str(f.relative_to(features)): f.read_bytes() for f in files}


def test_a_new_test_set_is_scored_without_retraining(repo):
    assert stages_run(dvc("repro", cwd=repo)) == ["lm", "evaluate", "export", "plots"]  # the rest ran for the recipe
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "demo pipeline", cwd=repo)
    before = train_reads(repo / "data/features")
    model = (repo / "models/best.pt").read_bytes()
    metrics = read_json(repo / "metrics/eval.json")

    corpus = repo / "data/test_sets/fsdd"
    corpus.mkdir()
    for name in TEST_SET_FILES:
        shutil.copy(FSDD / f"{name}.wav", corpus)
    shutil.copy(FSDD / "3_lucas_0.wav", corpus / "notes.wav")  # a name off the FSDD pattern: a reject
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["manifest"]["test_sets"] = {"fsdd": {"source": "fsdd", "corpus_dir": "data/test_sets/fsdd",
                                                "table": None, "columns": None}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    assert stages_run(dvc("repro", cwd=repo)) == ["manifest", "featurize", "evaluate", "plots"]
    assert train_reads(repo / "data/features") == before
    assert (repo / "models/best.pt").read_bytes() == model
    assert json.loads(dvc("status", "--json", cwd=repo)) == {}

    # The set's manifest, rejects, features and scores, each beside the test split's.
    listed = pd.read_json(repo / "data/manifests/fsdd.jsonl", lines=True, dtype={"id": str})
    assert sorted(listed["id"]) == sorted(TEST_SET_FILES) and set(listed["split"]) == {"fsdd"}
    rejects = pd.read_json(repo / "data/manifests/rejects.jsonl", lines=True, dtype=str)
    assert list(zip(rejects["id"], rejects["split"], rejects["reason"])) == [("notes", "fsdd", "bad_file_name")]
    assert read_json(repo / "data/features/test_sets.json") == ["fsdd"]
    assert read_json(repo / "metrics/featurize.json")["test_sets"]["fsdd"]["utterances"] == 6
    scored = read_json(repo / "metrics/eval.json")
    assert {k: v for k, v in scored.items() if k != "test_sets"} == {k: v for k, v in metrics.items() if k != "test_sets"}
    fsdd = scored["test_sets"]["fsdd"]
    assert fsdd["utterances"] == 6 and {"wer", "cer", "sentence_accuracy", "greedy", "beam"} <= set(fsdd)
    assert fsdd["wer"] == fsdd["beam"]["wer"] and 0 <= fsdd["greedy"]["cer"]  # evaluate.decoder: beam
    table = pd.read_csv(repo / "reports/eval/fsdd/utterances.csv", dtype=str, keep_default_na=False)
    assert dict(zip(table["id"], table["reference"])) == {name: DIGITS[int(name[0])] for name in TEST_SET_FILES}
    # `dvc metrics diff` lines the new numbers up under test_sets, the old ones unchanged.
    diff = json.loads(dvc("metrics", "diff", "--json", cwd=repo))["metrics/eval.json"]
    assert diff and all(key.startswith("test_sets.fsdd.") for key in diff)


def knob_names(section: dict) -> set[str]:
    """A section's dotted param names; an extra-corpus map (test_sets, train_sets) is one knob, its keys the user's names."""
    return set(flatten({key: {} if key.endswith("_sets") else value for key, value in section.items()}))


def test_the_recipe_tracks_what_the_project_s_pipeline_tracks():
    """The recipe's stages run the project's code: the same code deps (one folder up, twice) and
    params; and its params.yaml has every key the project's has, in the sections it reads."""
    project = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    recipe = yaml.safe_load((REPO / RECIPE).read_text())["stages"]
    assert list(recipe) == RECIPE_STAGES
    for name, stage in recipe.items():
        code = [d for d in project[name]["deps"] if d.split("/")[0] in ("stages", "ctcflow")]
        assert [d for d in stage["deps"] if d.startswith("../../") and d != "../../models/best_epoch.pt"] == \
            [f"../../{d}" for d in code], name
        assert stage["params"] == project[name]["params"], name
        assert stage["cmd"] == project[name]["cmd"], name
    assert "../../models/best_epoch.pt" in recipe["train"]["deps"]

    project_params = yaml.safe_load((REPO / "params.yaml").read_text())
    recipe_params = yaml.safe_load((REPO / "recipes/fsdd/params.yaml").read_text())
    assert list(recipe_params) == RECIPE_STAGES
    for name in RECIPE_STAGES:
        assert knob_names(recipe_params[name]) == knob_names(project_params[name]), name
    assert set(recipe_params["manifest"]["train_sets"]["espeak"]) == {"source", "corpus_dir", "table", "columns"}
    assert recipe_params["train"]["init_from"] == "../../models/best_epoch.pt"
    assert recipe_params["manifest"]["held_out_speakers"] == {"valid": ["nicolas"], "test": ["george"]}

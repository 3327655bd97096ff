"""Training killed with SIGKILL mid-epoch under `dvc repro`, then rerun: it resumes, and ends exactly
where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, make_project, merge, section, tiny_params
from ctcflow.checkpoint import load_checkpoint
from stages.train import TrainParams, run

TRAIN = {"epochs": 4, "batch_frames": 1500, "warmup_steps": 0, "num_threads": 1,
         "model": {"hidden_size": 64, "num_layers": 2, "conv_channels": 64}}
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def sh(*cmd: str, cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


@pytest.fixture(scope="module")
def killed(tiny_pipeline, tmp_path_factory) -> tuple[Path, Path]:
    """A DVC repo with only the train stage, whose `dvc repro` was killed (SIGKILL, the whole process
    group) during epoch 2; and a copy of the resume checkpoint it left."""
    params = tiny_params()
    params["train"] = merge(params["train"], TRAIN)
    repo = make_project(tmp_path_factory.mktemp("resume"), params)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stages["train"]}}, sort_keys=False))
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    for package in ("stages", "ctcflow"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_pipeline / "data/features", repo / "data/features")
    sh("git", "init", "-q", cwd=repo)
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=ctcflow-test", "-c", "user.email=test@example.invalid", "commit", "-qm", "tiny",
       cwd=repo)

    resume = repo / "checkpoints/train/resume.pt"
    log = (repo.parent / "killed-run.log").open("w")
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=ENV, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    while not resume.exists() and repro.poll() is None:  # written atomically at the end of epoch 1
        time.sleep(0.01)
    assert repro.poll() is None, (repo.parent / "killed-run.log").read_text()
    os.killpg(repro.pid, signal.SIGKILL)  # dvc and the training process under it
    repro.wait()
    snapshot = repo.parent / "snapshot"
    shutil.copytree(resume.parent, snapshot)
    return repo, snapshot


def test_killed_run_left_a_safe_checkpoint_of_epoch_1(killed):
    repo, snapshot = killed
    state = load_checkpoint(snapshot / "resume.pt")  # weights_only=True
    # The kill landed in epoch 2: the checkpoint and the history it carries end at epoch 1.
    assert state["epoch"] == 1 and [record["epoch"] for record in state["history"]] == [1]
    assert {"model", "optimizer", "scheduler", "rng", "best_model", "fingerprint"} <= set(state)


def read_run(root: Path) -> tuple[dict, dict, dict]:
    live = root / "metrics/train"
    series = {str(f.relative_to(live)): pd.read_csv(f, sep="\t") for f in (live / "plots").rglob("*.tsv")}
    summary = json.loads((live / "metrics.json").read_text())
    models = {name: load_checkpoint(root / "models" / name) for name in ("best.pt", "last.pt")}
    return series, summary, models


def test_rerun_resumes_and_ends_like_an_uninterrupted_run(killed, tmp_path):
    repo, _ = killed
    output = dvc("repro", cwd=repo)
    assert "resuming after epoch 1 from checkpoints/train/resume.pt" in output
    assert not (repo / "checkpoints/train/resume.pt").exists()  # finished: a later rerun starts afresh
    assert "up to date" in dvc("status", cwd=repo)

    (tmp_path / "data").mkdir()
    run(section("train", TrainParams, **TRAIN), features_dir=repo / "data/features", model_dir=tmp_path / "models",
        live_dir=tmp_path / "metrics/train", resume_dir=tmp_path / "checkpoints")
    resumed, uninterrupted = read_run(repo), read_run(tmp_path)

    series, reference = resumed[0], uninterrupted[0]
    assert series.keys() == reference.keys()
    for name, frame in series.items():
        assert frame["step"].tolist() == [1, 2, 3, 4], name  # no gap, no epoch twice
        if "audio_seconds_per_second" not in name:  # a timing
            pd.testing.assert_frame_equal(frame, reference[name], check_exact=True, obj=name)

    summary, reference = resumed[1], uninterrupted[1]
    assert summary["run"] == {"nonfinite_steps": 0, "resumed_from_epoch": 1, "early_stopped_epoch": 0}
    assert reference["run"]["resumed_from_epoch"] == 0
    for part in (summary, reference):
        del part["run"]["resumed_from_epoch"], part["audio_seconds_per_second"]
    assert summary == reference

    for name in ("best.pt", "last.pt"):
        ours, theirs = resumed[2][name], uninterrupted[2][name]
        assert ours["epoch"] == theirs["epoch"]
        for key, weights in theirs["model"].items():
            assert torch.equal(ours["model"][key], weights), (name, key)
    ours, theirs = resumed[2]["last.pt"]["optimizer"]["state"], uninterrupted[2]["last.pt"]["optimizer"]["state"]
    assert all(torch.equal(ours[p]["exp_avg_sq"], theirs[p]["exp_avg_sq"]) for p in theirs)


def test_a_checkpoint_from_other_params_is_not_resumed(killed, tmp_path, capsys):
    repo, snapshot = killed

    def train(tag: str, **changes) -> dict:
        resume_dir = tmp_path / tag / "checkpoints"
        shutil.copytree(snapshot, resume_dir)
        run(section("train", TrainParams, **{**TRAIN, "epochs": 2, **changes}), features_dir=repo / "data/features",
            model_dir=tmp_path / tag / "models", live_dir=tmp_path / tag / "live", resume_dir=resume_dir)
        return json.loads((tmp_path / tag / "live/metrics.json").read_text())["run"]

    # Fewer epochs is a change a resumed run may make: it carries on from epoch 1.
    assert train("fewer_epochs")["resumed_from_epoch"] == 1
    assert "resuming after epoch 1" in capsys.readouterr().out
    # Another learning rate would mix two runs in one history: start afresh, and say why.
    assert train("other_lr", lr=0.001)["resumed_from_epoch"] == 0
    assert "written with other settings (lr: 0.002 there, 0.001 here): starting afresh" in capsys.readouterr().out
    # Another model cannot take the weights at all.
    assert train("other_model", model={"hidden_size": 48})["resumed_from_epoch"] == 0
    assert "model.hidden_size: 64 there, 48 here" in capsys.readouterr().out
    # resume: false ignores the checkpoint.
    assert train("no_resume", resume=False)["resumed_from_epoch"] == 0

"""Training killed with SIGKILL mid-epoch (under `dvc repro`, and in distributed data parallel), then
rerun: it resumes within that epoch, and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
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
from ctcflow.data import LengthBatchSampler
from stages.train import TrainParams, run

# 6 batches an epoch, a resume checkpoint after every 2nd step within it.
# best.pt averages two epochs: the resumed run must carry the earlier epoch's weights over.
TRAIN = {"epochs": 4, "batch_frames": 1500, "warmup_steps": 0, "num_threads": 1, "checkpoint_every": 2,
         "average_epochs": 2, "model": {"hidden_size": 64, "num_layers": 2, "conv_channels": 64}}
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def sh(*cmd: str, cwd: Path, env: dict = ENV) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


def written_within(path: Path, epoch: int) -> bool:
    """True once `path` holds a resume checkpoint written within `epoch` (after some of its steps)."""
    with contextlib.suppress(FileNotFoundError):  # not yet written, or deleted as training ended
        state = load_checkpoint(path)
        return bool(state["progress"]) and len(state["history"]) == epoch - 1
    return False


def modified(path: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mtime_ns
    return None


def kill_within_epoch(cmd: list[str], cwd: Path, resume: Path, epoch: int, log: Path, env: dict = ENV) -> None:
    """Run `cmd` in a process group of its own and SIGKILL the whole group (dvc, the training
    processes, their loader workers) as soon as `resume` holds a checkpoint written within `epoch`.
    The group is stopped while the file is checked: a run that went on meanwhile could finish the
    epoch, or training, and replace or delete the checkpoint before the kill (seen under load)."""
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        checked = None
        while process.poll() is None:
            if modified(resume) not in (None, checked):
                os.killpg(process.pid, signal.SIGSTOP)
                checked = modified(resume)
                if written_within(resume, epoch):
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    return
                os.killpg(process.pid, signal.SIGCONT)
            time.sleep(0.01)
    raise AssertionError(f"the run ended before a checkpoint within epoch {epoch}:\n{log.read_text()}")


def assert_identical(ours, theirs, where: str = "checkpoint") -> None:
    """Every tensor torch.equal, every other value equal, all the way down."""
    if isinstance(theirs, torch.Tensor):
        assert torch.equal(ours, theirs), where
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in theirs:
            assert_identical(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (mine, other) in enumerate(zip(ours, theirs)):
            assert_identical(mine, other, f"{where}[{i}]")
    else:
        assert ours == theirs, where


@pytest.fixture(scope="module")
def killed(tiny_pipeline, tmp_path_factory) -> tuple[Path, Path]:
    """A DVC repo with only the train stage, whose `dvc repro` was killed (SIGKILL, the whole process
    group) within epoch 2; and a copy of the resume checkpoint it left."""
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

    resume = repo / "checkpoints/train/resume.pt"  # written atomically: a temporary file, then a rename
    kill_within_epoch([sys.executable, "-m", "dvc", "repro"], repo, resume, 2, repo.parent / "killed-run.log")
    snapshot = repo.parent / "snapshot"
    shutil.copytree(resume.parent, snapshot)
    return repo, snapshot


def batches_in_epoch(features: Path, epoch: int) -> int:
    sampler = LengthBatchSampler(pd.read_csv(features / "train" / "index.csv")["num_frames"].to_numpy(), TRAIN["batch_frames"],
                                 shuffle=True, seed=section("train", TrainParams).seed)
    sampler.set_epoch(epoch)
    return len(sampler)


def test_killed_run_left_a_safe_checkpoint_within_epoch_2(killed):
    repo, snapshot = killed
    state = load_checkpoint(snapshot / "resume.pt")  # weights_only=True
    # The kill landed within epoch 2: the history ends at epoch 1, and the sampler's position is a
    # checkpoint step of epoch 2 (every 2nd) before its last batch.
    assert [record["epoch"] for record in state["history"]] == [1]
    (progress,) = state["progress"]  # one process
    assert progress["batches_done"] in range(2, batches_in_epoch(repo / "data/features", 2), 2)
    assert progress["updates"] == progress["batches_done"] and progress["utterances"] > 0
    assert {"model", "optimizer", "scheduler", "rng", "best_model", "best_epoch_model", "recent_models",
            "fingerprint"} <= set(state)
    assert len(state["recent_models"]) == 1  # epoch 1's weights, for best.pt's mean with a better epoch 2


def read_run(root: Path) -> tuple[dict, dict, dict]:
    live = root / "metrics/train"
    series = {str(f.relative_to(live)): pd.read_csv(f, sep="\t") for f in (live / "plots").rglob("*.tsv")}
    summary = json.loads((live / "metrics.json").read_text())
    models = {name: load_checkpoint(root / "models" / name) for name in ("best.pt", "best_epoch.pt", "last.pt")}
    return series, summary, models


def test_rerun_resumes_and_ends_like_an_uninterrupted_run(killed, tmp_path):
    repo, snapshot = killed
    position = load_checkpoint(snapshot / "resume.pt")["progress"][0]["batches_done"]
    output = dvc("repro", cwd=repo)
    assert f"resuming epoch 2 at its batch {position + 1} from checkpoints/train/resume.pt" in output
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
    assert summary["run"] == {"nonfinite_steps": 0, "resumed_from_epoch": 1, "early_stopped_epoch": 0,
                              "precision": "fp32"}
    assert reference["run"]["resumed_from_epoch"] == 0
    for part in (summary, reference):
        del part["run"]["resumed_from_epoch"], part["audio_seconds_per_second"]
    assert summary == reference

    for name in ("best.pt", "best_epoch.pt", "last.pt"):  # weights, optimizer, scheduler, epoch, WER: bit for bit
        assert_identical(resumed[2][name], uninterrupted[2][name], name)


def test_a_checkpoint_from_other_params_is_not_resumed(killed, tmp_path, capsys):
    repo, snapshot = killed

    def train(tag: str, **changes) -> dict:
        resume_dir = tmp_path / tag / "checkpoints"
        shutil.copytree(snapshot, resume_dir)
        run(section("train", TrainParams, **{**TRAIN, "epochs": 2, **changes}), features_dir=repo / "data/features",
            model_dir=tmp_path / tag / "models", live_dir=tmp_path / tag / "live", resume_dir=resume_dir)
        return json.loads((tmp_path / tag / "live/metrics.json").read_text())["run"]

    # Fewer epochs is a change a resumed run may make: it carries on within epoch 2.
    assert train("fewer_epochs")["resumed_from_epoch"] == 1
    assert "resuming epoch 2 at its batch" in capsys.readouterr().out
    # But not so few that the epoch it was written within would never end (nor models/last.pt come).
    assert train("epoch_left_out", epochs=1)["resumed_from_epoch"] == 0
    assert "written within epoch 2, which train.epochs or train.early_stopping_patience now leave out: " \
           "starting afresh" in capsys.readouterr().out
    # Another learning rate would mix two runs in one history: start afresh, and say why.
    assert train("other_lr", lr=0.001)["resumed_from_epoch"] == 0
    assert "written with other settings (lr: 0.002 there, 0.001 here): starting afresh" in capsys.readouterr().out
    # Another model cannot take the weights at all.
    assert train("other_model", model={"hidden_size": 48})["resumed_from_epoch"] == 0
    assert "model.hidden_size: 64 there, 48 here" in capsys.readouterr().out
    # resume: false ignores the checkpoint.
    assert train("no_resume", resume=False)["resumed_from_epoch"] == 0


def test_two_processes_killed_within_an_epoch_resume_at_the_same_batch(tiny_pipeline, tmp_path):
    """Distributed data parallel, 2 loader workers per process, killed within epoch 2 and rerun: both
    ranks resume at the same batch with their own random streams and sums, and the run ends bit for
    bit where an uninterrupted one, without loader workers, ends."""
    train = {**TRAIN, "epochs": 2, "nproc": 2, "checkpoint_every": 1}
    project = make_project(tmp_path / "killed", merge(tiny_params(), {"train": {**train, "loader_workers": 2}}))
    (project / "data/features").symlink_to(tiny_pipeline / "data/features")
    stage, env = [sys.executable, "-m", "stages.train"], {**ENV, "PYTHONPATH": str(REPO)}
    resume = project / "checkpoints/train/resume.pt"
    kill_within_epoch(stage, project, resume, 2, tmp_path / "killed.log", env)
    ranks = load_checkpoint(resume)["progress"]
    assert len(ranks) == 2 and ranks[0]["batches_done"] == ranks[1]["batches_done"] > 0
    assert ranks[0]["loss_sums"] != ranks[1]["loss_sums"]  # each rank's own batches
    assert f"resuming epoch 2 at its batch {ranks[0]['batches_done'] + 1}" in sh(*stage, cwd=project, env=env)

    whole = tmp_path / "uninterrupted"
    run(section("train", TrainParams, **train), features_dir=tiny_pipeline / "data/features",
        model_dir=whole / "models", live_dir=whole / "metrics/train", resume_dir=whole / "checkpoints")
    (series, summary, models), (reference, reference_summary, reference_models) = read_run(project), read_run(whole)
    for name, frame in reference.items():
        if "audio_seconds_per_second" not in name:  # a timing
            pd.testing.assert_frame_equal(series[name], frame, check_exact=True, obj=name)
    assert summary["run"]["resumed_from_epoch"] == 1 and summary["valid"] == reference_summary["valid"]
    for name in ("best.pt", "best_epoch.pt", "last.pt"):
        assert_identical(models[name], reference_models[name], name)


def test_a_killed_cosine_run_resumes_on_its_curve_and_warm_up(tiny_pipeline, tmp_path):
    """The cosine schedule and a warm-up longer than an epoch (8 steps, 6 an epoch), killed within
    epoch 2 and rerun: the rates go on where they were, and the run ends bit for bit where an
    uninterrupted one ends."""
    train = {**TRAIN, "epochs": 3, "warmup_steps": 8, "scheduler": {"enabled": True, "kind": "cosine"}}
    project = make_project(tmp_path / "killed", merge(tiny_params(), {"train": train}))
    (project / "data/features").symlink_to(tiny_pipeline / "data/features")
    stage, env = [sys.executable, "-m", "stages.train"], {**ENV, "PYTHONPATH": str(REPO)}
    resume = project / "checkpoints/train/resume.pt"
    kill_within_epoch(stage, project, resume, 2, tmp_path / "killed.log", env)
    assert "resuming epoch 2 at its batch" in sh(*stage, cwd=project, env=env)

    whole = tmp_path / "uninterrupted"
    run(section("train", TrainParams, **train), features_dir=tiny_pipeline / "data/features",
        model_dir=whole / "models", live_dir=whole / "metrics/train", resume_dir=whole / "checkpoints")
    (series, summary, models), (reference, _, reference_models) = read_run(project), read_run(whole)
    # The rate of each next epoch's first step: 0.002 × (1 + cos(π e / 3)) / 2 after epoch e, and
    # after epoch 1 (6 steps done) still 7/8 of it, the warm-up's 7th step.
    assert series["plots/metrics/lr.tsv"]["lr"].tolist() == pytest.approx([0.002 * 0.75 * 7 / 8, 0.0005, 0.0])
    for name, frame in reference.items():
        if "audio_seconds_per_second" not in name:  # a timing
            pd.testing.assert_frame_equal(series[name], frame, check_exact=True, obj=name)
    assert summary["run"]["resumed_from_epoch"] == 1
    for name in ("best.pt", "best_epoch.pt", "last.pt"):
        assert_identical(models[name], reference_models[name], name)

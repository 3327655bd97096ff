"""The real pipeline through real DVC, in a throwaway git repo: repro, no-op repro, partial repro."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_project

STAGES = ["synth", "manifest", "featurize", "train", "lm", "evaluate", "plots"]


def run(cmd: list[str], cwd: Path) -> str:
    # Stage commands call `python`: make it this interpreter, whose environment has the deps.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(*args: str, cwd: Path) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd)


def git(*args: str, cwd: Path) -> str:
    return run(["git", "-c", "user.name=ctcflow-test", "-c", "user.email=test@example.invalid", *args], cwd)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("dvcrepo"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for package in ("stages", "ctcflow"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    git("init", "-q", cwd=root)
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "tiny project", cwd=root)
    return root


def test_repro_runs_every_stage_in_order(repo):
    output = dvc("repro", cwd=repo)
    assert stages_run(output) == STAGES
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=repo))
    files = next(iter(metrics.values()))["data"]
    shown = {path: entry["data"] for path, entry in files.items()}
    assert {"wer", "cer", "sentence_accuracy"} <= set(shown["metrics/eval.json"])
    assert {"loss", "ctc_loss", "blank_penalty", "blank_ratio"} <= set(shown["metrics/train/metrics.json"]["train"])
    assert shown["metrics/manifest.json"]["rejected"]["total"] == 0
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "first run", cwd=repo)


def test_second_repro_runs_nothing(repo):
    output = dvc("repro", cwd=repo)
    assert stages_run(output) == []
    assert "Data and pipelines are up to date" in dvc("status", cwd=repo)


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_changing_an_evaluate_param_reruns_only_evaluate_and_then_plots(repo):
    # Fewer examples: evaluate reruns; its metrics are unchanged, so DVC skips plots too.
    set_param(repo, "evaluate", "num_examples", 2)
    output = dvc("repro", cwd=repo)
    assert stages_run(output) == ["evaluate"]
    assert (repo / "reports/eval/examples.txt").read_text().count("REF:") == 2
    diff = json.loads(dvc("params", "diff", "--json", cwd=repo))
    assert diff == {"params.yaml": {"evaluate.num_examples": {"old": 3, "new": 2, "diff": -1}}}

    # Scoring another split changes metrics/eval.json, which the plots draw.
    set_param(repo, "evaluate", "split", "valid")
    output = dvc("repro", cwd=repo)
    assert stages_run(output) == ["evaluate", "plots"]
    assert json.loads((repo / "metrics/eval.json").read_text())["utterances"] == 6


def test_dvc_plots_show_renders_the_training_series(repo, tmp_path):
    dvc("plots", "show", "--json", "-o", str(tmp_path / "out"), cwd=repo)
    html = dvc("plots", "show", "-o", str(tmp_path / "html"), cwd=repo)
    assert (tmp_path / "html" / "index.html").is_file(), html
    rendered = json.loads(dvc("plots", "show", "--json", cwd=repo))
    for name in ("loss", "error_rates", "blank_ratio", "plots/loss.png"):
        assert name in json.dumps(list(rendered)) or name in json.dumps(rendered), name

"""The real pipeline through real DVC, in a throwaway git repo: repro, no-op repro, partial repro."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import dvc, git, make_dvc_repo

STAGES = ["synth", "manifest", "featurize", "train", "lm", "evaluate", "export", "plots"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_dvc_repo(tmp_path_factory.mktemp("dvcrepo"))


def written(repo: Path, path: str) -> dict:
    return json.loads((repo / path).read_text())


def test_repro_runs_every_stage_in_order(repo):
    output = dvc("repro", cwd=repo)
    assert stages_run(output) == STAGES
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=repo))
    files = next(iter(metrics.values()))["data"]
    shown = {path: entry["data"] for path, entry in files.items()}
    # DVC shows every stage's metrics file as the stage wrote it.
    assert set(shown) == {"metrics/manifest.json", "metrics/featurize.json", "metrics/train/metrics.json",
                          "metrics/lm.json", "metrics/eval.json", "metrics/export.json"}
    for path in shown:
        assert shown[path] == written(repo, path), path
    # And the values are the tiny project's: 30/6/6 utterances, one epoch, the test split scored.
    train = written(repo, "metrics/train/metrics.json")
    assert shown["metrics/train/metrics.json"]["train"]["loss"] == train["train"]["loss"] > 0
    assert shown["metrics/train/metrics.json"]["best"]["epoch"] == 1
    for stage in ("manifest", "featurize"):
        assert [shown[f"metrics/{stage}.json"][split]["utterances"] for split in ("train", "valid", "test")] == \
            [30, 6, 6], stage
    assert shown["metrics/manifest.json"]["rejected"]["total"] == 0
    assert shown["metrics/lm.json"]["sentences"] == 30
    assert shown["metrics/eval.json"]["utterances"] == 6
    assert shown["metrics/export.json"]["fp32"]["differing_transcripts"] == 0
    assert sorted(p.name for p in (repo / "export").iterdir()) == ["model.int8.onnx", "model.onnx"]
    assert 0 <= shown["metrics/eval.json"]["wer"] == written(repo, "metrics/eval.json")["wer"] <= 1
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
    html = dvc("plots", "show", "-o", str(tmp_path / "html"), cwd=repo)
    assert (tmp_path / "html" / "index.html").is_file(), html
    rendered = json.loads(dvc("plots", "show", "--json", "-o", str(tmp_path / "json"), cwd=repo))["data"]
    pngs = ("plots/loss.png", "plots/error_rates.png", "plots/blank_ratio.png", "plots/calibration.png")
    assert set(rendered) == {"loss", "error_rates", "blank_ratio", "calibration", *pngs}
    for png in pngs:
        assert [r["type"] for r in rendered[png]] == ["image"], png
    # The loss plot draws the four series the train stage wrote, value for value.
    (loss,) = rendered["loss"]
    drawn = {(p["filename::field"], int(p["step"])): float(p["dvc_inferred_y_value"])
             for p in loss["content"]["data"]["values"]}
    series = {}
    for tsv, column in [("train/loss", "loss"), ("train/ctc_loss", "ctc_loss"),
                        ("train/blank_penalty", "blank_penalty"), ("valid/loss", "loss")]:
        with open(repo / "metrics/train/plots/metrics" / f"{tsv}.tsv") as rows:
            series.update({(f"{tsv}.tsv::{column}", int(row["step"])): float(row[column])
                           for row in csv.DictReader(rows, delimiter="\t")})
    assert drawn == series
    assert {step for _, step in drawn} == {1}  # the tiny project trains one epoch


def set_train_params(repo: Path, **changes) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        section = params["train"]
        for part in path:
            section = section[part]
        section[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def committed_metrics(repo: Path, rev: str) -> dict[str, object]:
    """Every metric at a commit, read with git itself rather than DVC, as dotted names."""
    from ctcflow.params import flatten

    flat = {}
    for path in ("metrics/train/metrics.json", "metrics/eval.json", "metrics/export.json"):
        flat.update({f"{path}:{k}": v for k, v in flatten(json.loads(git("show", f"{rev}:{path}", cwd=repo))).items()})
    return flat


def test_diffs_between_commits_show_exactly_what_changed(repo, tmp_path):
    # Commit a run, change the blank penalty and the clipping, run and commit again.
    dvc("repro", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "baseline", cwd=repo)
    set_train_params(repo, blank_penalty__mode="soft_ratio", clip_grad_norm=1.0)
    assert stages_run(dvc("repro", cwd=repo)) == ["train", "evaluate", "export", "plots"]
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "soft_ratio, clip 1.0", cwd=repo)

    params = json.loads(dvc("params", "diff", "HEAD~1", "HEAD", "--json", cwd=repo))
    assert params == {"params.yaml": {
        "train.blank_penalty.mode": {"old": "none", "new": "soft_ratio"},
        "train.clip_grad_norm": {"old": 5.0, "new": 1.0, "diff": -4.0}}}

    old, new = committed_metrics(repo, "HEAD~1"), committed_metrics(repo, "HEAD")
    changed = {key for key in new if new[key] != old.get(key)}
    assert {"metrics/train/metrics.json:train.blank_penalty", "metrics/train/metrics.json:train.loss",
            "metrics/train/metrics.json:train.ctc_loss"} <= changed
    metrics = json.loads(dvc("metrics", "diff", "HEAD~1", "HEAD", "--json", cwd=repo))
    shown = {f"{path}:{key}": values for path, entries in metrics.items() for key, values in entries.items()}
    # DVC lists exactly the metrics that changed (WER included when it moved), with both values.
    assert set(shown) == changed
    for key in changed:
        assert (shown[key]["old"], shown[key]["new"]) == (old.get(key), new[key]), key

    out = tmp_path / "plots"
    dvc("plots", "diff", "HEAD~1", "HEAD", "-o", str(out), cwd=repo)
    html = (out / "index.html").read_text()
    assert "HEAD~1" in html and "loss" in html

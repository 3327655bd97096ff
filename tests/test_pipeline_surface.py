"""What a user of `python -m pipeline` meets before and around a run: flow params refused up front,
a sweep grid checked before any point runs, the ranking, the report, Ctrl-C and the server's URL.
No Prefect server and no training: each test takes seconds."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import dvc, git, section, tiny_params
from ctcflow.params import ParamsError
from pipeline.config import FlowParams, SweepParams, load_flow_params
from pipeline.report import param_columns, plots_markdown, rank_rows, sweep_row


def pipeline(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def last_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def dead_api() -> dict:
    """An environment whose PREFECT_API_URL nobody answers (port 9, discard): a command that got as
    far as looking for the server stops there, so an earlier error shows its check ran first."""
    return {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}


@pytest.mark.parametrize("name", ["", "  ", "ctcflow/nightly", "50%"])
def test_a_deployment_name_prefect_would_refuse_or_replace_is_refused(name, tmp_path):
    # Before: "" was served as the flow's own name, 'ctcflow-pipeline', without a word, and a '/'
    # stopped `serve` with a traceback (Prefect's "Runner name cannot contain '/' or '%'").
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"flow": {**tiny_params()["flow"], "deployment": name}}))
    with pytest.raises(ParamsError) as refused:
        load_flow_params(tmp_path)
    assert str(refused.value).splitlines()[1:] == [
        f"  flow.deployment: Value error, {name!r} is not a deployment name: a name such as nightly, "
        f"without '/' or '%' (got {name!r})"]
    assert section("flow", FlowParams, deployment="nightly build").deployment == "nightly build"


def test_a_diverged_point_ranks_last_not_first():
    nan = float("nan")
    rows = [{"experiment": "diverged", "test_wer": nan, "test_sentence_accuracy": nan},
            {"experiment": "a", "test_wer": 0.30, "test_sentence_accuracy": 0.2},
            {"experiment": "failed", "test_wer": None, "test_sentence_accuracy": None},
            {"experiment": "b", "test_wer": 0.10, "test_sentence_accuracy": 0.7},
            {"experiment": "inf", "test_wer": float("inf"), "test_sentence_accuracy": 0.0}]
    # Before: NaN compared as neither better nor worse, so the first row stayed first, and
    # --apply-best applied it.
    assert [r["experiment"] for r in rank_rows(rows, "wer")] == ["b", "a", "inf", "diverged", "failed"]
    assert [r["experiment"] for r in rank_rows(rows, "sentence_accuracy")] == ["b", "a", "inf", "diverged", "failed"]


@pytest.fixture(scope="module")
def sweep_project(tmp_path_factory) -> Path:
    """params.yaml with a train: section and a flow: section; nothing ever runs in it."""
    root = tmp_path_factory.mktemp("sweep_project")
    params = {"train": {"epochs": 1, "clip_grad_norm": 1.0, "seed": 0}, "flow": tiny_params()["flow"]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"cmd": "python -c pass"}}}))
    return root


def with_sweep(root: Path, **sweep) -> Path:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["flow"]["sweep"] = {"grid": [{"train.clip_grad_norm": [0.5]}], "fixed": {}, "seeds": [0, 1],
                               "rank_by": "wer", **sweep}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"cmd": "python -c pass"}}}))
    return root


def test_a_sweep_key_dvc_would_refuse_stops_the_sweep_before_any_point(sweep_project):
    # Before: the sweep started, and each point holding the key failed on its own (with a message
    # about a --set nobody gave) while the others ran.
    with_sweep(sweep_project, grid=[{"train.clip_grad_norm": [0.5]}, {"train.nokey": [1, 2]}])
    assert last_line(pipeline("sweep", "--project-dir", str(sweep_project), env=dead_api())) == \
        "python -m pipeline sweep: error: flow.sweep point train.nokey=1,train.seed=0: DVC would refuse it: " \
        "Could not override 'train.nokey'. To append to your config use +train.nokey=1"
    # A fixed key is checked too; fixed values are in the name's hash only.
    with_sweep(sweep_project, fixed={"epochs": 3})
    assert last_line(pipeline("sweep", "--project-dir", str(sweep_project), env=dead_api())).startswith(
        "python -m pipeline sweep: error: flow.sweep point train.clip_grad_norm=0.5,train.seed=0-")
    # A good grid goes on to look for the server.
    with_sweep(sweep_project)
    assert "no Prefect server answers at PREFECT_API_URL" in \
        last_line(pipeline("sweep", "--project-dir", str(sweep_project), env=dead_api()))


def test_an_existing_sweep_point_with_other_params_names_no_option_the_sweep_lacks(sweep_project, monkeypatch):
    from pipeline import flows

    with_sweep(sweep_project)
    name = "train.clip_grad_norm=0.5,train.seed=0"
    ran_with = {"train": {"epochs": 3, "clip_grad_norm": 0.5, "seed": 0}, "flow": {"retries": 9}}
    monkeypatch.setattr(flows, "named_experiments", lambda project_dir: {
        name: {"rev": "abc", "data": {"params": {"params.yaml": {"data": ran_with}}}}})
    monkeypatch.setattr(flows, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(flows, "run_dvc", lambda *a, **k: pytest.fail("no dvc command may run"))
    overrides = ["train.clip_grad_norm=0.5", "train.seed=0"]
    with pytest.raises(flows.FlowError) as refused:
        flows.run_experiment.fn(overrides, name, str(sweep_project), None, sweep_point=True)
    # Before: "give another --name", an option `sweep` does not have.
    assert str(refused.value) == \
        f"experiment '{name}' exists with other params (train.epochs: 3 there, 1 now): remove it first " \
        f"(dvc exp remove {name}), or commit the workspace's params.yaml (experiments are kept per commit)"
    with pytest.raises(flows.FlowError, match=r"now\): give another --name, or remove it first"):
        flows.run_experiment.fn(overrides, name, str(sweep_project), None)


def test_the_report_of_an_experiment_leaves_out_plots_the_project_does_not_make(tmp_path):
    # Before: dvc.api.read raised PathMissingError (not FileNotFoundError) for a plot the rev lacks,
    # and a `run --set` whose experiment had worked ended in a traceback.
    git("init", "-q", cwd=tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "no plots", cwd=tmp_path)
    bare = git("rev-parse", "HEAD", cwd=tmp_path).strip()
    assert plots_markdown(str(tmp_path), bare) == "(no plots)"
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.png").write_bytes(b"\x89PNG not really")
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "one plot", cwd=tmp_path)
    one = git("rev-parse", "HEAD", cwd=tmp_path).strip()
    encoded = base64.b64encode(b"\x89PNG not really").decode()
    expected = f"![plots/loss.png](data:image/png;base64,{encoded})"
    assert plots_markdown(str(tmp_path), one) == expected
    assert plots_markdown(str(tmp_path), None) == expected


def test_ctrl_c_ends_the_command_with_one_line_and_130(sweep_project, monkeypatch, capsys):
    import pipeline.__main__ as cli

    def interrupted(args, overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["__main__.py"])
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setattr(cli, "exit_on_sigterm", lambda: None)
    monkeypatch.setattr(cli, "find_server", lambda required: None)
    monkeypatch.setattr(cli, "run_command", interrupted)
    try:
        cli.main(["run", "--project-dir", str(with_sweep(sweep_project))])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended the command with the KeyboardInterrupt's traceback")  # before
    except SystemExit as stopped:
        assert stopped.code == 130
    else:
        pytest.fail("an interrupted command exited 0")
    assert capsys.readouterr().err == "python -m pipeline run: interrupted\n"


def test_a_prefect_url_without_api_says_so(sweep_project):
    url = "http://127.0.0.1:9"
    done = pipeline("run", "--project-dir", str(with_sweep(sweep_project)), env={**os.environ, "PREFECT_API_URL": url})
    assert last_line(done) == \
        f"python -m pipeline run: error: no Prefect server answers at PREFECT_API_URL = {url} (from the " \
        "environment or the active Prefect profile): start it, or change or unset the setting; the API's URL " \
        "ends in /api (http://127.0.0.1:9/api?)"


def test_a_project_without_dvc_yaml_is_refused_before_anything_starts(tmp_path):
    # Before: the run started (a temporary server, a flow run, `dvc status`) and ended in
    # FileNotFoundError's traceback when it read dvc.yaml's stages.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"flow": tiny_params()["flow"]}))
    for command in ("run", "sweep", "serve"):
        assert last_line(pipeline(command, "--project-dir", str(tmp_path), env=dead_api())) == \
            f"python -m pipeline {command}: error: --project-dir {tmp_path}: no dvc.yaml there, so no stage to " \
            "run; give the DVC project's root"
    # A dvc.yaml without stages (only plots, say) has none to run, rather than a KeyError.
    from pipeline.dvc import pipeline_stages

    (tmp_path / "dvc.yaml").write_text("plots:\n  - plots/loss.png\n")
    assert pipeline_stages(tmp_path) == []


def test_every_sweep_row_has_every_param_column_in_one_order():
    # As in params.yaml's grid, the mode-none block sets no weight. Before, its rows had no
    # train.blank_penalty.weight key, and the Prefect UI, which takes a table's columns from the
    # first row, showed no weight column at all when such a point ranked first.
    sweep = SweepParams(grid=[{"train.blank_penalty.mode": ["none"], "train.clip_grad_norm": [1.0]},
                              {"train.blank_penalty.mode": ["soft_ratio"], "train.blank_penalty.weight": [0.5]}],
                        fixed={"train.epochs": 4}, seeds=[0], rank_by="wer")
    points = sweep.points()
    keys = param_columns(points)
    assert keys == ["train.epochs", "train.blank_penalty.mode", "train.clip_grad_norm", "train.seed",
                    "train.blank_penalty.weight"]
    rows = [sweep_row(".", f"p{i}", None, point, error="not run", param_keys=keys) for i, point in enumerate(points)]
    metrics = ["test_wer", "test_cer", "test_sentence_accuracy", "test_ctc_loss", "test_greedy_wer", "test_greedy_cer",
               "test_greedy_sentence_accuracy", "train_loss", "train_ctc_loss", "train_blank_penalty",
               "valid_blank_ratio", "test_blank_ratio", "rev"]
    assert rows == [
        {"experiment": "p0", "train.epochs": 4, "train.blank_penalty.mode": "none", "train.clip_grad_norm": 1.0,
         "train.seed": 0, "train.blank_penalty.weight": None, **dict.fromkeys(metrics), "error": "not run"},
        {"experiment": "p1", "train.epochs": 4, "train.blank_penalty.mode": "soft_ratio", "train.clip_grad_norm": None,
         "train.seed": 0, "train.blank_penalty.weight": 0.5, **dict.fromkeys(metrics), "error": "not run"}]
    assert list(rows[0]) == list(rows[1])  # one order too


def test_apply_best_does_not_overwrite_an_edit_made_while_the_sweep_ran(tmp_path, monkeypatch):
    from pipeline import flows

    (tmp_path / "notes.md").write_text("notes\n")
    (tmp_path / "params.yaml").write_text("train: {lr: 0.1}\n")
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "notes", cwd=tmp_path)
    applied = []
    monkeypatch.setattr(flows, "run_dvc", lambda args, project_dir, log: applied.append(args))
    # An edit made before the sweep is in every experiment (dvc exp run --temp copies the
    # workspace), so applying one brings it back: that is no reason to refuse.
    (tmp_path / "params.yaml").write_text("train: {lr: 0.2}\n")
    before = flows.workspace_changes(str(tmp_path))
    assert list(before) == ["params.yaml"]
    assert flows.apply_best_point(str(tmp_path), "best", before, print) is None
    assert applied == [["exp", "apply", "best"]]
    # One made while it ran is in none of them: before, `dvc exp apply` overwrote it without a word.
    applied.clear()
    (tmp_path / "notes.md").write_text("notes\nmy edit\n")
    assert flows.apply_best_point(str(tmp_path), "best", before, print) == \
        "--apply-best: best not applied, since notes.md changed while the sweep ran and `dvc exp apply` would " \
        "overwrite it; commit or save the edit, then run dvc exp apply best"
    assert applied == []
    assert (tmp_path / "notes.md").read_text() == "notes\nmy edit\n"
    # The command then fails with that line after the table, though no point failed.
    rows = [{"experiment": "best", "error": None}]
    assert str(flows.SweepPointsFailed(rows, [], "--apply-best: best not applied")) == "--apply-best: best not applied"
    failed = {"experiment": "x", "error": "boom"}
    assert str(flows.SweepPointsFailed([*rows, failed], [failed])) == "1 of 2 sweep points failed: x: boom"


def test_sweep_rows_print_as_strict_json():
    # A diverged point's NaN WER was printed as a bare NaN, which JSON has not (JSON.parse, jq refuse it).
    from pipeline.__main__ import strict_json

    rows = [{"point": 1, "wer": float("nan"), "loss": float("inf"), "params": {"lr": 0.002}, "tags": ("a",)},
            {"point": 2, "wer": 0.25, "loss": 1.5, "params": {"lr": -float("inf")}, "tags": []}]
    assert strict_json(rows) == (
        '[\n  {\n    "point": 1,\n    "wer": null,\n    "loss": null,\n    "params": {\n      "lr": 0.002\n    },\n'
        '    "tags": [\n      "a"\n    ]\n  },\n  {\n    "point": 2,\n    "wer": 0.25,\n    "loss": 1.5,\n'
        '    "params": {\n      "lr": null\n    },\n    "tags": []\n  }\n]')

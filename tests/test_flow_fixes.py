"""The flows' names, overrides, ranking, retries and command-line errors, on real DVC repos and a
real Prefect server (the fixtures of test_flows.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import dvc, git, make_dvc_repo, section, tiny_params
from pipeline.config import FlowParams, SweepParams
from pipeline.dvc import DvcFailed, run_dvc
from pipeline.flows import DASK_SCHEDULER_ENV, experiment_name, hydra_value, point_name, sweep_overrides
from pipeline.report import rank_rows
from test_flows import api, experiments_of, free_port, prefect_env, run_flow  # noqa: F401 (a fixture)


def names_of(grid: list[dict], fixed: dict | None = None) -> list[str]:
    sweep = SweepParams(grid=grid, fixed=fixed or {}, seeds=[0], rank_by="wer")
    return [point_name(sweep, point) for point in sweep.points()]


def test_each_set_of_overrides_gets_its_own_experiment_name():
    # One augmentation off at a time: the old names were prob-0.0_seed-0 twice.
    assert names_of([{"featurize.augment.pitch.prob": [0.0]}, {"featurize.augment.noise.prob": [0.0]}]) == \
        ["featurize.augment.pitch.prob=0.0,train.seed=0", "featurize.augment.noise.prob=0.0,train.seed=0"]
    # A grid key that is also fixed was left out of the name: both points were seed-0.
    assert names_of([{"train.clip_grad_norm": [0.5]}, {"train.clip_grad_norm": [2.0]}],
                    {"train.clip_grad_norm": 1.0}) == \
        ["train.clip_grad_norm=0.5,train.seed=0", "train.clip_grad_norm=2.0,train.seed=0"]
    assert experiment_name(["featurize.augment.pitch.prob=0"]) != experiment_name(["featurize.augment.noise.prob=0"])
    # Fixed keys stay out of the readable part, so the hash of all the overrides tells points apart.
    lr = [{"train.lr": [0.001]}]
    assert names_of(lr, {"train.epochs": 1}) != names_of(lr, {"train.epochs": 2})
    # The order of --set does not make another experiment; characters git refuses are replaced, with the hash.
    assert experiment_name(["b.x=1", "a.y=2"]) == experiment_name(["a.y=2", "b.x=1"]) == "a.y=2,b.x=1"
    digest = hashlib.sha1(b"train.blank_penalty={mode: soft_ratio, weight: 0.5}").hexdigest()[:7]
    assert experiment_name(["train.blank_penalty={mode: soft_ratio, weight: 0.5}"]) == \
        f"train.blank_penalty=_mode_soft_ratio,_weight_0.5_-{digest}"
    fixed = hashlib.sha1(b"train.epochs=1\ntrain.lr=0.001\ntrain.seed=0").hexdigest()[:7]
    assert names_of([{"train.lr": [0.001]}], {"train.epochs": 1}) == [f"train.lr=0.001,train.seed=0-{fixed}"]


def test_sweep_values_are_written_in_hydras_grammar():
    assert sweep_overrides({"train.init_from": None, "train.specaugment.enabled": False, "train.freeze": ["front"],
                            "train.blank_penalty": {"mode": "soft_ratio", "weight": 0.5}, "manifest.text": "null"}) == \
        ["train.init_from=null", "train.specaugment.enabled=false", "train.freeze=[front]",
         "train.blank_penalty={mode:soft_ratio,weight:0.5}", "manifest.text='null'"]
    parser = OverridesParser.create()
    for value in [None, True, 3, 0.5, 1e-05, "none", "1.0", "it's", "a b", [1, "x"], {"a": [None, "b"]}]:
        assert parser.parse_overrides([f"k.k={hydra_value(value)}"])[0].value() == value, value


def test_rank_by_is_checked_and_more_is_better_ranks_first():
    with pytest.raises(ValueError, match=r"sweep.rank_by\n.*'wer', 'cer', 'sentence_accuracy', 'ctc_loss', "
                                         r"'greedy.wer', 'greedy.cer' or 'greedy.sentence_accuracy'"):
        section("flow", FlowParams, sweep={"rank_by": "wr"})
    rows = [{"experiment": "a", "test_sentence_accuracy": 0.5, "test_greedy_wer": 0.3},
            {"experiment": "b", "test_sentence_accuracy": None, "test_greedy_wer": None},
            {"experiment": "c", "test_sentence_accuracy": 0.9, "test_greedy_wer": 0.4}]
    assert [r["experiment"] for r in rank_rows(rows, "sentence_accuracy")] == ["c", "a", "b"]
    assert [r["experiment"] for r in rank_rows(rows, "greedy.wer")] == ["a", "c", "b"]


def test_seed_in_the_grid_or_fixed_and_an_unknown_timezone_are_refused():
    for sweep in ({"grid": [{"train.seed": [3]}]}, {"fixed": {"train.seed": 3}}):
        with pytest.raises(ValueError, match="train.seed: set the seeds in flow.sweep.seeds"):
            section("flow", FlowParams, sweep=sweep)
    with pytest.raises(ValueError, match="unknown time zone 'Europe/Pariss'"):
        section("flow", FlowParams, timezone="Europe/Pariss")


def test_the_dask_environment_variable_is_the_one_featurize_reads():
    from stages.featurize import DASK_SCHEDULER_ENV as read_by_featurize

    assert DASK_SCHEDULER_ENV == read_by_featurize == "CTCFLOW_DASK_SCHEDULER"


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory) -> Path:
    """A git + DVC repo of stages that fail in known ways, no training."""
    repo = tmp_path_factory.mktemp("small")
    stages = {"missing": {"cmd": "python -c \"open('nowhere.txt')\"", "deps": ["nowhere.txt"]},
              "killed": {"cmd": "python -c \"import os, signal; os.kill(os.getpid(), signal.SIGKILL)\""}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (repo / "params.yaml").write_text(yaml.safe_dump({"flow": tiny_params()["flow"]}))
    git("init", "-q", cwd=repo)
    dvc("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "stages that fail", cwd=repo)
    return repo


def dvc_failure(args: list[str], repo: Path) -> DvcFailed:
    with pytest.raises(DvcFailed) as failed:
        run_dvc(args, repo, log=lambda line: None)
    return failed.value


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_only_failures_that_can_pass_next_time_are_transient(small_repo, shell, monkeypatch):
    # DVC runs stage commands with $SHELL: bash execs the command (DVC says "exited with -9"), dash
    # runs it as a child and exits 128 + 9.
    monkeypatch.setenv("SHELL", shell)
    missing = dvc_failure(["repro", "--single-item", "missing"], small_repo)
    assert "nowhere.txt" in str(missing) and not missing.transient
    bad_name = dvc_failure(["exp", "run", "--temp", "--name", "bad name"], small_repo)
    assert "Invalid exp name" in str(bad_name) and not bad_name.transient
    bad_value = dvc_failure(["exp", "run", "--temp", "-S", "flow.retries=[1"], small_repo)
    assert not bad_value.transient
    killed = dvc_failure(["repro", "--single-item", "killed"], small_repo)
    assert ("exited with -9" in str(killed) or "exited with 137" in str(killed)) and killed.transient
    from dvc.lock import make_lock

    with make_lock(small_repo / ".dvc" / "tmp" / "lock", tmp_dir=small_repo / ".dvc" / "tmp"):
        locked = dvc_failure(["repro", "--single-item", "killed"], small_repo)
    assert "Unable to acquire lock" in str(locked) and locked.transient


def pipeline(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_ordinary_mistakes_are_one_line_errors(small_repo, tmp_path):
    assert one_line_error(pipeline("run", "--project-dir", str(tmp_path / "nonexistent"))) == \
        f"python -m pipeline run: error: --project-dir {tmp_path / 'nonexistent'}: no params.yaml there; " \
        "give the DVC project's root"
    assert one_line_error(pipeline("run", "--project-dir", str(small_repo), "--set", "flow.retries=[1")).startswith(
        "python -m pipeline run: error: --set 'flow.retries=[1': not a value `dvc exp run -S` takes:")
    assert one_line_error(pipeline("run", "--project-dir", str(small_repo), "--set", "flow.nokey=1")) == \
        "python -m pipeline run: error: --set flow.nokey=1: DVC would refuse it: Could not override " \
        "'flow.nokey'. To append to your config use +flow.nokey=1"
    assert one_line_error(pipeline("run", "--project-dir", str(small_repo), "--name", "x")) == \
        "python -m pipeline run: error: --name names the experiment that --set makes; without --set there is none"
    assert one_line_error(pipeline("run", "--project-dir", str(small_repo), "--set", "flow.retries=1",
                                   "--name", "bad name")).startswith(
        "python -m pipeline run: error: --name 'bad name': not a valid experiment name")
    assert one_line_error(pipeline("server", "--port", "99999")) == \
        "python -m pipeline server: error: argument --port: '99999' is not a TCP port (1-65535)"
    assert "the port it listens on" in pipeline("server", "--help").stdout
    assert pipeline("--help").stdout.startswith("usage: python -m pipeline ")
    script = Path(sys.executable).parent / "ctcflow-flow"
    if script.exists():  # the console script installed by pip install -e
        assert subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout.startswith(
            "usage: ctcflow-flow ")
    flow = tiny_params()["flow"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"flow": {**flow, "timezone": "Europe/Pariss"}}))
    assert "flow.timezone: Value error, unknown time zone 'Europe/Pariss'" in \
        pipeline("serve", "--project-dir", str(tmp_path)).stderr
    dead = f"http://127.0.0.1:{free_port()}/api"
    assert one_line_error(pipeline("run", "--project-dir", str(small_repo),
                                   env={**os.environ, "PREFECT_API_URL": dead})) == \
        f"python -m pipeline run: error: no Prefect server answers at PREFECT_API_URL = {dead} " \
        "(from the environment or the active Prefect profile): start it, or change or unset the setting"


def test_sweep_branch_is_checked_before_any_point_runs(small_repo):
    git("branch", "taken", cwd=small_repo)
    assert one_line_error(pipeline("sweep", "--project-dir", str(small_repo), "--branch", "taken")) == \
        "python -m pipeline sweep: error: --branch 'taken': the branch exists already; name another or delete " \
        "it (git branch -D taken)"
    assert one_line_error(pipeline("sweep", "--project-dir", str(small_repo), "--branch", "a..b")) == \
        "python -m pipeline sweep: error: --branch 'a..b': not a valid git branch name"
    assert dvc("exp", "list", "--name-only", cwd=small_repo).strip() == ""  # no point ran


def test_the_active_profiles_api_url_is_used(prefect_env, small_repo, tmp_path):  # noqa: F811
    # PREFECT_API_URL in a profile only, as `prefect config set` leaves it, not in the environment.
    env = {k: v for k, v in prefect_env.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-m", "prefect", "config", "set",
                           f"PREFECT_API_URL={prefect_env['PREFECT_API_URL']}"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (small_repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ok": {"cmd": "python -c pass"}}}))
    git("commit", "-qam", "a stage that passes", cwd=small_repo)
    done = pipeline("run", "--project-dir", str(small_repo), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "temporary" not in done.stderr
    runs = api(prefect_env["PREFECT_API_URL"], "/flow_runs/filter",
               {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert any(run["parameters"].get("project_dir") == str(small_repo) for run in runs)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The tiny project, run and committed: the run-cache the experiments restore upstream stages from."""
    params = tiny_params()
    # Two keys named seed, one of them the same value as the workspace's (restored from the run-cache).
    params["flow"]["sweep"] = {"grid": [{"train.clip_grad_norm": [0.5]}, {"train.warmup_steps": [-1]}],
                               "fixed": {"featurize.augment.seed": params["featurize"]["augment"]["seed"]},
                               "seeds": [0], "rank_by": "sentence_accuracy"}
    repo = make_dvc_repo(tmp_path_factory.mktemp("baseline"), params)
    dvc("repro", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "baseline", cwd=repo)
    return repo


def test_set_passes_null_and_dicts_as_dvc_exp_run_takes_them(prefect_env, baseline):  # noqa: F811
    done = run_flow(prefect_env, baseline, "--set", "train.init_from=null",
                    "--set", "train.blank_penalty={mode: soft_ratio, weight: 0.5}")
    assert done.returncode == 0, done.stdout + done.stderr
    name = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])["experiment"]
    train = experiments_of(baseline, prefect_env)[name]["data"]["params"]["params.yaml"]["data"]["train"]
    assert train["init_from"] is None
    assert (train["blank_penalty"]["mode"], train["blank_penalty"]["weight"]) == ("soft_ratio", 0.5)


def test_a_failed_point_is_a_row_and_the_others_are_ranked(prefect_env, baseline):  # noqa: F811
    done = pipeline("sweep", "--project-dir", str(baseline), env=prefect_env)
    assert done.returncode != 0
    rows = json.loads(done.stdout[done.stdout.index("[\n"):done.stdout.rindex("]") + 1])
    ok, failed = rows
    assert ok["train.clip_grad_norm"] == 0.5 and ok["error"] is None
    assert isinstance(ok["test_sentence_accuracy"], float) and isinstance(ok["test_wer"], float)
    # Distinct columns for the two seeds.
    assert (ok["train.seed"], ok["featurize.augment.seed"]) == (0, tiny_params()["featurize"]["augment"]["seed"])
    assert failed["train.warmup_steps"] == -1 and failed["test_wer"] is None
    assert failed["error"].startswith("ctcflow train: error:") and "warmup_steps" in failed["error"]
    assert f"1 of 2 sweep points failed: {failed['experiment']}: ctcflow train: error:" in done.stderr
    assert "AwaitingRetry" not in done.stdout + done.stderr
    artifacts = api(prefect_env["PREFECT_API_URL"], "/artifacts/filter",
                    {"artifacts": {"key": {"any_": ["sweep-ranking"]}}})
    assert any("ranked by test sentence_accuracy; 1 failed" in (a["description"] or "") for a in artifacts)

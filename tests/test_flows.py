"""The Prefect flows against a real Prefect server on loopback and a real DVC repo of the tiny project."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import dvc, git, make_dvc_repo, section, tiny_params
from ctcflow.params import ParamsError
from pipeline.config import FlowParams, SweepParams, load_flow_params
from pipeline.flows import experiment_name
from test_dask_featurize import dask_cluster

STAGES = ["synth", "manifest", "featurize", "train", "lm", "evaluate", "export", "plots"]


def test_sweep_points_are_the_union_of_block_products_without_repeats():
    sweep = SweepParams(grid=[{"train.blank_penalty.mode": ["none"]},
                              {"train.blank_penalty.mode": ["none", "soft_ratio"], "train.clip_grad_norm": [1.0]}],
                        fixed={"train.epochs": 2}, seeds=[0, 1], rank_by="wer")
    assert sweep.points() == [
        {"train.epochs": 2, "train.blank_penalty.mode": "none", "train.seed": 0},
        {"train.epochs": 2, "train.blank_penalty.mode": "none", "train.clip_grad_norm": 1.0, "train.seed": 0},
        {"train.epochs": 2, "train.blank_penalty.mode": "soft_ratio", "train.clip_grad_norm": 1.0, "train.seed": 0},
        {"train.epochs": 2, "train.blank_penalty.mode": "none", "train.seed": 1},
        {"train.epochs": 2, "train.blank_penalty.mode": "none", "train.clip_grad_norm": 1.0, "train.seed": 1},
        {"train.epochs": 2, "train.blank_penalty.mode": "soft_ratio", "train.clip_grad_norm": 1.0, "train.seed": 1},
    ]
    assert experiment_name(["train.clip_grad_norm=1.0", "train.blank_penalty.mode=none"]) == \
        "train.blank_penalty.mode=none,train.clip_grad_norm=1.0"


def test_a_bad_cron_or_grid_is_refused_up_front():
    with pytest.raises(ValueError, match="cron"):
        section("flow", FlowParams, cron="every day")
    with pytest.raises(ValueError, match="section.param"):
        section("flow", FlowParams, sweep={"grid": [{"epochs": [1]}]})


def test_a_missing_flow_key_is_an_error_naming_it(tmp_path):
    # params.yaml is the only home of these values: the schema has no fallback.
    flow = tiny_params()["flow"]
    del flow["cron"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"flow": flow}))
    with pytest.raises(ParamsError, match=r"flow\.cron: Field required"):
        load_flow_params(tmp_path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, path: str, body: dict | None = None) -> object:
    request = urllib.request.Request(f"{url}{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or "null")
        except urllib.error.HTTPError as err:
            # 503 is the server's "SQLite is locked, try again": Prefect's own client retries it too.
            if err.code != 503 or attempt == 5:
                raise
            time.sleep(2**attempt)


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    # A session of its own, so stop() ends the process and whatever it started (flow runs, dvc).
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def wait_for(what: str, check, timeout: float, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: process exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A real Prefect server on a free loopback port, with its own PREFECT_HOME."""
    home, port = tmp_path_factory.mktemp("prefect_home"), free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   env)
    try:
        wait_for("the Prefect server", lambda: api(env["PREFECT_API_URL"], "/health"), 120, server)
        yield env
    finally:
        stop(server)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_dvc_repo(tmp_path_factory.mktemp("flowrepo"), tiny_params())


def flow_run_state(url: str, run_id: str) -> dict:
    return api(url, f"/flow_runs/{run_id}")["state"]


def test_served_deployment_runs_the_pipeline_one_task_per_stage(prefect_env, project):
    url = prefect_env["PREFECT_API_URL"]
    serve = start([sys.executable, "-m", "pipeline", "serve", "--project-dir", str(project)], prefect_env)
    try:
        deployments = wait_for("the deployment", lambda: api(url, "/deployments/filter", {}), 120, serve)
        (deployment,) = deployments
        assert deployment["name"] == "nightly"
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

        run = api(url, f"/deployments/{deployment['id']}/create_flow_run", {})
        state = wait_for("the flow run to finish",
                         lambda: (s := flow_run_state(url, run["id"]))["type"] in
                         ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and s, 600, serve)
        assert state["type"] == "COMPLETED", state

        tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        names = sorted(t["name"] for t in tasks if not t["name"].startswith("publish_report"))
        assert names == sorted(STAGES)
        assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
        artifacts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["pipeline-report"]}}})
        assert any("metrics/eval.json" in a["data"] and "data:image/png;base64," in a["data"] for a in artifacts)
    finally:
        stop(serve)
    assert (project / "metrics/eval.json").is_file()


def run_flow(prefect_env, project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "--project-dir", str(project), *args],
                          env=prefect_env, capture_output=True, text=True, timeout=600)


def test_an_up_to_date_pipeline_runs_no_stage(prefect_env, project):
    dvc("repro", cwd=project)  # a no-op after the deployment's run; this test does not lean on it
    done = run_flow(prefect_env, project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1]) == \
        {stage: "up to date" for stage in STAGES}


def test_overrides_run_as_an_experiment_and_leave_the_workspace_clean(prefect_env, project):
    dvc("repro", cwd=project)  # the baseline, and the run-cache the experiments restore from
    git("add", "-A", cwd=project)
    git("commit", "-qm", "pipeline run", "--allow-empty", cwd=project)
    done = run_flow(prefect_env, project, "--set", "train.clip_grad_norm=0.5", "--name", "clip1")
    assert done.returncode == 0, done.stdout + done.stderr
    clip1 = experiments_of(project, prefect_env)["clip1"]["rev"]
    # The same name with other overrides is refused, and the experiment of that name is kept.
    done = run_flow(prefect_env, project, "--set", "train.clip_grad_norm=1.0", "--name", "clip1")
    assert done.returncode != 0
    assert "experiment 'clip1' exists with other params (train.clip_grad_norm: 0.5 there, 1.0 now)" in done.stderr
    assert "AwaitingRetry" not in done.stdout + done.stderr
    assert experiments_of(project, prefect_env)["clip1"]["rev"] == clip1
    # Other overrides, another experiment; the stages before train come from the run-cache.
    done = run_flow(prefect_env, project, "--set", "train.clip_grad_norm=1.0")
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout + done.stderr
    assert "Running stage 'train'" in log
    assert not any(f"Running stage '{stage}'" in log for stage in ("synth", "manifest", "featurize", "lm")), log
    # The same overrides and name again replace the experiment (once the new run has worked).
    done = run_flow(prefect_env, project, "--set", "train.clip_grad_norm=0.5", "--name", "clip1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert git("status", "--porcelain", cwd=project) == ""
    experiments = experiments_of(project, prefect_env)
    assert experiments["clip1"]["rev"] != clip1
    assert "clip1-rerun" not in experiments
    assert experiments["clip1"]["data"]["params"]["params.yaml"]["data"]["train"]["clip_grad_norm"] == 0.5
    assert experiments["train.clip_grad_norm=1.0"]["data"]["params"]["params.yaml"]["data"]["train"][
        "clip_grad_norm"] == 1.0
    assert "metrics/eval.json" in experiments["clip1"]["data"]["metrics"]


def experiments_of(project: Path, env: dict) -> dict[str, dict]:
    """The experiments of the current baseline by name, as `dvc exp show --json` lists them."""
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project,
                           capture_output=True, text=True, env=env)
    return {rev["name"]: rev for baseline in json.loads(shown.stdout)
            for exp in baseline.get("experiments") or [] for rev in exp["revs"]}


def test_a_stage_error_fails_the_flow_with_the_stage_message_and_no_retry(prefect_env, project):
    done = run_flow(prefect_env, project, "--set", "train.epochs=0")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "ctcflow train: error:" in output and "train.epochs" in output
    assert "AwaitingRetry" not in output  # a bad param is not retried
    assert git("status", "--porcelain", cwd=project) == ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is done
    except FileNotFoundError:
        return False


def descendants(pid: int) -> set[int]:
    """The processes under pid: its children, theirs and so on, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def terminate_and_expect_gone(command: subprocess.Popen, started: set[int]) -> None:
    os.kill(command.pid, signal.SIGTERM)  # the command only, as a service manager would
    command.wait(60)
    deadline = time.monotonic() + 30
    while (left := [command_line(pid) for pid in started if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"still running 30 s after the command stopped: {left}"


def kill_left_over(started: set[int]) -> None:
    for pid in started:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stopping_the_server_command_stops_the_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = start([sys.executable, "-m", "pipeline", "server", "--port", str(port)], env)
    started: set[int] = set()
    try:
        wait_for("the server", lambda: api(f"http://127.0.0.1:{port}/api", "/health"), 120, command)
        started = descendants(command.pid)
        assert any("prefect server start" in command_line(pid) for pid in started), started
        terminate_and_expect_gone(command, started)
    finally:
        stop(command)
        kill_left_over(started)


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
        return True
    except OSError:
        return False


def test_stopping_a_run_stops_the_stage_under_it_and_the_temporary_server(tmp_path):
    if answers("http://127.0.0.1:4200/api/health"):
        pytest.skip("a Prefect server answers on 127.0.0.1:4200: `pipeline run` would use it, not a temporary one")
    repo = tmp_path / "slow"
    repo.mkdir()
    stage = "python -c \"import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(600)\""
    (repo / "dvc.yaml").write_text(json.dumps({"stages": {"wait": {"cmd": stage}}}))
    (repo / "params.yaml").write_text(yaml.safe_dump({"flow": tiny_params()["flow"]}))
    git("init", "-q", cwd=repo)
    dvc("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "a stage that waits", cwd=repo)
    # No PREFECT_API_URL and no server on the default port: the run starts Prefect's temporary one.
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    flow = start([sys.executable, "-m", "pipeline", "run", "--project-dir", str(repo)], env)
    started: set[int] = set()
    try:
        pid = wait_for("the stage to start", lambda: (repo / "pid").is_file() and (repo / "pid").read_text(),
                       300, flow)
        started = descendants(flow.pid)
        assert int(pid) in started
        assert any("uvicorn" in command_line(p) and "prefect.server" in command_line(p) for p in started), \
            [command_line(p) for p in started]
        terminate_and_expect_gone(flow, started)
    finally:
        stop(flow)
        kill_left_over(started)


def test_sweep_ranks_its_experiments_and_keeps_the_best_as_a_branch(prefect_env, tmp_path):
    params = tiny_params()
    params["flow"]["sweep"] = {"grid": [{"train.clip_grad_norm": [0.5, 2.0]}], "fixed": {"train.epochs": 1},
                               "seeds": [0], "rank_by": "wer"}
    repo = make_dvc_repo(tmp_path / "sweep", params)
    dvc("repro", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "baseline", cwd=repo)
    done = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--project-dir", str(repo), "--branch", "best"],
                          env=prefect_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(done.stdout[done.stdout.index("[\n"):])
    assert sorted(row["train.clip_grad_norm"] for row in rows) == [0.5, 2.0]
    assert [row["test_wer"] for row in rows] == sorted(row["test_wer"] for row in rows)
    for row in rows:
        assert all(isinstance(row[k], float) for k in ("test_wer", "test_cer", "test_greedy_wer", "train_loss",
                                                        "train_ctc_loss", "valid_blank_ratio", "test_blank_ratio"))
    artifacts = api(prefect_env["PREFECT_API_URL"], "/artifacts/filter", {"artifacts": {"key": {"any_": ["sweep-ranking"]}}})
    assert artifacts and artifacts[0]["type"] == "table"
    best = git("show", "best:params.yaml", cwd=repo)
    assert f"clip_grad_norm: {rows[0]['train.clip_grad_norm']}" in best
    assert git("status", "--porcelain", cwd=repo) == ""


def test_a_sweep_sends_featurize_to_the_dask_address(prefect_env, tmp_path):
    params = tiny_params()
    params["flow"]["sweep"] = {"grid": [{"featurize.n_mels": [40]}], "fixed": {}, "seeds": [0], "rank_by": "wer"}
    repo = make_dvc_repo(tmp_path / "sweep", params)
    dvc("repro", "manifest", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "manifests", cwd=repo)
    params_yaml = (repo / "params.yaml").read_bytes()
    # Nothing answers at this address, so the experiment's featurize stage can only fail on it.
    unreachable = f"tcp://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--project-dir", str(repo),
                           "--dask-address", unreachable],
                          env={**prefect_env, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert f"CTCFLOW_DASK_SCHEDULER = {unreachable}: no Dask scheduler answered" in done.stdout + done.stderr
    assert "1 of 1 sweep points failed" in done.stderr
    assert (repo / "params.yaml").read_bytes() == params_yaml
    assert git("status", "--porcelain", cwd=repo) == ""


def test_a_dask_address_featurizes_on_the_cluster_and_changes_no_stage_state(prefect_env, tmp_path):
    repo = make_dvc_repo(tmp_path / "repo", tiny_params())
    dvc("repro", "manifest", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "manifests", cwd=repo)
    params_yaml = (repo / "params.yaml").read_bytes()

    # The address reaches the featurize stage that `dvc repro` runs: nothing answers at this one.
    unreachable = f"tcp://127.0.0.1:{free_port()}"
    done = run_flow({**prefect_env, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}, repo,
                    "--dask-address", unreachable)
    assert done.returncode != 0
    assert f"ctcflow featurize: error: CTCFLOW_DASK_SCHEDULER = {unreachable}: no Dask scheduler answered" in \
        done.stdout + done.stderr
    assert (repo / "params.yaml").read_bytes() == params_yaml  # put back after a failed run too

    with dask_cluster(tmp_path, [repo, repo], pythonpath=repo) as address:  # the code the stage runs
        done = run_flow(prefect_env, repo, "--dask-address", address)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"featurize: on the Dask cluster at {address} (2 workers)" in output
    assert "Running stage 'featurize'" in output and "Running stage 'train'" in output
    assert (repo / "params.yaml").read_bytes() == params_yaml
    assert json.loads(dvc("status", "--json", cwd=repo)) == {}
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "pipeline run, featurized on Dask", cwd=repo)
    # The local executor writes the bytes the cluster wrote: dvc.lock records the same hashes.
    dvc("repro", "--force", "--single-item", "featurize", cwd=repo)
    assert git("status", "--porcelain", cwd=repo) == ""

    # An experiment gets them as `dvc exp run -S`, and they rerun nothing: featurize comes from the
    # run-cache (the cluster is gone by now, so a featurize run would fail).
    done = run_flow(prefect_env, repo, "--set", "train.clip_grad_norm=0.5", "--name", "on_dask", "--dask-address",
                    address)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Running stage 'train'" in output
    assert not any(f"Running stage '{stage}'" in output for stage in ("synth", "manifest", "featurize")), output
    # The address is a runtime knob of this run only: the experiment keeps the workspace's executor,
    # so applying it (or keeping it as a branch) needs no cluster.
    featurize = experiments_of(repo, prefect_env)["on_dask"]["data"]["params"]["params.yaml"]["data"]["featurize"]
    assert (featurize["executor"], featurize["scheduler_address"]) == ("local", None)
    assert git("status", "--porcelain", cwd=repo) == ""


def test_an_edit_to_params_yaml_during_a_dask_run_is_kept(prefect_env, tmp_path):
    repo = make_dvc_repo(tmp_path / "repo", tiny_params())
    dvc("repro", "manifest", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "manifests", cwd=repo)
    unreachable = f"tcp://127.0.0.1:{free_port()}"
    flow = start([sys.executable, "-m", "pipeline", "run", "--project-dir", str(repo), "--dask-address", unreachable],
                 {**prefect_env, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "20s"})
    try:
        output = []
        for line in flow.stdout:  # featurize now waits on the scheduler that is not there
            output.append(line)
            if "Running stage 'featurize'" in line:
                break
        params = (repo / "params.yaml").read_text()
        assert "executor: local" in params  # the address is not written into params.yaml
        (repo / "params.yaml").write_text(params.replace("\n  epochs: 1\n", "\n  epochs: 3\n"))
        output.append(flow.stdout.read())
        assert flow.wait(120) != 0
    finally:
        stop(flow)
    assert "no Dask scheduler answered" in "".join(output)
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"] == 3

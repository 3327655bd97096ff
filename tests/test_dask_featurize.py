"""featurize.executor: dask, on a real Dask cluster of `dask scheduler` and `dask worker` processes
on 127.0.0.1, and on the local cluster Dask starts itself: the same bytes as the local executor."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import pytest
import yaml
from distributed import Client

from conftest import REPO, merge, run_python, section, tiny_params
from ctcflow.workers import WorkerError, dask_map
from stages import featurize


def linked_project(tiny_pipeline: Path, root: Path) -> Path:
    """A project at root with the tiny project's manifests and audio (linked), for a featurize run."""
    (root / "data").mkdir(parents=True)
    for name in ("manifests", "corpus", "test_sets"):
        (root / "data" / name).symlink_to(tiny_pipeline / "data" / name)
    return root


def featurize_stage(project: Path, **overrides) -> dict[str, bytes]:
    """`python -m stages.featurize` in the project, as DVC runs it, with these featurize params:
    every file it wrote, with its bytes."""
    params = tiny_params()
    params["featurize"] = merge(params["featurize"], overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_python(["-m", "stages.featurize"], project)
    return outputs(project)


def outputs(project: Path) -> dict[str, bytes]:
    files = sorted((project / "data/features").rglob("*")) + [project / "metrics/featurize.json"]
    return {path.relative_to(project).as_posix(): path.read_bytes() for path in files if path.is_file()}


def featurize_here(root: Path, out: Path, **overrides) -> None:
    """The stage's run() in this process, from the project's root (the manifests name the audio
    relative to it), its outputs under out."""
    params = section("featurize", featurize.FeaturizeParams, **overrides)
    with contextlib.chdir(root):
        featurize.run(params, manifest_dir=root / "data/manifests", out_dir=out / "features",
                      metrics_file=out / "featurize.json")


def assert_same_files(got: dict[str, bytes], expected: dict[str, bytes]) -> None:
    assert "data/features/features.json" in expected and "metrics/featurize.json" in expected
    assert got.keys() == expected.keys()
    different = [name for name in got if got[name] != expected[name]]
    assert not different, f"not byte-identical to the local executor's run: {different}"


def start(args: list[str], cwd: Path, log: Path, pythonpath: Path) -> subprocess.Popen:
    """A `dask` command in a process group of its own (the worker's nanny starts a child)."""
    with log.open("w") as output:
        return subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=cwd, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(pythonpath)},
                                stdout=output, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(20)


def read_address(scheduler_file: Path, scheduler: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):  # not there, or half written
            return json.loads(scheduler_file.read_text())["address"]
        assert scheduler.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


@contextlib.contextmanager
def dask_cluster(tmp: Path, worker_dirs: list[Path], pythonpath: Path = REPO) -> Iterator[str]:
    """A `dask scheduler` and one `dask worker` (one thread) started in each of worker_dirs, all on
    127.0.0.1 and importing the project from pythonpath; yields the scheduler's address once every
    worker has joined. Stops them all, always."""
    scheduler_file = tmp / "scheduler.json"
    processes = []
    try:
        processes.append(start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                "--scheduler-file", str(scheduler_file)], tmp, tmp / "scheduler.log", pythonpath))
        address = read_address(scheduler_file, processes[0], tmp / "scheduler.log")
        for number, directory in enumerate(worker_dirs):
            processes.append(start(["worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                                    "--name", f"worker{number}"], directory, tmp / f"worker{number}.log",
                                   pythonpath))
        with Client(address) as client:
            client.wait_for_workers(len(worker_dirs), timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            stop(process)


@pytest.fixture(scope="module")
def local_run_with_copies(tiny_pipeline, tmp_path_factory) -> dict[str, bytes]:
    # One augmented copy: the copies' tasks carry every training path, and draw babble from them.
    project = linked_project(tiny_pipeline, tmp_path_factory.mktemp("local"))
    return featurize_stage(project, augment={"copies": 1}, executor="local", num_workers=1)


def test_a_real_dask_cluster_writes_the_bytes_of_the_local_executor(tiny_pipeline, local_run_with_copies, tmp_path):
    project = linked_project(tiny_pipeline, tmp_path / "project")
    with dask_cluster(tmp_path, [project, project]) as address:
        on_cluster = featurize_stage(project, augment={"copies": 1}, executor="dask", scheduler_address=address)
    assert_same_files(on_cluster, local_run_with_copies)


def test_a_local_dask_cluster_writes_the_bytes_of_the_local_executor(tiny_pipeline, tmp_path):
    # scheduler_address null: Dask starts a cluster of featurize.num_workers processes itself.
    on_cluster = featurize_stage(linked_project(tiny_pipeline, tmp_path), executor="dask", scheduler_address=None,
                                 num_workers=2)
    assert_same_files(on_cluster, outputs(tiny_pipeline))  # the tiny pipeline's run: executor local, 1 worker


def test_an_unreachable_scheduler_is_a_clear_error_naming_the_key(tiny_pipeline, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(WorkerError, match=rf"featurize.scheduler_address = {address}: no Dask scheduler answered "
                                              r"\(Timed out .* after 2 s\); start one .* featurize.executor: local"):
            featurize_here(tiny_pipeline, tmp_path, executor="dask", scheduler_address=address)


def test_an_unreachable_scheduler_from_the_environment_names_the_variable(tiny_pipeline, tmp_path, monkeypatch):
    # It named featurize.scheduler_address and said "set featurize.executor: local", neither of
    # which the run used: the flows' --dask-address travels as this variable.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv(featurize.DASK_SCHEDULER_ENV, address)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(WorkerError, match=rf"^CTCFLOW_DASK_SCHEDULER = {address}: no Dask scheduler answered "
                                              r"\(Timed out .* after 2 s\); start one .* or unset CTCFLOW_DASK_SCHEDULER$"):
            featurize_here(tiny_pipeline, tmp_path)


def test_a_cluster_running_another_checkout_is_named_before_any_work(tiny_pipeline, tmp_path):
    # The scheduler unpickles the tasks and the workers run them: from another checkout of the
    # project, they would fail on a function it lacks, or run other code.
    other_checkout = tmp_path / "other_checkout"
    for package in ("ctcflow", "stages"):
        shutil.copytree(REPO / package, other_checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
    with dask_cluster(tmp_path, [tiny_pipeline], pythonpath=other_checkout) as address:
        with pytest.raises(WorkerError, match=rf"featurize.scheduler_address = {address}: the Dask scheduler "
                                              rf"imports stages.featurize from {other_checkout}/stages/featurize.py, "
                                              rf"this process from {REPO}/stages/featurize.py; run the scheduler"):
            featurize_here(tiny_pipeline, tmp_path, executor="dask", scheduler_address=address)


def test_a_worker_started_in_another_directory_is_a_clear_error(tiny_pipeline, tmp_path):
    # The manifests' paths are relative to the project root: a worker elsewhere would reject every file.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with dask_cluster(tmp_path, [elsewhere]) as address:
        with pytest.raises(WorkerError, match=rf"featurize.scheduler_address = {address}: a Dask worker runs in "
                                              rf"{elsewhere}, the stage in {tiny_pipeline}; the files' paths"):
            featurize_here(tiny_pipeline, tmp_path, executor="dask", scheduler_address=address)


def test_workers_that_keep_dying_are_a_clear_error_not_a_hang():
    # Each call ends its worker process; Dask restarts it and retries the task, then gives up.
    with pytest.raises(WorkerError, match=r"x.scheduler_address = null \(a local Dask cluster of x.num_workers = 1\): "
                                          r"Dask workers died running these tasks .*too little memory"):
        with dask_map(None, 1, "x", "os", max_chunk=1) as map_files:
            list(map_files(os._exit, [1, 1]))

"""The ordered map over worker processes that manifest and featurize share."""

import math
import os
import signal

import pytest
import yaml
from conftest import interrupt_when_ready

from ctcflow.workers import WorkerError, ordered_map


@pytest.mark.parametrize("workers", [1, 2])
def test_results_keep_the_order_of_the_items_across_calls(workers):
    with ordered_map(workers, "x.num_workers", "math", max_chunk=4) as map_files:
        assert list(map_files(math.isqrt, [n * n for n in range(50)])) == list(range(50))
        assert list(map_files(math.floor, [2.5, 0.5])) == [2, 0]  # the same pool serves a second call


def test_a_worker_that_dies_is_a_clear_error_not_a_hang():
    with pytest.raises(WorkerError, match=r"worker process of manifest.num_workers = 2 died .*manifest.num_workers: 1 "):
        with ordered_map(2, "manifest.num_workers", "os", max_chunk=1) as map_files:
            list(map_files(os._exit, [1, 1, 1, 1]))  # each call ends its process


# A stage whose map runs in 2 workers. Each chunk marks its worker and waits for the other one, so
# both workers are up and have run a chunk; then `ready` is written: by a worker before its long
# chunk (busy), or by the stage once the map is done and the workers wait for more (idle).
CTRL_C_STAGE = """
import os, sys, time
from pathlib import Path
from ctcflow.params import Section
from ctcflow.workers import ordered_map
from stages.runner import stage_main

class P(Section):
    busy: bool
    dir: str

def work(item):
    workers, seconds = item
    Path(workers, str(os.getpid())).touch()
    while len(os.listdir(workers)) < 2:
        time.sleep(0.01)
    if seconds:
        Path(workers, "..", "ready").touch()
    time.sleep(seconds)

def run(params):
    workers = Path(params.dir, "workers")
    workers.mkdir()
    with ordered_map(2, "demo.num_workers", "os", max_chunk=1) as map_files:
        if params.busy:
            list(map_files(work, [(str(workers), 600)] * 8))
        else:
            list(map_files(work, [(str(workers), 0)] * 2))
            Path(params.dir, "ready").touch()
            time.sleep(600)

if __name__ == "__main__":
    stage_main("demo", P, run, None, ["--params", sys.argv[1]])
"""


@pytest.mark.parametrize("busy", [False, True], ids=["workers-idle", "workers-busy"])
def test_ctrl_c_with_workers_is_the_stage_s_one_line(tmp_path, busy):
    # A terminal's Ctrl-C sends SIGINT to the whole process group: the workers too. Idle ones used
    # to print a KeyboardInterrupt traceback each; busy ones went on with the chunks queued for them
    # before the stage could exit. Now only the stage's line, and it still dies of SIGINT.
    (tmp_path / "stage.py").write_text(CTRL_C_STAGE)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"demo": {"busy": busy, "dir": str(tmp_path)}}))
    returncode, err = interrupt_when_ready([str(tmp_path / "stage.py"), str(tmp_path / "params.yaml")], tmp_path,
                                           (tmp_path / "ready").exists)
    assert "Traceback" not in err, err
    assert err == "ctcflow demo: interrupted\n"
    assert returncode == -signal.SIGINT

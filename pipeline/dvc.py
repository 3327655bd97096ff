"""The DVC commands the flows run, as subprocesses.

The flows call the `dvc` command line rather than DVC's Python internals: the CLI is DVC's
stable interface, and a subprocess keeps DVC's locks and state out of the Prefect worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

# A stage that fails on its own terms exits with this prefix (stages.runner.stage_main): bad params
# or missing inputs, which a retry cannot fix, whatever words its message holds.
STAGE_ERROR_PREFIX = "ctcflow "
# What DVC, git or the system print for a failure that can pass on a second try: DVC's lock or
# git's index lock held by another process, a lost or refused connection (a remote).
TRANSIENT_MARKERS = ("Unable to acquire lock", "index.lock", "Connection", "connection", "timed out",
                     "Temporary failure")
# A stage's command killed by a signal (the OOM killer, a timeout): DVC says "exited with -9" where
# the shell ($SHELL) execs the command, "exited with 137" (128 + 9) where the shell runs it as a child.
KILLED_BY_SIGNAL = re.compile(r"exited with (-\d+|1(29|[3-8]\d|9[0-2]))\b")
# DVC's own words for an up-to-date stage.
UP_TO_DATE = "didn't change, skipping"


class DvcFailed(RuntimeError):
    """A dvc command exited non-zero; the message ends with the command's own last lines."""

    def __init__(self, args: list[str], returncode: int, tail: list[str]):
        self.args_run, self.returncode, self.tail = args, returncode, tail
        super().__init__(f"`dvc {' '.join(args)}` exited with {returncode}:\n" + "\n".join(tail))

    @property
    def transient(self) -> bool:
        """Worth a retry only if it can pass the next time (see TRANSIENT_MARKERS), or dvc or a
        stage's command was killed by a signal. Anything else (a stage's own error, a missing input, a bad experiment
        name or --set value) fails the same way again."""
        if any(line.startswith(STAGE_ERROR_PREFIX) and ": error:" in line for line in self.tail):
            return False
        return self.returncode < 0 or any(
            KILLED_BY_SIGNAL.search(line) or any(marker in line for marker in TRANSIENT_MARKERS) for line in self.tail)


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for dvc and the stages it runs, with `extra` (runtime knobs)."""
    # Stage commands call `python`: make it this interpreter, whose environment has the deps.
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "TQDM_DISABLE": "1",
            **(extra or {})}


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 15) -> None:
    """Interrupt a process group (a dvc command and the stage command under it, a server), as
    Ctrl-C would; kill what is left after the grace period. For a flow or command that is being
    stopped (Prefect turns SIGTERM into an exception, Ctrl-C is one): without this, what it started
    would run on as orphans."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def run_dvc(args: list[str], project_dir: str | Path, log: Callable[[str], None] = print,
            tail_lines: int = 30, env: dict[str, str] | None = None) -> str:
    """Run `dvc ARGS` in project_dir, passing each output line to `log` as it comes; return the output.
    env: variables added to this process's environment, for dvc and the stages it runs."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args], cwd=project_dir, env=dvc_env(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,  # a process group of its own, which stop_process_group stops as a whole
    )
    lines = []
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line.strip():
                log(line)
        process.wait()
    finally:
        if process.poll() is None:  # interrupted or stopped while dvc runs
            stop_process_group(process)
    if process.returncode != 0:
        raise DvcFailed(args, process.returncode, [ln for ln in lines if ln.strip()][-tail_lines:])
    return "\n".join(lines)


def dvc_json(args: list[str], project_dir: str | Path) -> object:
    """A dvc command with --json output, parsed; a failure raises DvcFailed with DVC's message."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], cwd=project_dir,
                          env=dvc_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise DvcFailed(args, done.returncode, (done.stdout + done.stderr).strip().splitlines()[-30:])
    return json.loads(done.stdout or "null")


def pipeline_stages(project_dir: str | Path) -> list[str]:
    """The stages of dvc.yaml in the order they are declared, which is the pipeline's order."""
    return list((yaml.safe_load((Path(project_dir) / "dvc.yaml").read_text()) or {}).get("stages") or {})

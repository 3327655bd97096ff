"""Shared fixtures: a tiny project (real espeak audio, a few utterances) run through every stage."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Real recordings, read by tests only: the product never reads this folder. Default: the shared/
# folder beside the clone, as the developers' machines and CI lay it out.
FSDD = Path(os.environ.get("CTCFLOW_FSDD_RECORDINGS", REPO.parent / "shared" / "corpora" / "fsdd" / "recordings"))

# The project's own params.yaml, shrunk: a few utterances, one short epoch of a small model.
TINY_OVERRIDES = {
    "synth": {"num_workers": 1, "splits": {"train": {"utterances": 30, "speakers": 6, "word_lists": 0},
                                           "valid": {"utterances": 6, "speakers": 2, "word_lists": 0},
                                           "test": {"utterances": 6, "speakers": 2, "word_lists": 0}}},
    # The tiny project featurizes its clean split only; test_featurize_augment sets the copies itself.
    "featurize": {"augment": {"copies": 0}},
    "train": {"epochs": 1, "warmup_steps": 0, "batch_frames": 6000,
              "model": {"hidden_size": 32, "num_layers": 1, "conv_channels": 32}},
    "evaluate": {"num_examples": 3},
    "flow": {"retry_delay_seconds": 1},
}


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def tiny_params() -> dict:
    return merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_OVERRIDES)


def section(name: str, schema, **overrides):
    """One section of the tiny project's params, validated by its stage's schema, with overrides
    merged in: the values come from params.yaml, their one home, as a stage would read them."""
    return schema.model_validate(merge(tiny_params()[name], overrides))


def tiny_tokenizer():
    """The tiny project's label units: the characters of manifest.alphabet, the blank at
    train.ctc.blank (' = 0, space = 1, a–z = 2…27, blank = 28)."""
    from ctcflow.text import Tokenizer

    params = tiny_params()
    return Tokenizer(params["manifest"]["alphabet"], params["train"]["ctc"]["blank"], "char")


def frame_log_probs(tokenizer, *columns: dict[str, float]):
    """(1, frames, classes) log-probabilities, one frame per dict {unit or "blank": probability};
    the rest of each frame's mass is spread thin over the other classes."""
    import torch

    out = torch.full((1, len(columns), tokenizer.num_classes), 1e-4)
    for t, column in enumerate(columns):
        for name, p in column.items():
            out[0, t, tokenizer.blank if name == "blank" else tokenizer.encode(name)[0]] = p
    return (out / out.sum(-1, keepdim=True)).log()


def write_word_lm(directory: Path, corpus: list[str], tokenizer) -> Path:
    """A trigram word LM and a lexicon of `corpus`'s words spelled in `tokenizer`'s units, as the lm stage writes them."""
    from ctcflow.lm import kneser_ney, write_arpa, write_lexicon

    logprob, backoff = kneser_ney([s.split() for s in corpus], 3)
    write_arpa(directory / "lm.arpa", logprob, backoff)
    write_lexicon(directory / "lexicon.txt", [w for s in corpus for w in s.split()], tokenizer)
    return directory


def run_ctcflow(capsys, *args: str) -> tuple[int, str, str]:
    """`ctcflow ARGS` in this process (a subprocess would spend seconds importing torch): exit code, stdout, stderr."""
    from stages.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
        print(exit.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def make_project(root: Path, params: dict | None = None) -> Path:
    """A directory laid out like the repo: params.yaml, the grammar the synth stage reads, and the
    folder of extra test sets (a dvc.yaml dep)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "data" / "demo_grammar.yaml", root / "data" / "demo_grammar.yaml")
    shutil.copytree(REPO / "data" / "test_sets", root / "data" / "test_sets", dirs_exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    return root


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """Every stage, in order, on the tiny project; tests read what the stages wrote."""
    from stages import evaluate, featurize, lm, manifest, plots, train

    root = make_project(tmp_path_factory.mktemp("tiny"))
    synth_in_fresh_process(["--params", "params.yaml"], root)
    with contextlib.chdir(root):
        for stage in (manifest, featurize, lm, train, evaluate, plots):
            stage.main(["--params", "params.yaml"])
    return root


def run_python(args: list[str], cwd: Path) -> str:
    """This interpreter, with the repository importable, in a process of its own; its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def interrupt_when_ready(args: list[str], cwd: Path, ready: Callable[[], bool]) -> tuple[int, str]:
    """Python with `args` in a process group of its own, sent SIGINT (a terminal's Ctrl-C reaches
    the whole group) once ready() is true; its return code and stderr. A hung group is killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "never ready to interrupt"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, err


def synth_in_fresh_process(args: list[str], cwd: Path) -> None:
    """The synth stage in a process of its own, as DVC runs it. Its pool forks the calling process
    (espeak's state must be inherited unspoken), and a fork of the test runner, which by then runs
    threads of its own, can leave a child deadlocked on a lock one of them held."""
    run_python(["-m", "stages.synth", *args], cwd)


def run(cmd: list[str], cwd: Path) -> str:
    # Stage commands call `python`: make it this interpreter, whose environment has the deps.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(*args: str, cwd: Path) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd)


def git(*args: str, cwd: Path) -> str:
    return run(["git", "-c", "user.name=ctcflow-test", "-c", "user.email=test@example.invalid", *args], cwd)


def make_dvc_repo(root: Path, params: dict | None = None) -> Path:
    """The tiny project as a real git + DVC repo with the project's code, committed."""
    make_project(root, params)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for package in ("stages", "ctcflow", "pipeline"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    git("init", "-q", cwd=root)
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "tiny project", cwd=root)
    return root

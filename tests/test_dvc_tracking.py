"""DVC tracks exactly what changes a stage's results: the code it runs, the params that matter.

The deps of each stage are checked against the modules its command really imports; the params
against params.yaml; and a real DVC repo of the tiny project shows which stages a changed knob
makes stale. The layering rule (ctcflow imports nothing from stages or pipeline) rides on the
same import walk.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, dvc, make_dvc_repo
from ctcflow.params import flatten

STAGES = ["synth", "manifest", "featurize", "train", "lm", "evaluate", "export", "plots"]
PROJECT_PACKAGES = ("ctcflow", "stages")

# Knobs that change how a stage runs, not what it writes: DVC does not track them. Each value is
# one that differs from the tiny project's (tests/conftest.py), for the DVC test below.
RUNTIME_KNOBS = {
    "synth.num_workers": 2,
    "manifest.num_workers": 1,
    "featurize.num_workers": 2,
    "featurize.num_threads": 2,
    "featurize.executor": "dask",
    "featurize.scheduler_address": "tcp://127.0.0.1:8786",
    "train.resume": False,
    # How to run, not what to learn; another count changes the last digits of the weights
    # (threads) or the random streams (processes), as another machine does.
    "train.num_threads": 1,
    "train.nproc": 2,
    "train.device": "cuda",
    "train.loader_workers": 2,
    "train.checkpoint_every": 7,
    "evaluate.num_threads": 1,
    "export.num_threads": 1,
}


def dvc_stages(root: Path = REPO) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


# --- deps: the code a stage runs -------------------------------------------------------------


def module_file(name: str) -> Path | None:
    """The file of a project module or package, or None when the name is not one (a class, say)."""
    path = REPO.joinpath(*name.split("."))
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.is_file()), None)


def imported_modules(path: Path) -> set[str]:
    """Every module an import in this file names, as an absolute name: imports at the top and inside
    functions, relative ones resolved, and import_module("name") / __import__("name")."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = parts[:-1]  # of a package's __init__ as of a module: the package its relative imports start from
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[:len(package) - node.level + 1] if node.level else ()
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.add(base)
            # `from package import module` imports the module as well.
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names.add(node.args[0].value)
    return names - {""}


def files_run_by(stage: str) -> dict[str, str]:
    """Every project file `python -m stages.STAGE` executes, each with the module that imports it:
    the stage module, what it imports, directly or not, and the __init__ of every package on the way."""
    reached: dict[str, str] = {}
    todo = [(f"stages.{stage}", f"python -m stages.{stage}")]
    while todo:
        name, importer = todo.pop()
        if name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        prefixes = name.split(".")
        for i in range(1, len(prefixes) + 1):  # a package's __init__ runs before its modules
            path = module_file(".".join(prefixes[:i]))
            if path is None:
                continue
            file = path.relative_to(REPO).as_posix()
            if file not in reached:
                reached[file] = importer
                todo.extend((imported, file) for imported in imported_modules(path))
    return reached


def covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_depends_on_every_module_it_runs(stage):
    deps = dvc_stages()[stage]["deps"]
    missing = {file: importer for file, importer in files_run_by(stage).items()
               if not any(covers(dep, file) for dep in deps)}
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps on: " + ", ".join(
        f"{file} (imported by {importer})" for file, importer in sorted(missing.items()))


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_depends_on_no_code_it_does_not_run(stage):
    # A dep on code the stage never runs would rerun it, and everything after it, for nothing.
    run = files_run_by(stage)
    extra = [dep for dep in dvc_stages()[stage]["deps"]
             if dep.split("/")[0] in PROJECT_PACKAGES and dep not in run]
    assert not extra, f"dvc.yaml stage {stage!r} depends on code it never imports: {', '.join(extra)}"


def test_the_import_walk_follows_relative_and_function_level_imports(tmp_path, monkeypatch):
    # The walk itself, on a made-up project: what a stage reaches only this way must count too.
    (tmp_path / "stages").mkdir()
    (tmp_path / "ctcflow").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "demo.py").write_text("from .helper import x\n")
    (tmp_path / "stages" / "helper.py").write_text("def x():\n    from ctcflow import late\n")
    (tmp_path / "ctcflow" / "__init__.py").write_text("")
    (tmp_path / "ctcflow" / "late.py").write_text("import importlib\nimportlib.import_module('ctcflow.dynamic')\n")
    (tmp_path / "ctcflow" / "dynamic.py").write_text("import numpy\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert files_run_by("demo") == {
        "stages/__init__.py": "python -m stages.demo", "stages/demo.py": "python -m stages.demo",
        "stages/helper.py": "stages/demo.py", "ctcflow/__init__.py": "stages/helper.py",
        "ctcflow/late.py": "stages/helper.py", "ctcflow/dynamic.py": "ctcflow/late.py"}


# --- layering ---------------------------------------------------------------------------------


def test_ctcflow_imports_nothing_from_stages_or_pipeline():
    offending = {f"{path.relative_to(REPO)}: {name}"
                 for path in sorted((REPO / "ctcflow").rglob("*.py"))
                 for name in imported_modules(path) if name.split(".")[0] in ("stages", "pipeline")}
    assert not offending, "ctcflow is the domain layer; it must not import the layers above it:\n" + \
        "\n".join(sorted(offending))


def test_the_layering_check_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    (tmp_path / "ctcflow").mkdir()
    module = tmp_path / "ctcflow" / "bad.py"
    module.write_text("from ..stages import runner\n\ndef f():\n    import pipeline.flows\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert imported_modules(module) == {"stages", "stages.runner", "pipeline.flows"}


# --- params: what DVC tracks ------------------------------------------------------------------


def tracks(tracked: list[str], key: str) -> bool:
    """A dvc.yaml params entry tracks a key itself or, for a section like train.model, all under it."""
    return any(key == name or key.startswith(f"{name}.") for name in tracked)


@pytest.mark.parametrize("stage", STAGES)
def test_every_param_but_the_runtime_knobs_is_tracked(stage):
    keys = flatten(yaml.safe_load((REPO / "params.yaml").read_text())[stage], f"{stage}.")
    tracked = dvc_stages()[stage]["params"]
    untracked = {key for key in keys if not tracks(tracked, key)}
    assert untracked == {knob for knob in RUNTIME_KNOBS if knob.startswith(f"{stage}.")}, \
        f"params.yaml keys that dvc.yaml's stage {stage!r} does not track"
    unknown = [name for name in tracked if not any(tracks([name], key) for key in keys)]
    assert not unknown, f"dvc.yaml's stage {stage!r} tracks params that params.yaml lacks: {unknown}"


# --- a real DVC repo: what a changed knob makes stale -----------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The tiny project, reproduced once; each test changes params.yaml and puts it back."""
    root = make_dvc_repo(tmp_path_factory.mktemp("tracking"))
    dvc("repro", cwd=root)
    assert json.loads(dvc("status", "--json", cwd=root)) == {}
    return root


@pytest.fixture
def set_param(repo):
    original = (repo / "params.yaml").read_text()

    def set_to(dotted: str, value) -> None:
        params = yaml.safe_load(original)
        *path, key = dotted.split(".")
        section = params
        for part in path:
            section = section[part]
        assert section[key] != value, f"{dotted} is already {value!r}: the test would change nothing"
        section[key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    yield set_to
    (repo / "params.yaml").write_text(original)


def would_run(repo: Path) -> set[str]:
    """The stages `dvc repro` would run: the stale ones and every stage downstream of them."""
    return set(re.findall(r"Running stage '(\w+)'", dvc("repro", "--dry", "--force-downstream", cwd=repo)))


@pytest.mark.parametrize("knob", list(RUNTIME_KNOBS))
def test_changing_a_runtime_knob_leaves_every_stage_up_to_date(repo, set_param, knob):
    set_param(knob, RUNTIME_KNOBS[knob])
    assert json.loads(dvc("status", "--json", cwd=repo)) == {}
    assert would_run(repo) == set()


DOWNSTREAM_OF_TRAIN = {"train", "evaluate", "export", "plots"}


# (knob, a new value, the name DVC reports it by, the stages `dvc repro` would then run)
RESULT_KNOBS = [
    ("synth.seed", 99, "synth.seed", {"synth", "manifest", "featurize", "train", "lm", "evaluate", "export", "plots"}),
    ("manifest.min_duration", 0.3, "manifest.min_duration",
     {"manifest", "featurize", "train", "lm", "evaluate", "export", "plots"}),
    ("featurize.n_mels", 40, "featurize.n_mels", {"featurize", "train", "evaluate", "export", "plots"}),
    ("featurize.normalize", "utterance_mean", "featurize.normalize",
     {"featurize", "train", "evaluate", "export", "plots"}),
    ("featurize.augment.copies", 1, "featurize.augment", {"featurize", "train", "evaluate", "export", "plots"}),
    ("train.lr", 0.001, "train.lr", DOWNSTREAM_OF_TRAIN),
    ("train.model.hidden_size", 16, "train.model", DOWNSTREAM_OF_TRAIN),
    ("lm.order", 2, "lm.order", {"lm", "evaluate", "plots"}),
    ("evaluate.beam.beam_size", 10, "evaluate.beam", {"evaluate", "plots"}),
    ("plots.dpi", 100, "plots.dpi", {"plots"}),
    ("export.opset", 16, "export.opset", {"export"}),
]


@pytest.mark.parametrize("knob, value, tracked_as, stale", RESULT_KNOBS, ids=[knob for knob, *_ in RESULT_KNOBS])
def test_changing_a_result_knob_makes_its_stage_and_those_after_it_stale(repo, set_param, knob, value,
                                                                       tracked_as, stale):
    set_param(knob, value)
    stage = knob.split(".")[0]
    assert json.loads(dvc("status", "--json", cwd=repo)) == \
        {stage: [{"changed deps": {"params.yaml": {tracked_as: "modified"}}}]}
    assert would_run(repo) == stale

"""Prefect flows over the DVC pipeline.

`pipeline_flow` runs each dvc.yaml stage as its own task (`dvc repro --single-item STAGE`), so
the Prefect UI shows every stage's state, duration and logs while DVC still decides what is up
to date. With overrides it runs the pipeline as one DVC experiment instead (`dvc exp run --temp
--set-param …`), which leaves the workspace clean and shows up in `dvc exp show`. With a Dask
address, featurize reads the files on that cluster: a runtime knob passed in the environment, so
it lands in no params file and no experiment.
`sweep_flow` runs a grid of such experiments and ranks them. Both publish Prefect artifacts.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff
import yaml

from ctcflow.params import flatten
from ctcflow.workers import DASK_SCHEDULER_ENV
from pipeline.config import SEED_KEY, FlowParams, SweepParams, load_flow_params
from pipeline.dvc import STAGE_ERROR_PREFIX, UP_TO_DATE, DvcFailed, dvc_json, pipeline_stages, run_dvc
from pipeline.report import metrics_table, param_columns, plots_markdown, rank_rows, sweep_row

PIPELINE_FLOW = "ctcflow-pipeline"
SWEEP_FLOW = "ctcflow-sweep"
# Top-level sections of params.yaml that no stage reads: an experiment differing only there is the
# same experiment (editing flow.sweep.grid must not make the earlier points "other" experiments).
UNREAD_SECTIONS = {"flow"}


class FlowError(ValueError):
    """A mistake in what the flow was asked to do (a bad name, override or branch): one line, not retried."""


class SweepPointsFailed(RuntimeError):
    """Raised at the end of a sweep in which some points failed, or whose best point was not applied
    (`not_applied` says why); rows holds the whole ranked table."""

    def __init__(self, rows: list[dict], failed: list[dict], not_applied: str | None = None):
        self.rows = rows
        parts = [f"{len(failed)} of {len(rows)} sweep points failed: "
                 + "; ".join(f"{row['experiment']}: {row['error']}" for row in failed)] if failed else []
        super().__init__("; ".join(parts + ([not_applied] if not_applied else [])))


def workspace_changes(project_dir: str) -> dict[str, str]:
    """The git-tracked files that differ from HEAD, each with a hash of what it holds now ("deleted"):
    what `dvc exp apply` would overwrite without a word."""
    def git(*args: str) -> bytes:
        done = subprocess.run(["git", *args], cwd=project_dir, capture_output=True)
        if done.returncode != 0:
            raise FlowError(f"{project_dir}: `git {' '.join(args)}` failed: "
                            f"{' '.join(done.stderr.decode(errors='replace').split())}")
        return done.stdout

    root = git("rev-parse", "--show-toplevel").decode().strip()  # status names paths from the root
    entries, changes = iter(git("status", "--porcelain=v1", "-z", "--untracked-files=no").split(b"\0")), {}
    for entry in entries:
        if len(entry) < 4:
            continue
        if entry[:1] in (b"R", b"C"):  # a rename or copy: its old path follows
            next(entries, None)
        path = entry[3:].decode("utf-8", "surrogateescape")
        file = Path(root, path)
        changes[path] = hashlib.sha1(file.read_bytes()).hexdigest() if file.is_file() else "deleted"
    return changes


def apply_best_point(project_dir: str, best: str, before: dict[str, str], log) -> str | None:
    """`dvc exp apply best`, unless a tracked file changed while the sweep ran: the experiments hold
    the workspace as it was when each started, and applying one would overwrite that edit. Returns
    why it was not applied, or None."""
    now = workspace_changes(project_dir)
    if edited := sorted(path for path in before.keys() | now.keys() if before.get(path) != now.get(path)):
        return (f"--apply-best: {best} not applied, since {', '.join(edited[:5])}"
                f"{' and more' if len(edited) > 5 else ''} changed while the sweep ran and `dvc exp apply` "
                f"would overwrite it; commit or save the edit, then run dvc exp apply {best}")
    run_dvc(["exp", "apply", best], project_dir, log)
    return None


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: a dvc failure only if it may pass next time (DvcFailed.transient),
    never a FlowError (the request itself is wrong), anything else (a crash) as before."""
    error = state.data
    if isinstance(error, FlowError):
        return False
    return not isinstance(error, DvcFailed) or error.transient


@task(task_run_name="{stage}", retry_condition_fn=retry_if_transient)
def run_stage(stage: str, project_dir: str, known_up_to_date: bool = False,
              env: dict[str, str] | None = None) -> str:
    logger = get_run_logger()
    if known_up_to_date:
        logger.info("%s is up to date (dvc status): nothing to run", stage)
        return "up to date"
    output = run_dvc(["repro", "--single-item", stage], project_dir, logger.info, env=env)
    if UP_TO_DATE in output:
        logger.info("%s is up to date: DVC skipped it", stage)
        return "up to date"
    return "ran"


def parse_override(text: str):
    """A `--set` value as `dvc exp run -S` parses it (Hydra's override grammar), or a FlowError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    key, sep, _ = text.partition("=")
    if not sep or "." not in key:
        raise FlowError(f"--set {text!r}: expected section.param=value, e.g. train.epochs=2")
    try:
        return OverridesParser.create().parse_overrides([text])[0]
    except OverrideParseException as err:
        raise FlowError(f"--set {text!r}: not a value `dvc exp run -S` takes: "
                        f"{' '.join(str(err).split())}") from None


def hydra_value(value: Any) -> str:
    """A params value (YAML's types) as Hydra's override grammar writes it, the text `dvc exp run -S`
    takes: null, true/false, [1,2], {mode:soft_ratio,weight:0.5}; a string bare where Hydra reads it
    back as that string, else quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    with_bare = f"k.k={text}"
    try:
        if parse_override(with_bare).value() == text:
            return text
    except FlowError:
        pass
    # In a quoted string only a quote, and backslashes just before a quote or the end, are escaped.
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text) + "'"


def valid_ref_name(name: str) -> bool:
    """Whether git (and so DVC, for an experiment) takes `name` as a ref's last part: DVC's own check."""
    from dulwich.refs import check_ref_format

    return bool(name) and "/" not in name and check_ref_format(f"refs/exps/{name}".encode())


# Overrides shown in a name as they are: keys and values of these characters, joined by = and ,.
_BARE_KEY, _BARE_VALUE = re.compile(r"[A-Za-z0-9_.+-]+"), re.compile(r"[A-Za-z0-9_.+-]*")
MAX_READABLE = 100


def experiment_name(overrides: list[str], shown: Iterable[str] | None = None) -> str:
    """A valid experiment name, one per set of overrides: `train.clip_grad_norm=1.0,train.seed=0`,
    the overrides of the keys in `shown` (all by default), sorted. A short hash of all of them is
    added whenever the readable part alone could be another set's too: keys left out, characters
    replaced, or cut at MAX_READABLE."""
    pairs = sorted(tuple(text.split("=", 1)) for text in overrides)
    shown = None if shown is None else set(shown)
    kept = [(key, value) for key, value in pairs if shown is None or key in shown]
    readable = ",".join(f"{key}={value}" for key, value in kept)
    if (len(kept) == len(pairs) and len(readable) <= MAX_READABLE and valid_ref_name(readable)
            and all(_BARE_KEY.fullmatch(key) and _BARE_VALUE.fullmatch(value) for key, value in kept)):
        return readable
    digest = hashlib.sha1("\n".join(f"{key}={value}" for key, value in pairs).encode()).hexdigest()[:7]
    safe = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.+=,-]+", "_", readable))[:MAX_READABLE]
    return f"{safe}-{digest}" if safe else digest


def check_experiment_name(name: str) -> None:
    if not valid_ref_name(name):
        raise FlowError(f"--name {name!r}: not a valid experiment name (git's ref rules: no spaces, "
                        "no / ~ ^ : ? * [ \\, no '..', not ending in '.' or '.lock')")


def check_dvc_yaml(project_dir: str, named: str | None = None) -> None:
    """A project without dvc.yaml has no stage to run: a FlowError naming it (`named`, default its path)."""
    if not (Path(project_dir) / "dvc.yaml").is_file():
        raise FlowError(f"{named or project_dir}: no dvc.yaml there, so no stage to run; give the DVC project's root")


def check_branch(project_dir: str, branch: str) -> None:
    """Before a sweep, not after it: the branch the best experiment is to be kept as must be free."""
    from scmrepo.git import Git

    with Git(project_dir) as scm:
        if not scm.check_ref_format(f"refs/heads/{branch}") or branch.startswith("-"):
            raise FlowError(f"--branch {branch!r}: not a valid git branch name")
        if scm.get_ref(f"refs/heads/{branch}") is not None:
            raise FlowError(f"--branch {branch!r}: the branch exists already; name another or delete it "
                            f"(git branch -D {branch})")


def expected_params(project_dir: str, overrides: list[str], what: str | None = None) -> dict:
    """params.yaml as the experiment will have it: the workspace's, with the overrides applied by
    DVC's own code for `exp run -S`, on a copy. A key or value DVC would refuse is a FlowError now,
    named by `what` (default: the --set options)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copyfile(Path(project_dir) / "params.yaml", copy)
        try:
            apply_overrides(copy, overrides)
        except InvalidArgumentError as err:
            cause = " ".join(str(err.__cause__ or err).split())
            raise FlowError(f"{what or '--set ' + ' '.join(overrides)}: DVC would refuse it: {cause}") from None
        return yaml.safe_load(copy.read_text())


def check_sweep(project_dir: str, sweep: SweepParams) -> None:
    """Before a sweep, not point by point: every grid and fixed key must be one DVC can set in
    params.yaml (a typo would otherwise fail each point that holds it, after the others ran)."""
    checked: set[tuple] = set()
    for point in sweep.points():
        # The seed changes no key: one seed's points stand for all of them.
        keys = tuple(sorted((k, repr(v)) for k, v in point.items() if k != SEED_KEY))
        if keys not in checked:
            checked.add(keys)
            expected_params(project_dir, sweep_overrides(point),
                            f"flow.sweep point {point_name(sweep, point)}")


def params_differences(old: dict, new: dict) -> list[str]:
    """`key: old there, new now` for each param of a stage-read section that differs."""
    old_flat = flatten({k: v for k, v in old.items() if k not in UNREAD_SECTIONS})
    new_flat = flatten({k: v for k, v in new.items() if k not in UNREAD_SECTIONS})
    return [f"{key}: {old_flat.get(key)!r} there, {new_flat.get(key)!r} now"
            for key in sorted(old_flat.keys() | new_flat.keys()) if old_flat.get(key) != new_flat.get(key)]


def named_experiments(project_dir: str) -> dict[str, dict]:
    """The experiments on the current baseline by name (one `dvc exp show`): each its rev and data."""
    found: dict[str, dict] = {}
    for baseline in dvc_json(["exp", "show", "--no-fetch"], project_dir) or []:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name"):
                    found.setdefault(rev["name"], rev)
    return found


@task(task_run_name="experiment {name}", retry_condition_fn=retry_if_transient)
def run_experiment(overrides: list[str], name: str, project_dir: str, env: dict[str, str] | None = None,
                   sweep_point: bool = False) -> str:
    """One `dvc exp run --temp -S …`: DVC copies the workspace, runs what the overrides change and
    stores the result as an experiment ref; returns the experiment's commit. overrides: Hydra's
    `key=value` texts, passed to DVC as they are. env: runtime knobs for the stages. sweep_point:
    the overrides are a sweep point's, whose name comes from them (no --name to give)."""
    logger = get_run_logger()
    expected = expected_params(project_dir, overrides, f"flow.sweep point {name}" if sweep_point else None)
    target, found = name, named_experiments(project_dir)
    if (existing := found.get(name)) is not None:
        old = (((existing.get("data") or {}).get("params") or {}).get("params.yaml") or {}).get("data") or {}
        if differences := params_differences(old, expected):
            # A sweep point's name is made from its overrides: only the rest of params.yaml (an
            # edit since that experiment ran) differs, and a commit makes a new baseline.
            remedy = (f"remove it first (dvc exp remove {name}), or commit the workspace's params.yaml "
                      "(experiments are kept per commit)" if sweep_point else
                      f"give another --name, or remove it first (dvc exp remove {name})")
            raise FlowError(f"experiment {name!r} exists with other params ({'; '.join(differences[:3])}): "
                            + remedy)
        # The same point again (new code, say) replaces it, but only once the new run has worked:
        # it runs under another name first. Not with `exp run --force`: that reruns every stage,
        # upstream ones too, instead of restoring them from DVC's run-cache.
        target = f"{name}-rerun"
        if target in found:  # left by a rerun that was stopped
            run_dvc(["exp", "remove", target], project_dir, logger.info)
    set_params = [arg for text in overrides for arg in ("--set-param", text)]
    run_dvc(["exp", "run", "--temp", "--name", target, *set_params], project_dir, logger.info, env=env)
    if target != name:
        run_dvc(["exp", "remove", name], project_dir, logger.info)
        run_dvc(["exp", "rename", target, name], project_dir, logger.info)
    return experiment_rev(name, project_dir)


def experiment_rev(name: str, project_dir: str) -> str:
    if (rev := named_experiments(project_dir).get(name)) is None:
        raise DvcFailed(["exp", "show"], 1, [f"experiment {name!r} not found after it ran"])
    return rev["rev"]


def retrying(task_fn, params: FlowParams):
    return task_fn.with_options(retries=params.retries,
                                retry_delay_seconds=exponential_backoff(params.retry_delay_seconds)
                                if params.retry_delay_seconds else 0)


def runtime_env(dask_address: str | None) -> dict[str, str] | None:
    """The environment that sends featurize's file reading to the Dask scheduler at dask_address.
    Not a param: DVC would store it in the experiment, the workspace (`exp apply`) or a branch,
    and the next plain `dvc repro` would need that cluster."""
    return {DASK_SCHEDULER_ENV: dask_address} if dask_address else None


def short_error(error: BaseException) -> str:
    """One line for a failed point's row: a stage's own error, DVC's ERROR line, or the message."""
    if isinstance(error, DvcFailed):
        for marker in (STAGE_ERROR_PREFIX, "ERROR:"):
            if starts := [i for i, line in enumerate(error.tail) if line.startswith(marker)]:
                # with the indented lines that go on with it ("  train.warmup_steps: …")
                message = [error.tail[starts[-1]]]
                for line in error.tail[starts[-1] + 1:]:
                    if not line[:1].isspace():
                        break
                    message.append(line.strip())
                return " ".join(message)
        return error.tail[-1] if error.tail else str(error)
    return " ".join(str(error).split()) or type(error).__name__


@task
def publish_report(project_dir: str, rev: str | None, title: str) -> str:
    """A markdown artifact: every metric against the last commit (`dvc metrics diff`), then the plots."""
    table = metrics_table(project_dir, rev)
    markdown = f"# {title}\n\nMetrics against `HEAD` (`dvc metrics diff`):\n\n{table}\n\n" \
               f"{plots_markdown(project_dir, rev)}"
    create_markdown_artifact(markdown=markdown, key="pipeline-report", description=title)
    return markdown


@flow(name=PIPELINE_FLOW, log_prints=True)
def pipeline_flow(project_dir: str = ".", overrides: list[str] | None = None,
                  experiment: str | None = None, dask_address: str | None = None) -> dict[str, str]:
    """Run the DVC pipeline: stage by stage, or as one DVC experiment when params are overridden.
    overrides: `section.param=value` texts as `dvc exp run -S` takes them (Hydra's grammar).
    experiment: the experiment's name (default: one made from the overrides).
    dask_address: a Dask scheduler (tcp://host:8786) that featurize reads the files on."""
    project_dir = str(Path(project_dir).resolve())
    params = load_flow_params(project_dir)
    check_dvc_yaml(project_dir)  # a deployment's project_dir is not checked by the CLI
    env = runtime_env(dask_address)
    if overrides:
        for text in overrides:
            parse_override(text)
        if experiment is not None:
            check_experiment_name(experiment)
        name = experiment or experiment_name(overrides)  # named by what changes the results
        rev = retrying(run_experiment, params)(list(overrides), name, project_dir, env)
        publish_report(project_dir, rev, f"Experiment {name}")
        return {"experiment": name, "rev": rev}
    if experiment is not None:
        raise FlowError("--name names the experiment that --set makes: without --set there is none")
    outcome, something_ran = {}, False
    # One `dvc status` up front spares a dvc process per unchanged stage; it stays valid only
    # until some stage runs, since that may change the deps of every stage after it.
    changed = set(dvc_json(["status"], project_dir) or {})
    for stage in pipeline_stages(project_dir):
        skip = not something_ran and stage not in changed
        outcome[stage] = retrying(run_stage, params)(stage, project_dir, known_up_to_date=skip, env=env)
        something_ran |= outcome[stage] == "ran"
    publish_report(project_dir, None, "Pipeline run")
    return outcome


def sweep_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{key}={hydra_value(value)}" for key, value in point.items()]


def point_name(sweep, point: dict[str, Any]) -> str:
    """A sweep point's experiment name: its grid keys and seed readable, flow.sweep.fixed's only in
    the hash (a grid key that is also fixed is shown: its grid value is the one that counts)."""
    grid_keys = {key for block in sweep.grid for key in block}
    return experiment_name(sweep_overrides(point), [k for k in point if k not in sweep.fixed or k in grid_keys])


@flow(name=SWEEP_FLOW, log_prints=True)
def sweep_flow(project_dir: str = ".", apply_best: bool = False, branch: str | None = None,
               dask_address: str | None = None) -> list[dict]:
    """Run flow.sweep's grid as DVC experiments, rank them by flow.sweep.rank_by, optionally keep the
    best. A point that fails is a row with its error; the others still run, and the flow fails at
    the end (SweepPointsFailed) once the ranking is published.
    dask_address: a Dask scheduler (tcp://host:8786) that featurize reads the files on."""
    project_dir = str(Path(project_dir).resolve())
    params = load_flow_params(project_dir)
    sweep = params.sweep
    if branch:
        check_branch(project_dir, branch)  # now, not after hours of training
    check_sweep(project_dir, sweep)  # and a grid key DVC would refuse
    workspace = workspace_changes(project_dir) if apply_best else {}  # what the experiments start from
    env = runtime_env(dask_address)
    logger = get_run_logger()
    rows, points = [], sweep.points()
    param_keys = param_columns(points)  # every row gets every column
    for point in points:
        name = point_name(sweep, point)
        state = retrying(run_experiment, params)(sweep_overrides(point), name, project_dir, env, sweep_point=True,
                                                 return_state=True)
        if state.is_completed():
            rows.append(sweep_row(project_dir, name, state.result(), point, param_keys=param_keys))
        else:
            error = short_error(state.result(raise_on_failure=False))
            logger.error("sweep point %s failed: %s", name, error)
            rows.append(sweep_row(project_dir, name, None, point, error=error, param_keys=param_keys))
    rows = rank_rows(rows, sweep.rank_by)
    failed = [row for row in rows if row["error"]]
    create_table_artifact(table=rows, key="sweep-ranking",
                          description=f"{len(rows)} experiments ranked by test {sweep.rank_by}"
                          + (f"; {len(failed)} failed (column error)" if failed else ""))
    not_applied = None
    if best := next((row["experiment"] for row in rows if not row["error"]), None):
        if apply_best:
            if not_applied := apply_best_point(project_dir, best, workspace, logger.info):
                logger.error(not_applied)
        if branch:
            run_dvc(["exp", "branch", best, branch], project_dir, logger.info)
    if failed or not_applied:
        raise SweepPointsFailed(rows, failed, not_applied)
    return rows

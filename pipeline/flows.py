"""Prefect flows over the DVC pipeline.

`pipeline_flow` runs each dvc.yaml stage as its own task (`dvc repro --single-item STAGE`), so
the Prefect UI shows every stage's state, duration and logs while DVC still decides what is up
to date. With overrides it runs the pipeline as one DVC experiment instead (`dvc exp run --temp
--set-param …`), which leaves the workspace clean and shows up in `dvc exp show`. With a Dask
address, featurize reads the files on that cluster: runtime knobs, which DVC does not track.
`sweep_flow` runs a grid of such experiments and ranks them. Both publish Prefect artifacts.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff
from ruamel.yaml import YAML

from pipeline.config import FlowParams, load_flow_params
from pipeline.dvc import UP_TO_DATE, DvcFailed, dvc_json, pipeline_stages, run_dvc
from pipeline.report import metrics_table, plots_markdown, sweep_row

PIPELINE_FLOW = "ctcflow-pipeline"
SWEEP_FLOW = "ctcflow-sweep"


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: a stage's own error (bad params, missing input) is not retried."""
    error = state.data
    return not isinstance(error, DvcFailed) or error.transient


@task(task_run_name="{stage}", retry_condition_fn=retry_if_transient)
def run_stage(stage: str, project_dir: str, known_up_to_date: bool = False) -> str:
    logger = get_run_logger()
    if known_up_to_date:
        logger.info("%s is up to date (dvc status): nothing to run", stage)
        return "up to date"
    output = run_dvc(["repro", "--single-item", stage], project_dir, logger.info)
    if UP_TO_DATE in output:
        logger.info("%s is up to date: DVC skipped it", stage)
        return "up to date"
    return "ran"


def experiment_name(overrides: dict[str, Any]) -> str:
    """A readable, git-ref-safe name: train.blank_penalty.mode=none → mode-none."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts))[:120] or "exp"


@task(task_run_name="experiment {name}", retry_condition_fn=retry_if_transient)
def run_experiment(overrides: dict[str, Any], name: str, project_dir: str) -> str:
    """One `dvc exp run --temp`: DVC copies the workspace, runs what the overrides change and
    stores the result as an experiment ref; returns the experiment's commit."""
    logger = get_run_logger()
    set_params = [arg for key, value in overrides.items() for arg in ("--set-param", f"{key}={value}")]
    # A point run again replaces its earlier experiment. Not with `exp run --force`: that reruns
    # every stage, upstream ones too, instead of restoring them from DVC's run-cache.
    if name in run_dvc(["exp", "list", "--name-only"], project_dir, logger.debug).split():
        run_dvc(["exp", "remove", name], project_dir, logger.info)
    run_dvc(["exp", "run", "--temp", "--name", name, *set_params], project_dir, logger.info)
    return experiment_rev(name, project_dir)


def experiment_rev(name: str, project_dir: str) -> str:
    for baseline in dvc_json(["exp", "show", "--no-fetch", "--only-changed"], project_dir) or []:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name") == name:
                    return rev["rev"]
    raise DvcFailed(["exp", "show"], 1, [f"experiment {name!r} not found after it ran"])


def retrying(task_fn, params: FlowParams):
    return task_fn.with_options(retries=params.retries,
                                retry_delay_seconds=exponential_backoff(params.retry_delay_seconds)
                                if params.retry_delay_seconds else 0)


def dask_knobs(dask_address: str | None) -> dict[str, Any]:
    """The params that send featurize's file reading to the Dask scheduler at dask_address."""
    return {"featurize.executor": "dask", "featurize.scheduler_address": dask_address} if dask_address else {}


@contextlib.contextmanager
def runtime_knobs_set(project_dir: str, knobs: dict[str, Any]) -> Iterator[None]:
    """params.yaml with these runtime knobs set while `dvc repro` runs the stages, as `dvc exp run -S`
    would set them, then put back as it was. DVC tracks none of them, so they change no stage's
    state: dvc.lock and `dvc status` stay as they would be without them."""
    if not knobs:
        yield
        return
    path = Path(project_dir) / "params.yaml"
    original = path.read_text()
    yaml = YAML()  # round trip: the comments stay, should the run be killed before the file is put back
    params = yaml.load(original)
    for dotted, value in knobs.items():
        *sections, key = dotted.split(".")
        section = params
        for name in sections:
            section = section[name]
        section[key] = value
    with path.open("w") as file:
        yaml.dump(params, file)
    try:
        yield
    finally:
        path.write_text(original)


@task
def publish_report(project_dir: str, rev: str | None, title: str) -> str:
    """A markdown artifact: every metric against the last commit (`dvc metrics diff`), then the plots."""
    table = metrics_table(project_dir, rev)
    markdown = f"# {title}\n\nMetrics against `HEAD` (`dvc metrics diff`):\n\n{table}\n\n" \
               f"{plots_markdown(project_dir, rev)}"
    create_markdown_artifact(markdown=markdown, key="pipeline-report", description=title)
    return markdown


@flow(name=PIPELINE_FLOW, log_prints=True)
def pipeline_flow(project_dir: str = ".", overrides: dict[str, Any] | None = None,
                  experiment: str | None = None, dask_address: str | None = None) -> dict[str, str]:
    """Run the DVC pipeline: stage by stage, or as one DVC experiment when params are overridden.
    dask_address: a Dask scheduler (tcp://host:8786) that featurize reads the files on."""
    project_dir = str(Path(project_dir).resolve())
    params = load_flow_params(project_dir)
    knobs = dask_knobs(dask_address)
    if overrides:
        name = experiment or experiment_name(overrides)  # named by what changes the results
        rev = retrying(run_experiment, params)({**overrides, **knobs}, name, project_dir)
        publish_report(project_dir, rev, f"Experiment {name}")
        return {"experiment": name, "rev": rev}
    outcome, something_ran = {}, False
    with runtime_knobs_set(project_dir, knobs):
        # One `dvc status` up front spares a dvc process per unchanged stage; it stays valid only
        # until some stage runs, since that may change the deps of every stage after it.
        changed = set(dvc_json(["status"], project_dir) or {})
        for stage in pipeline_stages(project_dir):
            skip = not something_ran and stage not in changed
            outcome[stage] = retrying(run_stage, params)(stage, project_dir, known_up_to_date=skip)
            something_ran |= outcome[stage] == "ran"
    publish_report(project_dir, None, "Pipeline run")
    return outcome


@flow(name=SWEEP_FLOW, log_prints=True)
def sweep_flow(project_dir: str = ".", apply_best: bool = False, branch: str | None = None,
               dask_address: str | None = None) -> list[dict]:
    """Run flow.sweep's grid as DVC experiments, rank them by test WER, optionally keep the best.
    dask_address: a Dask scheduler (tcp://host:8786) that featurize reads the files on."""
    project_dir = str(Path(project_dir).resolve())
    params = load_flow_params(project_dir)
    sweep = params.sweep
    knobs = dask_knobs(dask_address)
    rows = []
    for point in sweep.points():
        name = experiment_name({k: v for k, v in point.items() if k not in sweep.fixed})
        rev = retrying(run_experiment, params)({**point, **knobs}, name, project_dir)
        rows.append(sweep_row(project_dir, name, rev, point))
    rows.sort(key=lambda row: (row.get(f"test_{sweep.rank_by}") is None, row.get(f"test_{sweep.rank_by}")))
    create_table_artifact(table=rows, key="sweep-ranking",
                          description=f"{len(rows)} experiments ranked by test {sweep.rank_by}")
    best = rows[0]["experiment"]
    if apply_best:
        run_dvc(["exp", "apply", best], project_dir, get_run_logger().info)
    if branch:
        run_dvc(["exp", "branch", best, branch], project_dir, get_run_logger().info)
    return rows

"""What the flows publish: metrics tables (from `dvc metrics diff`) and the plots, as markdown."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import dvc.api
from dvc.exceptions import PathMissingError

from pipeline.config import RANK_METRICS
from pipeline.dvc import dvc_json

PLOTS = ("plots/loss.png", "plots/error_rates.png", "plots/blank_ratio.png", "plots/calibration.png")


def metrics_diff(project_dir: str, rev: str | None) -> dict[str, dict[str, dict]]:
    """`dvc metrics diff HEAD [rev] --all`: every metric's old (HEAD) and new value, by file."""
    return dvc_json(["metrics", "diff", "HEAD", *([rev] if rev else []), "--all"], project_dir) or {}


def number(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metrics_table(project_dir: str, rev: str | None) -> str:
    lines = ["| file | metric | HEAD | this run | change |", "|---|---|---|---|---|"]
    for path, metrics in sorted(metrics_diff(project_dir, rev).items()):
        for name, values in sorted(metrics.items()):
            lines.append(f"| {path} | {name} | {number(values.get('old'))} | {number(values.get('new'))} "
                         f"| {number(values.get('diff'))} |")
    return "\n".join(lines)


def plots_markdown(project_dir: str, rev: str | None) -> str:
    """The stage's PNG plots inlined as data URIs: an artifact cannot point at a local file. A plot
    the project does not make is left out, in the workspace as in an experiment."""
    parts = []
    for path in PLOTS:
        try:
            data = (Path(project_dir, path).read_bytes() if rev is None
                    else dvc.api.read(path, repo=project_dir, rev=rev, mode="rb"))
        except (FileNotFoundError, PathMissingError):  # dvc.api says PathMissingError for a rev
            continue
        parts.append(f"![{path}](data:image/png;base64,{base64.b64encode(data).decode()})")
    return "\n\n".join(parts) or "(no plots)"


def rank_column(rank_by: str) -> str:
    """The sweep table's column of a flow.sweep.rank_by metric: greedy.wer → test_greedy_wer."""
    return "test_" + rank_by.replace(".", "_")


# The sweep table's metric columns: every metric flow.sweep.rank_by may name, then the final losses.
SWEEP_COLUMNS = [(rank_column(key), f"metrics/eval.json:{key}") for key in RANK_METRICS] + [
    ("train_loss", "metrics/train/metrics.json:train.loss"),
    ("train_ctc_loss", "metrics/train/metrics.json:train.ctc_loss"),
    ("train_blank_penalty", "metrics/train/metrics.json:train.blank_penalty"),
    ("valid_blank_ratio", "metrics/train/metrics.json:valid.blank_ratio"),
    ("test_blank_ratio", "metrics/eval.json:blank_ratio"),
]


def param_columns(points: list[dict[str, Any]]) -> list[str]:
    """Every param key of a sweep's points, in the order they first appear: the table's param columns."""
    return list(dict.fromkeys(key for point in points for key in point))


def sweep_row(project_dir: str, name: str, rev: str | None, point: dict[str, Any],
              error: str | None = None, param_keys: list[str] | None = None) -> dict[str, Any]:
    """One ranked-table row: the experiment's settings by their full keys (two sections may share
    a param name: train.seed, featurize.augment.seed), test metrics and final losses; or, for a
    point that failed, its error. param_keys: every key of the sweep, so that all rows have the same
    columns in the same order (None where this point leaves the key to params.yaml): the Prefect
    UI takes a table's columns from its first row, and would hide the keys that row lacks."""
    keys = list(point) if param_keys is None else list(dict.fromkeys([*param_keys, *point]))
    row: dict[str, Any] = {"experiment": name, **{key: point.get(key) for key in keys}}
    new = {} if rev is None else {f"{path}:{key}": values.get("new")
                                  for path, metrics in metrics_diff(project_dir, rev).items()
                                  for key, values in metrics.items()}
    row.update({column: new.get(key) for column, key in SWEEP_COLUMNS})
    row["rev"] = rev[:7] if rev else None
    row["error"] = error
    return row


def rank_rows(rows: list[dict[str, Any]], rank_by: str) -> list[dict[str, Any]]:
    """Best first by rank_by (higher first where more is better); failed points and missing values
    last, and so is NaN (a run that diverged), which compares as neither better nor worse and would
    otherwise keep its place, first included."""
    column, higher = rank_column(rank_by), RANK_METRICS[rank_by]

    def key(row: dict[str, Any]) -> tuple:
        value = row.get(column)
        if not isinstance(value, int | float) or math.isnan(value):
            return (True, 0.0)
        return (False, -value if higher else value)

    return sorted(rows, key=key)

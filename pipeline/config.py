"""The `flow:` section of params.yaml: the deployment's schedule, retries and the sweep grid.

No DVC stage reads this section, so changing it reruns nothing. Its values live in params.yaml
only: every field here is required.
"""

from __future__ import annotations

import itertools
import zoneinfo
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from prefect.schedules import validate_cron_string

from ctcflow.params import Section, load_section


# The metrics of metrics/eval.json a sweep can rank by, and whether more is better for each.
RANK_METRICS = {"wer": False, "cer": False, "sentence_accuracy": True, "ctc_loss": False,
                "greedy.wer": False, "greedy.cer": False, "greedy.sentence_accuracy": True}
RankBy = Literal[tuple(RANK_METRICS)]  # so a typo's error lists the allowed names

# The seed key that flow.sweep.seeds sets in every point.
SEED_KEY = "train.seed"


class SweepParams(Section):
    # Each block is the product of its lists; the sweep runs the union of the blocks, so
    # settings that do not apply (a weight with mode none) need not be multiplied in.
    grid: list[dict[str, list[Any]]] = Field(min_length=1)
    fixed: dict[str, Any]
    # The outer loop: the whole grid with the first seed, then again with the next, so a sweep
    # stopped early has still tried every setting.
    seeds: list[int] = Field(min_length=1)
    rank_by: RankBy  # a key of metrics/eval.json; pydantic's error lists the allowed ones

    @field_validator("grid")
    @classmethod
    def _blocks_have_values(cls, grid: list[dict[str, list]]) -> list[dict[str, list]]:
        for block in grid:
            for key, values in block.items():
                if "." not in key or not values:
                    raise ValueError(f"{key!r}: a grid key is section.param and needs at least one value")
                if key == SEED_KEY:
                    # points() sets it from seeds: a grid value would be replaced without a word.
                    raise ValueError(f"{key}: set the seeds in flow.sweep.seeds, not in the grid")
        return grid

    @field_validator("fixed")
    @classmethod
    def _no_fixed_seed(cls, fixed: dict[str, Any]) -> dict[str, Any]:
        if SEED_KEY in fixed:
            raise ValueError(f"{SEED_KEY}: set the seeds in flow.sweep.seeds, not in flow.sweep.fixed")
        return fixed

    def points(self) -> list[dict[str, Any]]:
        """Every combination, fixed values included, seed by seed in grid order, without repeats."""
        seen, points = set(), []
        for seed, block in itertools.product(self.seeds, self.grid):
            for values in itertools.product(*block.values()):
                point = {**self.fixed, **dict(zip(block, values)), SEED_KEY: seed}
                key = tuple(sorted((k, repr(v)) for k, v in point.items()))
                if key not in seen:
                    seen.add(key)
                    points.append(point)
        return points


class FlowParams(Section):
    deployment: str  # the served deployment's name: FLOW/DEPLOYMENT in `prefect deployment run`
    cron: str
    timezone: str
    retries: int = Field(ge=0)
    retry_delay_seconds: float = Field(ge=0)  # doubles with each retry
    sweep: SweepParams

    @field_validator("deployment")
    @classmethod
    def _valid_deployment(cls, name: str) -> str:
        # Prefect serves an empty name as the flow's own name without a word, and refuses '/' or
        # '%' only when `serve` starts, with a traceback.
        if not name.strip() or "/" in name or "%" in name:
            raise ValueError(f"{name!r} is not a deployment name: a name such as nightly, without '/' or '%'")
        return name

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str) -> str:
        return validate_cron_string(cron)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, timezone: str) -> str:
        # The deployment's schedule would refuse it only when `serve` starts, with a traceback.
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r}: an IANA name such as UTC or Europe/Paris") from None
        return timezone


def load_flow_params(project_dir: str | Path = ".") -> FlowParams:
    return load_section("flow", FlowParams, Path(project_dir) / "params.yaml")

"""The `flow:` section of params.yaml: the deployment's schedule, retries and the sweep grid.

No DVC stage reads this section, so changing it reruns nothing. Its values live in params.yaml
only: every field here is required.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from prefect.schedules import validate_cron_string

from ctcflow.params import Section, load_section


class SweepParams(Section):
    # Each block is the product of its lists; the sweep runs the union of the blocks, so
    # settings that do not apply (a weight with mode none) need not be multiplied in.
    grid: list[dict[str, list[Any]]] = Field(min_length=1)
    fixed: dict[str, Any]
    # The outer loop: the whole grid with the first seed, then again with the next, so a sweep
    # stopped early has still tried every setting.
    seeds: list[int] = Field(min_length=1)
    rank_by: str  # a key of metrics/eval.json; lower is better

    @field_validator("grid")
    @classmethod
    def _blocks_have_values(cls, grid: list[dict[str, list]]) -> list[dict[str, list]]:
        for block in grid:
            for key, values in block.items():
                if "." not in key or not values:
                    raise ValueError(f"{key!r}: a grid key is section.param and needs at least one value")
        return grid

    def points(self) -> list[dict[str, Any]]:
        """Every combination, fixed values included, seed by seed in grid order, without repeats."""
        seen, points = set(), []
        for seed, block in itertools.product(self.seeds, self.grid):
            for values in itertools.product(*block.values()):
                point = {**self.fixed, **dict(zip(block, values)), "train.seed": seed}
                key = tuple(sorted((k, repr(v)) for k, v in point.items()))
                if key not in seen:
                    seen.add(key)
                    points.append(point)
        return points


class FlowParams(Section):
    deployment: str
    cron: str
    timezone: str
    retries: int = Field(ge=0)
    retry_delay_seconds: float = Field(ge=0)  # doubles with each retry
    sweep: SweepParams

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str) -> str:
        return validate_cron_string(cron)


def load_flow_params(project_dir: str | Path = ".") -> FlowParams:
    return load_section("flow", FlowParams, Path(project_dir) / "params.yaml")

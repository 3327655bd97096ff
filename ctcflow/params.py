"""Read one section of params.yaml and validate it up front.

Each stage declares a pydantic schema for its own section; a typo or a bad value
stops the stage before any work with a message naming the key and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or holds a bad value."""


class Section(BaseModel):
    """Base for a params.yaml section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=Section)


def load_section(name: str, schema: type[S], path: str | Path = DEFAULT_PARAMS) -> S:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if name not in raw:
        raise ParamsError(f"{path}: has no '{name}:' section")
    try:
        return schema.model_validate(raw[name] or {})
    except ValidationError as err:
        lines = [_section_error(name, schema, e) if not e["loc"] else
                 f"  {name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                 + ("" if e["type"] == "missing" else f" (got {e.get('input')!r})")
                 for e in err.errors()]
        raise ParamsError(f"{path}: bad or missing value in section '{name}':\n" + "\n".join(lines)) from err


def _section_error(name: str, schema: type[Section], error: dict) -> str:
    """A cross-field (model) check's error, which has no loc: its input is the whole section, so it
    is left out. A message that starts with one of the section's keys ("test_sets: bad name") is
    about that key: `manifest.test_sets: bad name`."""
    message = error["msg"].removeprefix("Value error, ")
    if message.partition(":")[0] in schema.model_fields:
        return f"  {name}.{message}"
    return f"  {name}: {message}" + ("" if isinstance(error.get("input"), dict) else f" (got {error.get('input')!r})")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"wer": 1}} → {"train.wer": 1}: the dotted names DVC and `dvc exp run -S` use.
    An empty mapping is a value of its own ({"test_sets": {}} stays), not nothing."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

"""Read one section of params.yaml and validate it up front.

Each stage declares a pydantic schema for its own section; a typo or a bad value
stops the stage before any work with a message naming the key and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or holds a bad value."""


def not_a_boolean(value):
    """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as the numbers 1
    and 0 (`epochs: yes` would train one epoch): where a number belongs, a boolean is an error."""
    if isinstance(value, bool):
        raise ValueError("should be a number, not true or false (YAML reads yes/no/on/off as booleans)")
    return value


# Numbers that refuse booleans inside lists, tuples and the dataclasses a section holds; a
# Section's own number fields refuse them anyway (below).
Int = Annotated[int, BeforeValidator(not_a_boolean)]
Float = Annotated[float, BeforeValidator(not_a_boolean)]


def _wants_number(annotation) -> bool:
    """A number type, or a union (Annotated included) with one and without bool."""
    members = {annotation, *get_args(annotation)}
    return bool(members & {int, float}) and bool not in members or any(
        _wants_number(arg) for arg in get_args(annotation) if arg is not annotation and get_args(arg))


class Section(BaseModel):
    """Base for a params.yaml section: unknown keys are errors, values are immutable, and a boolean
    where a number belongs is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value, info):
        if isinstance(value, bool) and _wants_number(cls.model_fields[info.field_name].annotation):
            not_a_boolean(value)
        return value


S = TypeVar("S", bound=Section)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; DVC's ruamel refuses them, and so
    does this, so a stage run alone reads no other value than `dvc repro` would accept."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the second would silently win)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str = "params file") -> object:
    """A YAML file's contents; any reason it cannot be read is a ParamsError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path}: is a directory, not a {what}")
    if not path.is_file():
        raise ParamsError(f"{path}: no such {what}")
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not a {what}: byte {err.start} is not UTF-8 text") from None
    loader.name = str(path)  # the error marks name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def load_section(name: str, schema: type[S], path: str | Path = DEFAULT_PARAMS) -> S:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run from the project root, or pass --params)")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: not a params file: a mapping of sections is expected, got {type(raw).__name__}")
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

"""The manifest: one typed row per utterance, one JSON-lines file per split and per extra test set.

Columns (see docs/corpora.md "Manifests"):
  id               unique utterance id
  audio_path       path to the audio, or to a precomputed feature array (.npy, frames × dims)
  duration         seconds (from the header; frames / manifest.feature_frame_rate for .npy)
  sample_rate      Hz (from the header); frames per second for .npy
  num_channels     channels (from the header); feature dimensions for .npy
  text             transcript as the corpus gives it
  text_normalized  what the model learns: units of the vocabulary (tokens.json), single spaces
  speaker          speaker id ('' when the corpus has none)
  split            train | valid | test, or the name of an extra test set
Rejected utterances go to rejects.jsonl with columns id, split, audio_path, text, reason, detail.
test_sets.json lists the extra test sets' names (a JSON list); featurize copies it beside the features.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from ctcflow.errors import CtcflowError

SPLITS = ("train", "valid", "test")
TEST_SETS_FILE = "test_sets.json"


@dataclass(frozen=True)
class Utterance:
    id: str
    audio_path: str
    duration: float
    sample_rate: int
    num_channels: int
    text: str
    text_normalized: str
    speaker: str
    split: str


@dataclass(frozen=True)
class Reject:
    id: str
    split: str
    audio_path: str
    text: str
    reason: str
    detail: str


COLUMNS = [f.name for f in fields(Utterance)]
REJECT_COLUMNS = [f.name for f in fields(Reject)]


def write_jsonl(rows: list, columns: list[str], path: Path) -> None:
    frame = pd.DataFrame([vars(r) for r in rows], columns=columns)  # vars: asdict deep-copies, 5× slower
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_json(path, orient="records", lines=True, force_ascii=False)


STRING_COLUMNS = {"id": str, "speaker": str, "text": str, "text_normalized": str}
CHUNK_ROWS = 2000  # rows iter_manifest parses at a time


class ManifestError(CtcflowError, ValueError):
    """A manifest file that is not what the manifest stage writes (edited by hand, or cut short)."""


def _manifest_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found (run the manifest stage first)")
    return path


def _columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = set(COLUMNS) - set(frame.columns)
    if missing:
        raise ManifestError(f"manifest {path} lacks columns {sorted(missing)}")
    return frame[COLUMNS]


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = _manifest_file(path)
    if path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    try:
        frame = pd.read_json(path, lines=True, dtype=STRING_COLUMNS)
    except ValueError as err:
        raise _not_json_lines(path, err) from None
    return _columns(frame, path)


def iter_manifest(path: str | Path) -> Iterator[tuple]:
    """The rows of a manifest in order, as read_manifest reads them (named tuples of its columns),
    parsed CHUNK_ROWS at a time: for featurize, whose memory must not grow with the corpus (a whole
    50-hour manifest took 140 MB to parse)."""
    path = _manifest_file(path)
    if path.stat().st_size == 0:
        return
    with pd.read_json(path, lines=True, dtype=STRING_COLUMNS, chunksize=CHUNK_ROWS) as chunks:
        while True:
            try:  # only the parsing: an error of the caller's is never raised in here
                chunk = next(chunks)
            except StopIteration:
                return
            except ValueError as err:
                raise _not_json_lines(path, err) from None
            yield from _columns(chunk, path).itertuples(index=False)


def _not_json_lines(path: Path, err: ValueError) -> ManifestError:
    return ManifestError(f"manifest {path}: not the JSON lines the manifest stage writes ({err}); "
                         "rerun the manifest stage")


def read_test_set_names(directory: str | Path) -> list[str]:
    """The extra test sets listed in `directory` (a manifest or feature folder); none where there
    is no list (a folder that older code, or a benchmark, wrote)."""
    path = Path(directory) / TEST_SETS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def write_test_set_names(directory: Path, names: list[str]) -> None:
    (directory / TEST_SETS_FILE).write_text(json.dumps(names) + "\n")


def tally_rejects(rejects: list[Reject], path: Path, kind: str) -> dict:
    """Write `rejects` to `path` (JSON lines), print how many there are by reason, and return that
    count for the stage's metrics: {"total": n, "<reason>": n, ...}. `kind` names them when printed."""
    write_jsonl(rejects, REJECT_COLUMNS, path)
    by_reason = Counter(r.reason for r in rejects)
    if rejects:
        print(f"{kind} {len(rejects)}: {dict(by_reason)} — see {path}")
    return count_by_reason(by_reason)


def count_by_reason(reasons: Iterable[str] | Counter) -> dict:
    """{"total": n, "<reason>": n, ...}: how every count of rejects is written into the metrics."""
    by_reason = Counter(reasons)
    return {"total": by_reason.total(), **by_reason}

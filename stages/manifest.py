"""Stage manifest: list every utterance with its header and transcript, one file per split.

Sources (manifest.source; see README "Corpora"):
  demo          the synth stage's corpus: <corpus_dir>/metadata.csv
  librispeech   <corpus_dir>/[<subset>/]<reader>/<chapter>/*.flac with *.trans.txt
  common_voice  <corpus_dir>/{train,dev,test}.tsv or validated.tsv, audio in clips/
  ljspeech      <corpus_dir>/metadata.csv with wavs/
  table         a CSV, TSV or JSON-lines file (manifest.table) with the columns in manifest.columns
  recipe_json   the original recipe's {"key": "<audio path>", "text": "..."} lines (train_json, test_json,
                optionally valid_json)
Splits come from the corpus where it defines them; otherwise they are made speaker-disjoint here.
With manifest.input: features every path is a precomputed feature array (.npy, frames × dims).

Utterances are examined in parallel (manifest.num_workers processes), reading headers only.
Each one is checked: inside corpus_dir, readable, duration in range, transcript
non-empty after normalization (manifest.text) and inside the vocabulary, long enough for CTC
(one output frame per unit plus one between repeats, at ctc_frame_rate frames per second).
Failures go to data/manifests/rejects.jsonl with their reason and counts by reason to
metrics/manifest.json. The label unit (characters of `alphabet`, or words of `vocabulary`) goes to
data/manifests/tokens.json. The stage fails when a split is left empty, or on any reject when
manifest.strict is true.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Literal

import pandas as pd
from num2words import CONVERTER_CLASSES
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from ctcflow import sources
from ctcflow.audio import AudioInfo, read_info
from ctcflow.features import read_feature_header
from ctcflow.errors import Rejected
from ctcflow.manifest import COLUMNS, SPLITS, Reject, Utterance, tally_rejects, write_jsonl
from ctcflow.params import Section
from ctcflow.workers import ordered_map
from stages.runner import StageError, fail_if_strict, stage_main
from ctcflow.text import TOKENS_FILE, Tokenizer, has_digits, min_ctc_frames, normalize, read_vocabulary

OUT_DIR = Path("data/manifests")
METRICS_FILE = Path("metrics/manifest.json")
SOURCES = ("demo", "librispeech", "common_voice", "ljspeech", "table", "recipe_json")


class TextParams(Section):
    lowercase: bool
    punctuation: Literal["drop", "keep"]
    digits: Literal["keep", "spell", "reject"]
    language: str  # num2words language for digits: spell
    unknown: Literal["reject", "drop"]  # units outside the vocabulary

    @field_validator("language")
    @classmethod
    def _num2words_knows_it(cls, v):
        if v not in CONVERTER_CLASSES:
            raise ValueError(f"num2words has no language {v!r}; it has {', '.join(sorted(CONVERTER_CLASSES))}")
        return v


class ColumnsParams(Section):
    path: str
    text: str
    speaker: str | None
    split: str | None
    id: str | None  # null: the file name without its suffix


class ManifestParams(Section):
    source: Literal[SOURCES]
    corpus_dir: str
    table: str | None
    columns: ColumnsParams
    train_json: str | None
    valid_json: str | None
    test_json: str | None
    input: Literal["audio", "features"]
    feature_frame_rate: float = Field(gt=0)
    units: Literal["char", "word"]
    alphabet: str
    vocabulary: str | None
    text: TextParams
    valid_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    seed: int
    min_duration: float = Field(ge=0)
    max_duration: float = Field(gt=0)
    ctc_frame_rate: float = Field(gt=0)
    strict: bool
    num_workers: int = Field(ge=1, le=64)

    @model_validator(mode="after")
    def _source_has_its_files(self):
        if self.source == "table" and not self.table:
            raise ValueError("source table needs manifest.table (a .csv, .tsv or .jsonl file)")
        if self.source == "recipe_json" and not (self.train_json and self.test_json):
            raise ValueError("source recipe_json needs manifest.train_json and manifest.test_json")
        if self.units == "word" and not self.vocabulary:
            raise ValueError("units word needs manifest.vocabulary (a file with one unit per line)")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction + test_fraction must leave something to train on")
        if self.min_duration >= self.max_duration:
            raise ValueError(f"min_duration {self.min_duration} must be below max_duration {self.max_duration}")
        return self


def read_source(params: ManifestParams) -> pd.DataFrame:
    corpus = Path(params.corpus_dir)
    if params.source == "demo":
        return sources.demo(corpus)
    if params.source in ("librispeech", "common_voice", "ljspeech") and not corpus.is_dir():
        raise StageError(f"manifest.corpus_dir {corpus} is not a directory")
    if params.source == "librispeech":
        return sources.librispeech(corpus)
    if params.source == "common_voice":
        return sources.common_voice(corpus)
    if params.source == "ljspeech":
        return sources.ljspeech(corpus)
    if params.source == "table":
        c = params.columns
        return sources.table(Path(params.table), c.path, c.text, c.speaker, c.split, c.id)
    return sources.recipe_json(Path(params.train_json), Path(params.test_json),
                               Path(params.valid_json) if params.valid_json else None)


def build_tokenizer(params: ManifestParams) -> Tokenizer:
    """The label unit, decided here once; train adds the blank."""
    try:
        if params.units == "word":
            return Tokenizer(read_vocabulary(params.vocabulary, params.text.lowercase), "last", "word")
        return Tokenizer(params.alphabet, "last", "char")
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest.vocabulary {params.vocabulary} not found") from None
    except ValueError as err:
        raise StageError(f"manifest.{'vocabulary' if params.units == 'word' else 'alphabet'}: {err}") from err


def check_text(text: str, params: ManifestParams, tokenizer: Tokenizer) -> str:
    """The normalized transcript, or `Rejected` with the reason."""
    rules = params.text
    normalized = normalize(text, rules.lowercase, rules.punctuation, rules.digits == "spell", rules.language)
    if rules.digits == "reject" and has_digits(normalized):
        raise Rejected("digits_in_transcript", f"{normalized!r} has digits (manifest.text.digits: reject)")
    unknown = tokenizer.unknown(normalized)
    if unknown and rules.unknown == "drop":
        normalized, unknown = tokenizer.drop_unknown(normalized), set()
    if not normalized:
        raise Rejected("empty_transcript", f"transcript {text!r} is empty after normalization")
    if unknown:
        reason = "characters_outside_vocabulary" if tokenizer.unit == "char" else "words_outside_vocabulary"
        raise Rejected(reason, f"{sorted(unknown)} in {normalized!r}")
    return normalized


def check(entry: dict, info: AudioInfo, params: ManifestParams, tokenizer: Tokenizer) -> Utterance:
    """The accepted utterance, or `Rejected` with the reason."""
    if info.duration < params.min_duration:
        raise Rejected("too_short_audio", f"{info.duration:.3f} s < min_duration {params.min_duration} s")
    if info.duration > params.max_duration:
        raise Rejected("too_long_audio", f"{info.duration:.3f} s > max_duration {params.max_duration} s")
    text = check_text(entry["text"], params, tokenizer)
    needed = min_ctc_frames(tokenizer.encode(text))
    available = int(info.duration * params.ctc_frame_rate)
    if needed > available:
        raise Rejected("too_short_for_transcript", f"CTC needs {needed} frames, {info.duration:.2f} s gives {available}")
    return Utterance(
        id=entry["id"], audio_path=entry["audio_path"], duration=round(info.duration, 4),
        sample_rate=info.sample_rate, num_channels=info.num_channels, text=entry["text"],
        text_normalized=text, speaker=entry["speaker"], split=entry["split"],
    )


def inside(root: str, path: str) -> bool:
    """Whether `path` lies under `root`, by the path's text: `..` and absolute paths cannot escape,
    while symbolic links inside the corpus (a common way to assemble one) still work."""
    root = os.path.join(os.path.abspath(root), "")  # with a trailing separator: /data/a is not under /data/ab
    return os.path.abspath(path).startswith(root)


def examine(entry: dict, params: ManifestParams, tokenizer: Tokenizer) -> Utterance | Rejected:
    """One utterance: its place, header and transcript. The reject is returned, not raised, so one
    bad file never stops a worker. Paths outside the corpus are never opened (think /dev/zero)."""
    try:
        if not inside(params.corpus_dir, entry["audio_path"]):
            raise Rejected("path_outside_corpus", f"{entry['audio_path']} is not under corpus_dir {params.corpus_dir}")
        if params.input == "features":
            info = read_feature_header(entry["audio_path"], params.feature_frame_rate)
        else:
            info = read_info(entry["audio_path"])
        return check(entry, info, params, tokenizer)
    except Rejected as err:
        return err


def run(params: ManifestParams, out_dir: Path = OUT_DIR, metrics_file: Path = METRICS_FILE) -> dict:
    tokenizer = build_tokenizer(params)
    entries = read_source(params)
    unknown_splits = set(entries["split"]) - {*SPLITS, ""}
    if unknown_splits:
        raise StageError(f"unknown split name(s) {sorted(unknown_splits)}; expected {list(SPLITS)}")
    entries, how = sources.assign_splits(entries, params.valid_fraction, params.test_fraction, params.seed)
    records = entries.to_dict("records")
    duplicate = entries["id"].duplicated().tolist()  # every occurrence after the first
    unique = [e for e, dup in zip(records, duplicate) if not dup]
    with ordered_map(params.num_workers, "manifest.num_workers", __name__, max_chunk=256) as map_files:
        results = iter(list(tqdm(map_files(partial(examine, params=params, tokenizer=tokenizer), unique),
                                 total=len(unique), desc="manifest", unit="file", mininterval=1.0)))
    accepted: list[Utterance] = []
    rejects: list[Reject] = []
    for entry, dup in zip(records, duplicate):
        result = Rejected("duplicate_id", f"id {entry['id']!r} appears more than once") if dup else next(results)
        if isinstance(result, Rejected):
            rejects.append(Reject(entry["id"], entry["split"], entry["audio_path"], entry["text"], result.reason, result.detail))
        else:
            accepted.append(result)

    if params.input == "features" and accepted:
        # One model input size: arrays whose width differs from the most common one are rejected.
        dims = Counter(u.num_channels for u in accepted).most_common(1)[0][0]
        rejects += [Reject(u.id, u.split, u.audio_path, u.text, "feature_dims_mismatch",
                           f"{u.num_channels} dims, the corpus has {dims}") for u in accepted if u.num_channels != dims]
        accepted = [u for u in accepted if u.num_channels == dims]

    by_split = {split: [u for u in accepted if u.split == split] for split in SPLITS}
    for split, rows in by_split.items():
        write_jsonl(rows, COLUMNS, out_dir / f"{split}.jsonl")
    (out_dir / TOKENS_FILE).write_text(json.dumps(tokenizer.units_dict(), ensure_ascii=False) + "\n")
    metrics = {
        split: {"utterances": len(rows), "hours": round(sum(r.duration for r in rows) / 3600, 4),
                "speakers": len({r.speaker for r in rows})}
        for split, rows in by_split.items()
    }
    print(f"{params.source}: {len(records)} utterances listed; {how}")
    for split in SPLITS:
        print(f"{split}: {metrics[split]['utterances']} utterances, {metrics[split]['hours']:.2f} h")
    rejects_file = out_dir / "rejects.jsonl"
    metrics["rejected"] = tally_rejects(rejects, rejects_file, "rejected")
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")

    empty = [split for split in SPLITS if not by_split[split]]
    if empty:
        raise StageError(f"no usable utterances left in split(s) {empty}; reasons are in {rejects_file}")
    fail_if_strict("manifest.strict", params.strict, metrics["rejected"], rejects_file)
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("manifest", ManifestParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

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
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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
from ctcflow.manifest import COLUMNS, REJECT_COLUMNS, SPLITS, Reject, Utterance, write_jsonl
from ctcflow.params import Section
from stages.runner import StageError, stage_main
from ctcflow.text import RECIPE_ALPHABET, TOKENS_FILE, Tokenizer, has_digits, min_ctc_frames, normalize, read_vocabulary

OUT_DIR = Path("data/manifests")
METRICS_FILE = Path("metrics/manifest.json")
SOURCES = ("demo", "librispeech", "common_voice", "ljspeech", "table", "recipe_json")


class TextParams(Section):
    lowercase: bool = True
    punctuation: Literal["drop", "keep"] = "drop"
    digits: Literal["keep", "spell", "reject"] = "reject"
    language: str = "en"  # num2words language for digits: spell
    unknown: Literal["reject", "drop"] = "reject"  # units outside the vocabulary

    @field_validator("language")
    @classmethod
    def _num2words_knows_it(cls, v):
        if v not in CONVERTER_CLASSES:
            raise ValueError(f"num2words has no language {v!r}; it has {', '.join(sorted(CONVERTER_CLASSES))}")
        return v


class ColumnsParams(Section):
    path: str = "path"
    text: str = "text"
    speaker: str | None = None
    split: str | None = None
    id: str | None = None  # default: the file name without its suffix


class ManifestParams(Section):
    source: Literal[SOURCES] = "demo"
    corpus_dir: str = "data/corpus"
    table: str | None = None
    columns: ColumnsParams = ColumnsParams()
    train_json: str | None = None
    valid_json: str | None = None
    test_json: str | None = None
    input: Literal["audio", "features"] = "audio"
    feature_frame_rate: float = Field(25.0, gt=0)
    units: Literal["char", "word"] = "char"
    alphabet: str = RECIPE_ALPHABET
    vocabulary: str | None = None
    text: TextParams = TextParams()
    valid_fraction: float = Field(0.05, gt=0, lt=1)
    test_fraction: float = Field(0.05, gt=0, lt=1)
    seed: int = 0
    min_duration: float = Field(0.2, ge=0)
    max_duration: float = Field(30.0, gt=0)
    ctc_frame_rate: float = Field(33.0, gt=0)
    strict: bool = False
    num_workers: int = Field(2, ge=1, le=64)

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


def parallel_map(fn, items: list, num_workers: int, desc: str) -> list:
    """`fn` over `items` in order, in `num_workers` processes, with a progress bar.

    Processes, not threads: soundfile's header parsing holds the GIL for much of its work, and
    two threads ran at 0.86× a plain loop (benchmarks/manifest.py). The workers fork from a clean
    forkserver, not from this process: forking a process that runs threads (torch's, a progress
    bar's, a test runner's) can deadlock the child on a lock one of them held.
    """
    progress = dict(total=len(items), desc=desc, unit="file", mininterval=1.0)
    if num_workers == 1 or len(items) < 2:
        return [fn(item) for item in tqdm(items, **progress)]
    chunk = max(1, min(256, len(items) // (4 * num_workers)))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    # An executor, not a Pool: a worker that dies (killed for memory) breaks it with an error,
    # where a Pool would wait forever for the files that worker held.
    try:
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            return list(tqdm(pool.map(fn, items, chunksize=chunk), **progress))
    except BrokenProcessPool as err:
        raise StageError(f"a worker process of manifest.num_workers = {num_workers} died ({err}); "
                         "with less memory to spare, try fewer") from err


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
    results = iter(parallel_map(partial(examine, params=params, tokenizer=tokenizer),
                                [e for e, dup in zip(records, duplicate) if not dup], params.num_workers, "manifest"))
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
    write_jsonl(rejects, REJECT_COLUMNS, out_dir / "rejects.jsonl")
    (out_dir / TOKENS_FILE).write_text(json.dumps(tokenizer.units_dict(), ensure_ascii=False) + "\n")
    metrics = {
        split: {"utterances": len(rows), "hours": round(sum(r.duration for r in rows) / 3600, 4),
                "speakers": len({r.speaker for r in rows})}
        for split, rows in by_split.items()
    }
    metrics["rejected"] = {"total": len(rejects), **Counter(r.reason for r in rejects)}
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")

    print(f"{params.source}: {len(records)} utterances listed; {how}")
    for split in SPLITS:
        print(f"{split}: {metrics[split]['utterances']} utterances, {metrics[split]['hours']:.2f} h")
    if rejects:
        print(f"rejected {len(rejects)}: {dict(Counter(r.reason for r in rejects))} — see {out_dir / 'rejects.jsonl'}")
    empty = [split for split in SPLITS if not by_split[split]]
    if empty:
        raise StageError(f"no usable utterances left in split(s) {empty}; reasons are in {out_dir / 'rejects.jsonl'}")
    if params.strict and rejects:
        raise StageError(f"manifest.strict: {len(rejects)} utterance(s) rejected "
                         f"({dict(Counter(r.reason for r in rejects))}); see {out_dir / 'rejects.jsonl'}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("manifest", ManifestParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

"""Stage manifest: list every utterance with its header and transcript, one file per split.

Sources (manifest.source; see docs/corpora.md):
  demo          the synth stage's corpus: <corpus_dir>/metadata.csv
  librispeech   <corpus_dir>/[<subset>/]<reader>/<chapter>/*.flac with *.trans.txt
  common_voice  <corpus_dir>/{train,dev,test}.tsv or validated.tsv, audio in clips/
  ljspeech      <corpus_dir>/metadata.csv with wavs/
  table         a CSV, TSV or JSON-lines file (manifest.table) with the columns in manifest.columns
  recipe_json   the original recipe's {"key": "<audio path>", "text": "..."} lines (train_json, test_json,
                optionally valid_json)
  fsdd          the Free Spoken Digit Dataset: <corpus_dir>[/recordings]/{digit}_{speaker}_{index}.wav
Splits are made among the usable utterances: manifest.held_out_speakers names the valid and test
speakers (everyone else trains); otherwise they come from the corpus where it defines them, or are
made speaker-disjoint here. With manifest.input: features every path is a precomputed feature
array (.npy, frames × dims).

Extra test sets (manifest.test_sets, name → a corpus under data/test_sets/ read like the main one,
every usable row in the set) are written as data/manifests/<name>.jsonl, their names to
data/manifests/test_sets.json; featurize and evaluate treat each like the test split.
Extra training sets (manifest.train_sets, name → a corpus read like the main one) add every usable
row to train, whatever split their corpus gives it: e.g. synthetic voices beside a few real speakers.
Held-out speakers and the split fractions apply to the main corpus only.

Utterances are examined in parallel (manifest.num_workers processes), reading headers only.
Each one is checked: a new id and a new audio file (across the main corpus, test sets and training
sets, in that order: the first keeps it), inside corpus_dir, readable, duration in range, transcript
non-empty after normalization (manifest.text) and inside the vocabulary, long enough for CTC
(one output frame per unit plus one between repeats, at ctc_frame_rate frames per second).
Failures go to data/manifests/rejects.jsonl with their reason and counts by reason to
metrics/manifest.json (in all, and each extra test set's in its own block). The label unit (characters of `alphabet`, or words of `vocabulary`) goes to
data/manifests/tokens.json. With units bpe, transcripts are checked as characters of `alphabet`
(a piece spans at least one character, so pieces need no more CTC frames than characters, but for
a lone '▁' piece at the start), then a sentencepiece BPE model of at most bpe_vocab_size pieces is
trained on the training split's transcripts: it goes into tokens.json and beside it (bpe.model).
The stage fails when a split or test set is left empty (a valid or test split that held-out speakers
or the corpus chose is never refilled from train), or on any reject when manifest.strict is true.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Literal

import pandas as pd
from num2words import CONVERTER_CLASSES
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from ctcflow import sources
from ctcflow.audio import AudioInfo, check_file, read_info
from ctcflow.features import read_feature_header
from ctcflow.errors import Rejected
from ctcflow.manifest import COLUMNS, SPLITS, Reject, Utterance, count_by_reason, tally_rejects, write_jsonl, write_test_set_names
from ctcflow.params import Section
from ctcflow.workers import ordered_map
from stages.runner import StageError, fail_if_strict, stage_main
from ctcflow.text import (BPE_MODEL_FILE, TOKENS_FILE, Tokenizer, bpe_min_vocab_size, has_digits, min_ctc_frames,
                          normalize, read_vocabulary, train_bpe)

OUT_DIR = Path("data/manifests")
METRICS_FILE = Path("metrics/manifest.json")
# The folder the extra test sets live in: a dvc.yaml dep of manifest and featurize, so DVC sees a
# changed test corpus (a corpus_dir outside it would go unseen).
TEST_SETS_DIR = "data/test_sets"
TEST_SET_SOURCES = ("demo", "librispeech", "common_voice", "ljspeech", "table", "fsdd")
SOURCES = (*TEST_SET_SOURCES, "recipe_json")
TEST_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# data/manifests/<name>.jsonl and the data/features/<name>/ store folder must not overwrite these files
RESERVED_NAMES = (*SPLITS, "rejects", "features.json", "tokens.json", "test_sets.json", "rejects.jsonl", "warnings.jsonl")
# featurize names a training utterance's augmented copies <id>_aug1 … <id>_augN: a corpus id of that
# form would collide with another utterance's copy in the feature index.
RESERVED_ID = re.compile(r"_aug[0-9]+\Z")


def inside(root: str, path: str) -> bool:
    """Whether `path` lies under `root`, by the path's text: `..` and absolute paths cannot escape,
    while symbolic links inside the corpus (a common way to assemble one) still work."""
    root = os.path.join(os.path.abspath(root), "")  # with a trailing separator: /data/a is not under /data/ab
    return os.path.abspath(path).startswith(root)


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


class HeldOutSpeakers(Section):
    valid: list[str]
    test: list[str]

    @field_validator("valid", "test", mode="before")
    @classmethod
    def _names_as_text(cls, v):
        return [str(name) for name in v] if isinstance(v, list) else v  # LibriSpeech readers are numbers

    @model_validator(mode="after")
    def _one_split_each(self):
        both = sorted(set(self.valid) & set(self.test))
        if both:
            raise ValueError(f"speaker(s) {both} are in both valid and test")
        return self


class ExtraCorpus(Section):
    """A corpus besides the main one, every usable row of which goes to one place."""
    source: Literal[TEST_SET_SOURCES]
    corpus_dir: str
    table: str | None  # source table: its .csv, .tsv or .jsonl file
    columns: ColumnsParams | None  # source table: its column names (its split column is ignored)

    @model_validator(mode="after")
    def _table_has_its_columns(self):
        if self.source == "table" and not (self.table and self.columns):
            raise ValueError("source table needs table and columns")
        return self


class ExtraTestSet(ExtraCorpus):
    @model_validator(mode="after")
    def _under_test_sets_dir(self):
        for key in ("corpus_dir", "table"):
            path = getattr(self, key)
            if path and not inside(TEST_SETS_DIR, path):
                raise ValueError(f"{key} {path} must lie under {TEST_SETS_DIR}/ (the folder DVC watches)")
        return self


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
    units: Literal["char", "word", "bpe"]
    alphabet: str
    vocabulary: str | None
    bpe_vocab_size: int = Field(ge=2)
    text: TextParams
    held_out_speakers: HeldOutSpeakers
    test_sets: dict[str, ExtraTestSet]
    # Every usable row trains. Its corpus_dir must be a dep of manifest and featurize in dvc.yaml
    # (the FSDD recipe lists the synth stage's data/corpus), or DVC will not see it change.
    train_sets: dict[str, ExtraCorpus] = {}
    valid_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0)  # numpy's generators take no negative seed
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
        # Checked here, not by sentencepiece once every header has been read.
        if self.units == "bpe" and self.bpe_vocab_size < bpe_min_vocab_size(self.alphabet):
            raise ValueError(f"bpe_vocab_size: {self.bpe_vocab_size} is below {bpe_min_vocab_size(self.alphabet)}, the "
                             "least for units bpe: a piece for each character of manifest.alphabet but the space, "
                             "plus '▁' and <unk>")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction + test_fraction must leave something to train on")
        if self.min_duration >= self.max_duration:
            raise ValueError(f"min_duration {self.min_duration} must be below max_duration {self.max_duration}")
        bad = [name for name in self.test_sets if name in RESERVED_NAMES or not TEST_SET_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"test_sets: bad name(s) {bad}: letters, digits, '_', '.', '-', and none of {list(RESERVED_NAMES)}")
        if self.input == "features" and self.train_sets:
            raise ValueError("train_sets need input: audio")
        self._alphabet_fits_the_text()
        return self

    def _alphabet_fits_the_text(self):
        """Mismatches that would reject every row, or every multi-word one, caught before any header is read."""
        if self.units == "word":
            return  # the vocabulary is the unit list, case-folded like the transcripts
        cased = [c for c in self.alphabet if c.isupper() or c.islower()]  # scripts without case pass
        if self.text.lowercase and cased and not any(c.islower() for c in cased):
            raise ValueError(f"manifest.alphabet {self.alphabet!r} has no lowercase letter, but manifest.text.lowercase "
                             "is true: every transcript would be rejected; lowercase the alphabet or set lowercase: false")
        if self.units == "char" and " " not in self.alphabet:
            raise ValueError(f"manifest.alphabet {self.alphabet!r} has no space: every transcript of more than one word "
                             "would be rejected; add ' ' to it (harmless where transcripts have none)")


def read_source(params: ManifestParams | ExtraCorpus, key: str = "manifest") -> pd.DataFrame:
    """The entries of the main corpus or of an extra one (both name a source, corpus_dir, table,
    columns); `key` is where its params are, for messages. A corpus that lists nothing fails here:
    later it would read as every row rejected."""
    entries = read_entries(params, key)
    if entries.empty:
        if params.source == "table":
            raise StageError(f"{key}.table {params.table} has no rows")
        if params.source == "recipe_json":
            raise StageError(f"{key}.train_json {params.train_json} and {key}.test_json {params.test_json} have no rows")
        raise StageError(f"{key}.corpus_dir {params.corpus_dir} lists no utterances (source {params.source})")
    return entries


def read_entries(params: ManifestParams | ExtraCorpus, key: str) -> pd.DataFrame:
    corpus = Path(params.corpus_dir)
    if params.source == "demo":
        return sources.demo(corpus, key)
    if params.source in ("librispeech", "common_voice", "ljspeech", "fsdd") and not corpus.is_dir():
        raise StageError(f"{key}.corpus_dir {corpus} is not a directory")
    if params.source == "librispeech":
        return sources.librispeech(corpus, key)
    if params.source == "common_voice":
        return sources.common_voice(corpus, key)
    if params.source == "ljspeech":
        return sources.ljspeech(corpus, key)
    if params.source == "fsdd":
        return sources.fsdd(corpus, key)
    if params.source == "table":
        c = params.columns
        # An extra corpus's rows all go to one place: its split column is not read (docs/corpora.md).
        split = None if isinstance(params, ExtraCorpus) else c.split
        return sources.table(Path(params.table), c.path, c.text, c.speaker, split, c.id, key)
    return sources.recipe_json(Path(params.train_json), Path(params.test_json),
                               Path(params.valid_json) if params.valid_json else None)


def build_tokenizer(params: ManifestParams) -> Tokenizer:
    """The label unit transcripts are checked against, decided here once; train adds the blank.
    With units bpe, the characters of the alphabet: the pieces come from the checked transcripts."""
    try:
        if params.units == "word":
            return Tokenizer(read_vocabulary(params.vocabulary, params.text.lowercase), "last", "word")
        return Tokenizer(params.alphabet, "last", "char")
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest.vocabulary {params.vocabulary} not found") from None
    except IsADirectoryError:
        raise StageError(f"manifest.vocabulary {params.vocabulary} is a directory: name a file with one unit per line") from None
    except OSError as err:
        raise StageError(f"manifest.vocabulary {params.vocabulary}: {err.strerror}") from None
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


def examine(entry: dict, corpus_dir: str, params: ManifestParams, tokenizer: Tokenizer) -> Utterance | Rejected:
    """One utterance: its place, header and transcript. The reject is returned, not raised, so one
    bad file never stops a worker. Paths outside the corpus are never opened (think /dev/zero)."""
    try:
        if not inside(corpus_dir, entry["audio_path"]):
            raise Rejected("path_outside_corpus", f"{entry['audio_path']} is not under corpus_dir {corpus_dir}")
        check_file(entry["audio_path"], Rejected)
        if params.input == "features":
            info = read_feature_header(entry["audio_path"], params.feature_frame_rate)
        else:
            info = read_info(entry["audio_path"])
        return check(entry, info, params, tokenizer)
    except Rejected as err:
        return err


def check_held_out_speakers(held_out: HeldOutSpeakers, entries: pd.DataFrame) -> None:
    """Before any file is opened: every named speaker is one of the corpus's."""
    speakers = sorted(set(entries["speaker"]) - {""})
    for split in ("valid", "test"):
        unknown = [name for name in getattr(held_out, split) if name not in speakers]
        if unknown:
            shown = ", ".join(speakers[:30]) + (" …" if len(speakers) > 30 else "")
            raise StageError(f"manifest.held_out_speakers.{split}: unknown speaker(s) {unknown}; "
                             f"the corpus has {len(speakers)}: {shown}")


def examine_corpus(entries: pd.DataFrame, corpus_dir: str, params: ManifestParams, tokenizer: Tokenizer,
                   map_files, seen_audio: dict[str, str]) -> tuple[list[Utterance], list[Reject]]:
    """Every entry, examined by `map_files` (an ordered map over worker processes): the accepted
    utterances and the rejects, both in the entries' order. `seen_audio` (resolved audio path → the
    id that listed it), shared by every corpus of the run, gains this corpus's paths."""
    records = entries.to_dict("records")

    def settle(entry: dict, duplicate: bool) -> Rejected | None:
        """Without opening a file: a row its reader could not use, a reserved id, an id seen before,
        audio listed before (in this corpus or an earlier one)."""
        if isinstance(rejected := entry.get(sources.REJECTED_COLUMN), Rejected):
            return rejected
        if RESERVED_ID.search(entry["id"]):
            return Rejected("reserved_id", f"id {entry['id']!r} ends in _aug<k>, the suffix of featurize's augmented copies")
        if duplicate:
            return Rejected("duplicate_id", f"id {entry['id']!r} appears more than once")
        if not inside(corpus_dir, entry["audio_path"]):
            return None  # examine rejects it as path_outside_corpus, the reason that matters; it claims no audio
        # One recording under two ids would be two rows, possibly one in train and one in test.
        # realpath: a symbolic link (or ./, ../) to a listed file is the same audio. Nothing is opened.
        audio = os.path.realpath(entry["audio_path"])
        if audio in seen_audio:
            return Rejected("duplicate_audio", f"{entry['audio_path']} is already listed, as id {seen_audio[audio]!r}")
        seen_audio[audio] = entry["id"]
        return None

    settled = [settle(entry, duplicate) for entry, duplicate in zip(records, entries["id"].duplicated())]
    todo = [entry for entry, result in zip(records, settled) if result is None]
    results = iter(list(tqdm(map_files(partial(examine, corpus_dir=corpus_dir, params=params, tokenizer=tokenizer), todo),
                             total=len(todo), desc="manifest", unit="file", mininterval=1.0)))
    accepted: list[Utterance] = []
    rejects: list[Reject] = []
    for entry, result in zip(records, settled):
        result = next(results) if result is None else result
        if isinstance(result, Rejected):
            rejects.append(Reject(entry["id"], entry["split"], entry["audio_path"], entry["text"], result.reason, result.detail))
        else:
            accepted.append(result)
    return accepted, rejects


def examine_extra_corpora(entries: dict[str, pd.DataFrame], corpora: dict[str, ExtraCorpus], params: ManifestParams,
                          tokenizer: Tokenizer, map_files, seen_audio: dict[str, str]
                          ) -> tuple[dict[str, list[Utterance]], list[Reject]]:
    """examine_corpus for each extra test or training set: its accepted utterances by name, and all their rejects."""
    accepted, rejects = {}, []
    for name, set_entries in entries.items():
        accepted[name], set_rejects = examine_corpus(set_entries, corpora[name].corpus_dir, params, tokenizer, map_files,
                                                     seen_audio)
        rejects += set_rejects
    return accepted, rejects


def split_key(params: ManifestParams, split: str) -> str:
    """The params key of the file or folder that defines a corpus's split, for messages."""
    if params.source == "recipe_json":
        return f"manifest.{split}_json {getattr(params, f'{split}_json')}"
    if params.source == "table":
        return f"manifest.table {params.table} (column manifest.columns.split)"
    return f"manifest.corpus_dir {params.corpus_dir} (source {params.source})"


def assign_splits(accepted: list[Utterance], params: ManifestParams, defined: set[str],
                  rejects_file: Path) -> tuple[list[Utterance], str]:
    """The splits, made among the usable utterances only. `defined`: the splits the corpus's
    entries name, rejects included. A held-out split the user chose (held-out speakers) or the
    corpus defines, left empty by rejects, fails the stage: filling it from train would replace
    the user's valid or test set with training speakers behind their back."""
    frame = pd.DataFrame({"id": [u.id for u in accepted], "split": [u.split for u in accepted],
                          "speaker": [u.speaker for u in accepted]}, dtype=str)
    held_out = params.held_out_speakers
    named = held_out.valid or held_out.test
    if named:
        frame = sources.hold_out_speakers(frame, held_out.valid, held_out.test)
    if accepted:  # with nothing usable at all, run's check names every empty split at once
        for split in ("valid", "test"):
            if (frame["split"] == split).any():
                continue
            if getattr(held_out, split):
                raise StageError(f"manifest.held_out_speakers.{split}: every row of speaker(s) {getattr(held_out, split)} "
                                 f"was rejected, so the {split} split would be empty; reasons are in {rejects_file}")
            if not named and split in defined:
                raise StageError(f"every row of the corpus's {split} split ({split_key(params, split)}) was rejected, "
                                 f"so the {split} split would be empty; reasons are in {rejects_file}")
    # Fills only the splits still empty: with held-out speakers, a split that named none.
    frame, how = sources.assign_splits(frame, params.valid_fraction, params.test_fraction, params.seed)
    if named:
        how = "speakers from manifest.held_out_speakers" + ("" if held_out.valid and held_out.test else f"; {how}")
    return [u if u.split == split else dataclasses.replace(u, split=split)
            for u, split in zip(accepted, frame["split"])], how


def drop_seen_ids(rows: list[Utterance], seen: set[str]) -> tuple[list[Utterance], list[Reject]]:
    """An extra training corpus's rows whose id another corpus already has are rejects: one id, one feature row."""
    return ([u for u in rows if u.id not in seen],
            [Reject(u.id, u.split, u.audio_path, u.text, "duplicate_id", f"id {u.id!r} is in another corpus too")
             for u in rows if u.id in seen])


def one_width(utterances: list[Utterance], dims: int) -> tuple[list[Utterance], list[Reject]]:
    """One model input size: feature arrays whose width differs from `dims` are rejected."""
    return ([u for u in utterances if u.num_channels == dims],
            [Reject(u.id, u.split, u.audio_path, u.text, "feature_dims_mismatch", f"{u.num_channels} dims, the corpus has {dims}")
             for u in utterances if u.num_channels != dims])


def summary(rows: list[Utterance]) -> dict:
    return {"utterances": len(rows), "hours": round(sum(r.duration for r in rows) / 3600, 4),
            "speakers": len({r.speaker for r in rows})}


def run(params: ManifestParams, out_dir: Path = OUT_DIR, metrics_file: Path = METRICS_FILE) -> dict:
    tokenizer = build_tokenizer(params)
    entries = read_source(params)
    unknown_splits = set(entries["split"]) - {*SPLITS, ""}
    if unknown_splits:
        raise StageError(f"unknown split name(s) {sorted(unknown_splits)}; expected {list(SPLITS)}")
    check_held_out_speakers(params.held_out_speakers, entries)
    # Every row of a test set is in that set, whatever split its corpus gives it.
    test_set_entries = {name: read_source(test_set, f"manifest.test_sets.{name}").assign(split=name)
                        for name, test_set in params.test_sets.items()}
    train_set_entries = {name: read_source(train_set, f"manifest.train_sets.{name}").assign(split="train")
                         for name, train_set in params.train_sets.items()}
    with ordered_map(params.num_workers, "manifest.num_workers", __name__, max_chunk=256) as map_files:
        # The first listing of a recording keeps it: the main corpus, then test sets, then training sets,
        # so a training set that repeats a test set's audio never trains on what is scored.
        seen_audio: dict[str, str] = {}
        accepted, rejects = examine_corpus(entries, params.corpus_dir, params, tokenizer, map_files, seen_audio)
        test_sets, test_rejects = examine_extra_corpora(test_set_entries, params.test_sets, params, tokenizer, map_files,
                                                        seen_audio)
        train_sets, train_rejects = examine_extra_corpora(train_set_entries, params.train_sets, params, tokenizer,
                                                          map_files, seen_audio)
        rejects += test_rejects + train_rejects

    if params.input == "features" and accepted:
        dims = Counter(u.num_channels for u in accepted).most_common(1)[0][0]
        accepted, wrong = one_width(accepted, dims)
        rejects += wrong
        for name in test_sets:
            test_sets[name], wrong = one_width(test_sets[name], dims)
            rejects += wrong
    rejects_file = out_dir / "rejects.jsonl"
    try:
        accepted, how = assign_splits(accepted, params, set(entries["split"]) - {""}, rejects_file)
    except StageError:
        tally_rejects(rejects, rejects_file, "rejected")  # the reasons the message points at
        raise
    for name, rows in train_sets.items():
        train_sets[name], clashes = drop_seen_ids(rows, {u.id for u in accepted})
        rejects += clashes
        accepted += train_sets[name]

    by_split = {split: [u for u in accepted if u.split == split] for split in SPLITS}
    for name, rows in {**by_split, **test_sets}.items():
        write_jsonl(rows, COLUMNS, out_dir / f"{name}.jsonl")
    if params.units == "bpe" and by_split["train"]:
        model = train_bpe([u.text_normalized for u in by_split["train"]], params.bpe_vocab_size, params.alphabet)
        (out_dir / BPE_MODEL_FILE).write_bytes(model)  # for sentencepiece's own tools; train reads tokens.json
        tokenizer = Tokenizer.from_bpe_model(model, "last")
        print(f"BPE model of {len(tokenizer.alphabet)} pieces (manifest.bpe_vocab_size {params.bpe_vocab_size})")
    (out_dir / TOKENS_FILE).write_text(json.dumps(tokenizer.units_dict(), ensure_ascii=False) + "\n")
    write_test_set_names(out_dir, list(test_sets))
    metrics = {split: summary(rows) for split, rows in by_split.items()}
    print(f"{params.source}: {len(entries)} utterances listed; {how}")
    for split in SPLITS:
        print(f"{split}: {metrics[split]['utterances']} utterances, {metrics[split]['hours']:.2f} h")
    if test_sets:  # only then: a project without them keeps the metrics it had
        # A set's rejects are its own (split = its name): its score covers only what is left.
        metrics["test_sets"] = {
            name: {**summary(rows), "rejected": count_by_reason(r.reason for r in rejects if r.split == name)}
            for name, rows in test_sets.items()}
        for name, counts in metrics["test_sets"].items():
            rejected = counts["rejected"]["total"]
            print(f"test set {name}: {counts['utterances']} utterances, {counts['hours']:.2f} h"
                  + (f", {rejected} rejected: see {rejects_file}" if rejected else ""))
    if train_sets:  # their rows are counted in train too
        metrics["train_sets"] = {name: summary(rows) for name, rows in train_sets.items()}
        for name, counts in metrics["train_sets"].items():
            print(f"training set {name}: {counts['utterances']} utterances, {counts['hours']:.2f} h (in train)")
    metrics["rejected"] = tally_rejects(rejects, rejects_file, "rejected")
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")

    empty = [name for name, rows in {**by_split, **test_sets}.items() if not rows]
    empty += [f"train_sets.{name}" for name, rows in train_sets.items() if not rows]
    if empty:
        raise StageError(f"no usable utterances left in split(s) {empty}; reasons are in {rejects_file}")
    fail_if_strict("manifest.strict", params.strict, metrics["rejected"], rejects_file)
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("manifest", ManifestParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

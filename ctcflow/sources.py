"""One reader per corpus layout, each giving the same table of utterances to the manifest stage.

Every reader returns a DataFrame with ENTRY_COLUMNS: id, split, audio_path, text, speaker.
`split` is "train", "valid" or "test" where the corpus defines it, otherwise "" and
`assign_splits` makes speaker-disjoint splits. Audio paths are relative to the project root
(or absolute, as the corpus lists them); nothing here opens an audio file. A reader may add a
column REJECTED_COLUMN: a `Rejected` for a file it lists but cannot use (an FSDD file name off
the pattern), None for the others; the manifest stage rejects those rows without opening them.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ctcflow.errors import CtcflowError, Rejected

ENTRY_COLUMNS = ["id", "split", "audio_path", "text", "speaker"]
REJECTED_COLUMN = "rejected"
# What corpora call their splits → the pipeline's names.
SPLIT_NAMES = {"train": "train", "dev": "valid", "valid": "valid", "validation": "valid", "test": "test", "": ""}


class SourceError(CtcflowError):
    """A corpus or table that the manifest stage cannot read as the chosen source."""


def _frame(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)[ENTRY_COLUMNS]


def _resolve(base: Path, paths) -> list[str]:
    return [p if Path(p).is_absolute() else str(base / p) for p in paths]


def _split_names(values, where: str, key: str = "manifest") -> list[str]:
    names = [SPLIT_NAMES.get(str(v).strip().lower()) for v in values]
    unknown = sorted({str(v) for v, n in zip(values, names) if n is None})
    if unknown:
        raise SourceError(f"{where}: unknown split name(s) {unknown} in the column that {key}.columns.split names; "
                          "expected train, dev/valid/validation or test")
    return names


def _read_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 (a Latin-1 é) are a SourceError naming the line."""
    data = path.read_bytes()
    # Editors on Windows save UTF-8 with a BOM; pandas drops it, so the other readers do too.
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SourceError(f"{path}, line {line}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "save it as UTF-8") from None


def _read_csv(path: Path, **options) -> pd.DataFrame:
    """pd.read_csv with every value a string; a file it cannot parse is a SourceError naming it."""
    try:
        # index_col=False: else one extra field in the first data row makes the first column the index.
        return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False, **options)
    except UnicodeDecodeError:  # pandas' byte offset is within its buffer: find the line in the file
        _read_utf8(path)
        raise
    except (ValueError, pd.errors.ParserError) as err:
        raise SourceError(f"{path}: cannot read it as a table: {err}") from err


def _check_rows(path: Path, sep: str, quoting: int, max_fields: int | None = None) -> None:
    """Refuse what pandas would read silently wrong, naming the line where the row starts: a cell
    holding a line break (an unbalanced quote swallows the rows after it into one cell), and a row
    whose field count differs from the header's (pandas pads a short row and misplaces a long one).
    With `max_fields` there is no header: only rows longer than that are refused."""
    reader = csv.reader(io.StringIO(_read_utf8(path), newline=""), delimiter=sep, quoting=quoting)
    header, start = None, 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if len(record) <= 1 and not "".join(record).strip():
                continue  # a blank line, which pandas skips too
            if any("\n" in cell or "\r" in cell for cell in record):
                raise SourceError(f"{path}, line {line}: a cell runs over several lines "
                                  "(an unbalanced quote?); quote the whole cell or remove the quote")
            if max_fields is not None:
                if len(record) > max_fields:
                    raise SourceError(f"{path}, line {line}: {len(record)} fields, expected at most {max_fields} "
                                      f"separated by {sep!r}")
            elif header is None:
                header = record
            elif len(record) != len(header):
                raise SourceError(f"{path}, line {line}: {len(record)} fields, the header has {len(header)} "
                                  f"(a stray {sep!r}, or one missing?)")
    except csv.Error as err:
        raise SourceError(f"{path}, line {start}: cannot read it as a table: {err}") from None


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line, each value as JSON gives it (None where a key is absent), so that
    the caller tells a string from a number or a list: pandas would turn ids into floats (1 → 1.0)
    as soon as one row lacks the key, and a list into its Python repr."""
    records = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 unescaped.
    for number, line in enumerate(_read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise SourceError(f"{path}, line {number}: not JSON: {err}") from None
        if not isinstance(record, dict):
            raise SourceError(f"{path}, line {number}: expected a JSON object, got {json.dumps(record)[:80]}")
        records.append(record)
    columns = list(dict.fromkeys(key for record in records for key in record))
    return pd.DataFrame({c: [record.get(c) for record in records] for c in columns}, columns=columns, dtype=object)


def _as_text(value) -> str:
    """A JSON value as the text a CSV cell would hold: strings as they are, null '', others as JSON."""
    return "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _read_table(path: Path, sep: str | None = None) -> pd.DataFrame:
    """CSV or TSV (by suffix or `sep`), every value a string ('' where missing); or JSON lines, every
    value as JSON gives it (see _read_jsonl)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES and sep is None:
        return _read_jsonl(path)
    sep = sep or ("\t" if suffix in (".tsv", ".tab") else ",")
    # QUOTE_NONE for tabs: Common Voice sentences contain unbalanced quotes.
    quoting = csv.QUOTE_NONE if sep in ("\t", "|") else csv.QUOTE_MINIMAL
    _check_rows(path, sep, quoting)
    return _read_csv(path, sep=sep, quoting=quoting)


DEMO_COLUMNS = ["id", "split", "path", "text", "speaker"]


def demo(corpus_dir: Path, key: str = "manifest") -> pd.DataFrame:
    """The synth stage's corpus: metadata.csv with id, split, path, text, speaker. `key` is where
    its params are (manifest, or a test or training set's), for messages."""
    metadata = corpus_dir / "metadata.csv"
    if not metadata.is_file():
        raise SourceError(f"{metadata} not found: run the synth stage, or set {key}.source")
    frame = _read_csv(metadata)
    missing = [c for c in DEMO_COLUMNS if c not in frame.columns]
    if missing:
        raise SourceError(f"{metadata}: no column(s) {missing}; the synth stage writes {DEMO_COLUMNS}")
    return _frame(id=frame["id"], split=frame["split"], audio_path=[str(corpus_dir / p) for p in frame["path"]],
                  text=frame["text"], speaker=frame["speaker"])


def librispeech(corpus_dir: Path, key: str = "manifest") -> pd.DataFrame:
    """[<subset>/]<reader>/<chapter>/<reader>-<chapter>.trans.txt lines "<id> <TEXT>", audio <id>.flac.

    A subset folder named train*, dev* or test* (train-clean-100, dev-clean, …) gives the split;
    the reader folder gives the speaker. A .flac file that no transcript line names is listed,
    flagged missing_transcript.
    """
    def place(file: Path) -> tuple[str, str]:  # the split and the speaker its folders give
        parts = file.relative_to(corpus_dir).parts
        subset = parts[-4].lower() if len(parts) >= 4 else ""
        split = next((SPLIT_NAMES[p] for p in ("train", "dev", "test") if subset.startswith(p)), "")
        return split, parts[-3] if len(parts) >= 3 else ""

    rows = []
    # os.walk, not Path.rglob: it follows symbolic links, a common way to assemble subsets.
    found = [Path(d) / f for d, _, files in os.walk(corpus_dir, followlinks=True) for f in files]
    for trans in sorted(p for p in found if p.name.endswith(".trans.txt")):
        split, speaker = place(trans)
        for line in _read_utf8(trans).splitlines():
            if line.strip():
                # Any whitespace: a tab after the id is as common as a space.
                utt_id, text = (line.split(None, 1) + [""])[:2]
                rows.append((utt_id, split, str(trans.parent / f"{utt_id}.flac"), text.strip(), speaker, None))
    if not rows:
        raise SourceError(f"{key}.corpus_dir {corpus_dir}: no *.trans.txt under it; expected "
                          "<reader>/<chapter>/*.trans.txt (LibriSpeech)")
    # Audio without a transcript line would vanish: list it, to be rejected with its reason.
    listed = {row[2] for row in rows}
    for flac in sorted(p for p in found if p.suffix.lower() == ".flac" and str(p) not in listed):
        split, speaker = place(flac)
        rows.append((flac.stem, split, str(flac), "", speaker, Rejected(
            "missing_transcript", f"no line for {flac.stem} in a *.trans.txt of {flac.parent}")))
    return pd.DataFrame(rows, columns=[*ENTRY_COLUMNS, REJECTED_COLUMN])


def common_voice(corpus_dir: Path, key: str = "manifest") -> pd.DataFrame:
    """train.tsv/dev.tsv/test.tsv (or validated.tsv alone) with client_id, path, sentence; audio clips/<path>."""
    files = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}
    tables = {split: corpus_dir / name for split, name in files.items() if (corpus_dir / name).is_file()}
    if not tables:
        if not (corpus_dir / "validated.tsv").is_file():
            raise SourceError(f"{key}.corpus_dir {corpus_dir} has no train.tsv, dev.tsv, test.tsv or validated.tsv "
                              "(Common Voice)")
        tables = {"": corpus_dir / "validated.tsv"}
    frames = []
    for split, path in tables.items():
        frame = _read_table(path, sep="\t")
        missing = {"client_id", "path", "sentence"} - set(frame.columns)
        if missing:
            raise SourceError(f"{path}: lacks column(s) {sorted(missing)}")
        frames.append(_frame(id=[Path(p).stem for p in frame["path"]], split=split,
                             audio_path=[str(corpus_dir / "clips" / p) for p in frame["path"]],
                             text=frame["sentence"], speaker=frame["client_id"]))
    return pd.concat(frames, ignore_index=True)


def ljspeech(corpus_dir: Path, key: str = "manifest") -> pd.DataFrame:
    """metadata.csv lines "<id>|<text>|<normalized text>", audio wavs/<id>.wav, one speaker.

    The third column (numbers and abbreviations written out by the corpus) is used where present.
    """
    path = corpus_dir / "metadata.csv"
    if not path.is_file():
        raise SourceError(f"{path} not found: set {key}.corpus_dir to the LJSpeech folder (metadata.csv, wavs/)")
    # A '|' inside a text makes a fourth field, and pandas would shift the columns silently.
    _check_rows(path, "|", csv.QUOTE_NONE, max_fields=3)
    frame = _read_csv(path, sep="|", header=None, quoting=csv.QUOTE_NONE)
    if frame.shape[1] < 2:
        raise SourceError(f"{path}: expected lines '<id>|<text>|<normalized text>'")
    text = frame[2].where(frame[2] != "", frame[1]) if frame.shape[1] > 2 else frame[1]
    return _frame(id=frame[0], split="", audio_path=[str(corpus_dir / "wavs" / f"{i}.wav") for i in frame[0]],
                  text=text, speaker="")


FSDD_NAME = re.compile(r"(?P<digit>[0-9])_(?P<speaker>[^_]+)_(?P<index>[0-9]+)")
# FSDD ships WAV; a converted copy is as usable, and soundfile reads these too.
FSDD_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def fsdd(corpus_dir: Path, key: str = "manifest") -> pd.DataFrame:
    """The Free Spoken Digit Dataset: recordings named {digit}_{speaker}_{index}.wav, the transcript
    the digit spelled out ("zero" … "nine"). `corpus_dir` is the folder of recordings or the FSDD
    repository root (its recordings/ folder). Every .wav, .flac, .ogg or .mp3 file of the folder is
    listed; one whose name does not fit the pattern is flagged bad_file_name. Sub-folders and other
    files are not read, and their count is printed. No splits."""
    folder = corpus_dir / "recordings" if (corpus_dir / "recordings").is_dir() else corpus_dir
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    files = [p for p in entries if p.suffix.lower() in FSDD_SUFFIXES and not p.is_dir()]
    if not files:
        raise SourceError(f"no .wav files in {folder}: expected FSDD's recordings, {{digit}}_{{speaker}}_{{index}}.wav "
                          f"(or .flac, .ogg, .mp3; set {key}.corpus_dir)")
    # Said, not silent: a recording in a sub-folder or of another format is left out.
    skipped = [p for p in entries if p not in files]
    if skipped:
        print(f"fsdd: {len(skipped)} sub-folder(s) or file(s) not {'/'.join(FSDD_SUFFIXES)} in {folder} "
              f"left out (the first: {skipped[0].name})", file=sys.stderr)
    rows = []
    for path in files:
        name = FSDD_NAME.fullmatch(path.stem)
        if name:
            rows.append((path.stem, "", str(path), DIGIT_WORDS[int(name["digit"])], name["speaker"], None))
        else:
            rows.append((path.stem, "", str(path), "", "", Rejected(
                "bad_file_name", f"{path.name} does not fit FSDD's {{digit}}_{{speaker}}_{{index}}.wav")))
    if all(row[-1] is not None for row in rows):  # else held_out_speakers would say "the corpus has 0"
        raise SourceError(f"none of the {len(files)} .wav files in {folder} fits FSDD's "
                          f"{{digit}}_{{speaker}}_{{index}}.wav (the first: {files[0].name}): is it FSDD?")
    return pd.DataFrame(rows, columns=[*ENTRY_COLUMNS, REJECTED_COLUMN])


def _table_rejects(paths: list[str], texts: list, path_column: str) -> list[Rejected | None]:
    """Rows settled without opening a file: an empty path (the table's own folder, not a recording),
    a JSON value that is not a string as the transcript (a list or an object is no sentence)."""
    def reject(audio_path: str, text) -> Rejected | None:
        if not audio_path:
            return Rejected("missing_file", f"the path column {path_column!r} is empty")
        if text is not None and not isinstance(text, str):
            return Rejected("bad_transcript", f"the transcript is a JSON {type(text).__name__}, not a string: "
                                              f"{_as_text(text)[:80]}")
        return None
    return [reject(p, t) for p, t in zip(paths, texts)]


def table(path: Path, path_column: str, text_column: str, speaker_column: str | None, split_column: str | None,
          id_column: str | None, key: str = "manifest", fixed_columns: bool = False) -> pd.DataFrame:
    """A CSV, TSV or JSON-lines file, one utterance per row; relative paths are relative to its folder.
    The optional columns may be None: no speakers, splits made later, ids from the file names (as for
    a row whose id is empty). `key` is where its params are (its table and columns), for messages;
    `fixed_columns`: a format whose column names no param sets (recipe_json)."""
    if path.is_dir():
        raise SourceError(f"{key}.table {path} is a directory: name a .csv, .tsv or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"{key}.table {path} not found")
    frame = _read_table(path)
    wanted = [c for c in (path_column, text_column, speaker_column, split_column, id_column) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        fix = f"the format needs {wanted}" if fixed_columns else f"set {key}.columns"
        raise SourceError(f"{path}: no column(s) {missing}; it has {list(frame.columns)} ({fix})")
    rejected = _table_rejects(frame[path_column].map(_as_text).str.strip().tolist(), frame[text_column].tolist(),
                              path_column)
    if path.suffix.lower() in JSONL_SUFFIXES:  # values as JSON gave them: now as a CSV cell holds them
        frame = frame.map(_as_text)
    # Stray spaces around a name are invisible in the file: 'alice ' would not match held-out 'alice'.
    paths = frame[path_column].str.strip().tolist()
    ids = frame[id_column].str.strip().tolist() if id_column else [""] * len(paths)
    return _frame(
        id=[i or Path(p).stem for i, p in zip(ids, paths)],
        split=_split_names(frame[split_column].tolist(), str(path), key) if split_column else "",
        audio_path=[p and resolved for p, resolved in zip(paths, _resolve(path.parent, paths))],
        text=frame[text_column],
        speaker=frame[speaker_column].str.strip() if speaker_column else "",
    ).assign(**{REJECTED_COLUMN: rejected})


def recipe_json(train_json: Path, test_json: Path, valid_json: Path | None) -> pd.DataFrame:
    """The original recipe's JSON lines, {"key": "<audio path>", "text": "..."}, one file per split.
    An id is the audio path relative to the folder all the files' audio shares, without its suffix:
    train/0001.wav and test/0001.wav would both be 0001 by their names alone."""
    files = {"train": train_json, "valid": valid_json, "test": test_json}
    frames = []
    for split, path in files.items():
        if path is None:
            continue
        if path.is_dir():
            raise SourceError(f"manifest.{split}_json {path} is a directory: name a JSON-lines file")
        if not path.is_file():
            raise FileNotFoundError(f"manifest.{split}_json {path} not found")
        frame = table(path, "key", "text", speaker_column=None, split_column=None, id_column=None,
                      key=f"manifest.{split}_json", fixed_columns=True)
        frame["split"] = split
        frames.append(frame)
    entries = pd.concat(frames, ignore_index=True)
    folders = [os.path.dirname(os.path.abspath(p)) for p in entries["audio_path"] if p]
    if folders:
        shared = os.path.commonpath(folders)
        entries["id"] = [str(Path(os.path.relpath(os.path.abspath(p), shared)).with_suffix("")) if p else i
                         for i, p in zip(entries["id"], entries["audio_path"])]
    return entries


def hold_out_speakers(entries: pd.DataFrame, valid: list[str], test: list[str]) -> pd.DataFrame:
    """The named speakers' rows to valid and test, every other row to train, whatever split the
    corpus gave them."""
    held_out = {**dict.fromkeys(valid, "valid"), **dict.fromkeys(test, "test")}
    return entries.assign(split=entries["speaker"].map(held_out).fillna("train"))


def assign_splits(entries: pd.DataFrame, valid_fraction: float, test_fraction: float, seed: int) -> tuple[pd.DataFrame, str]:
    """Fill in the splits a corpus does not define, keeping speakers disjoint where it can.

    Rows without a split, and the training rows when the corpus has no valid (or no test) rows,
    form a pool. Its speakers, in a seeded random order, go to test until it holds `test_fraction`
    of the pool, then to valid until it holds `valid_fraction`, the rest to train. A speaker is
    only placed in a held-out split if it keeps that split within 1.5 × its target; rows without
    a speaker count as speakers of their own. If a held-out split still ends up empty (a corpus
    of one or a few speakers, such as LJSpeech), the pool is split by utterance instead.
    Returns the entries and a sentence saying what was done.
    """
    entries = entries.copy()
    wanted = [s for s, f in (("test", test_fraction), ("valid", valid_fraction)) if not (entries["split"] == s).any()]
    pool = entries.index[entries["split"].isin(["", "train"])] if wanted else entries.index[entries["split"] == ""]
    if not wanted:
        entries.loc[pool, "split"] = "train"
        return entries, "splits from the corpus"
    fractions = {"test": test_fraction, "valid": valid_fraction}
    targets = {s: max(1, round(fractions[s] * len(pool))) for s in wanted}
    rng = np.random.default_rng(seed)

    def place(groups: pd.Series) -> dict[str, list]:
        sizes = groups.value_counts()
        keys = sorted(sizes.index)
        placed: dict[str, list] = {s: [] for s in wanted}
        counts = dict.fromkeys(wanted, 0)
        for key in (keys[i] for i in rng.permutation(len(keys))):
            split = next((s for s in wanted if counts[s] < targets[s] and counts[s] + sizes[key] <= 1.5 * targets[s]), None)
            if split:
                placed[split].append(key)
                counts[split] += sizes[key]
        return placed

    speakers = entries.loc[pool, "speaker"].where(entries.loc[pool, "speaker"] != "", "id:" + entries.loc[pool, "id"])
    placed, how = place(speakers), "speaker-disjoint"
    if any(not keys for keys in placed.values()):
        speakers = pd.Series([f"row:{i}" for i in pool], index=pool)
        placed, how = place(speakers), "by utterance (too few speakers to keep them disjoint)"
    entries.loc[pool, "split"] = "train"
    for split, keys in placed.items():
        entries.loc[speakers.index[speakers.isin(keys)], "split"] = split
    return entries, f"{' and '.join(wanted)} held out {how}"

"""Stage manifest: list every utterance with its audio header and transcript, one file per split.

Sources (manifest.source):
  demo         the synth stage's corpus: <corpus_dir>/metadata.csv (id, split, path, text, speaker)
  recipe_json  the original recipe's JSON lines, {"key": "<audio path>", "text": "..."} per line,
               from train_json and test_json (and valid_json, or a held-out share of train)

Each utterance is checked: audio readable, duration in range, transcript non-empty and inside
the alphabet, and long enough for CTC (at ctc_frame_rate output frames per second, one frame per
character plus one between repeated characters). Failures go to data/manifests/rejects.jsonl
with their reason; counts by reason go to metrics/manifest.json. The stage fails only when a
split is left empty.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from tqdm import tqdm

from ctcflow.audio import read_info
from ctcflow.manifest import COLUMNS, REJECT_COLUMNS, SPLITS, Reject, Rejected, Utterance, write_jsonl
from ctcflow.params import Section
from ctcflow.stage import StageError, stage_main
from ctcflow.text import Tokenizer, min_ctc_frames, normalize

OUT_DIR = Path("data/manifests")
METRICS_FILE = Path("metrics/manifest.json")


class ManifestParams(Section):
    source: Literal["demo", "recipe_json"] = "demo"
    corpus_dir: str = "data/corpus"
    train_json: str | None = None
    valid_json: str | None = None
    test_json: str | None = None
    valid_fraction: float = Field(0.05, gt=0, lt=1)
    min_duration: float = Field(0.2, ge=0)
    max_duration: float = Field(30.0, gt=0)
    ctc_frame_rate: float = Field(33.0, gt=0)
    seed: int = 0


def demo_entries(params: ManifestParams) -> pd.DataFrame:
    corpus = Path(params.corpus_dir)
    metadata = corpus / "metadata.csv"
    if not metadata.is_file():
        raise StageError(f"{metadata} not found: run the synth stage, or set manifest.source")
    frame = pd.read_csv(metadata, dtype=str, keep_default_na=False)
    frame["audio_path"] = [str(corpus / p) for p in frame["path"]]
    return frame[["id", "split", "audio_path", "text", "speaker"]]


def read_recipe_json(path: str, split: str) -> pd.DataFrame:
    frame = pd.read_json(path, lines=True, dtype=str)
    if not {"key", "text"} <= set(frame.columns):
        raise StageError(f"{path}: expected lines like {{\"key\": \"<audio path>\", \"text\": \"...\"}}")
    base = Path(path).parent
    return pd.DataFrame({
        "id": [Path(k).stem for k in frame["key"]],
        "split": split,
        # Relative keys are taken relative to the JSON file, as a user would expect.
        "audio_path": [str(base / k) if not Path(k).is_absolute() else k for k in frame["key"]],
        "text": frame["text"].fillna(""),
        "speaker": "",
    })


def recipe_json_entries(params: ManifestParams) -> pd.DataFrame:
    if not params.train_json or not params.test_json:
        raise StageError("manifest.source recipe_json needs manifest.train_json and manifest.test_json")
    train = read_recipe_json(params.train_json, "train")
    if params.valid_json:
        valid = read_recipe_json(params.valid_json, "valid")
    else:
        held_out = np.random.default_rng(params.seed).random(len(train)) < params.valid_fraction
        train.loc[held_out, "split"] = "valid"
        valid = train.iloc[0:0]
    return pd.concat([train, valid, read_recipe_json(params.test_json, "test")], ignore_index=True)


def check(entry: dict, params: ManifestParams, tokenizer: Tokenizer) -> Utterance:
    """The accepted utterance, or `Rejected` with the reason."""
    info = read_info(entry["audio_path"])
    if info.duration < params.min_duration:
        raise Rejected("too_short_audio", f"{info.duration:.3f} s < min_duration {params.min_duration} s")
    if info.duration > params.max_duration:
        raise Rejected("too_long_audio", f"{info.duration:.3f} s > max_duration {params.max_duration} s")
    text = normalize(entry["text"])
    if not text:
        raise Rejected("empty_transcript", f"transcript {entry['text']!r} is empty after normalization")
    unknown = tokenizer.unknown_chars(text)
    if unknown:
        raise Rejected("characters_outside_vocabulary", f"{sorted(unknown)} in {text!r}")
    needed = min_ctc_frames(tokenizer.encode(text))
    available = int(info.duration * params.ctc_frame_rate)
    if needed > available:
        raise Rejected("too_short_for_transcript", f"CTC needs {needed} frames, {info.duration:.2f} s gives {available}")
    return Utterance(
        id=entry["id"], audio_path=entry["audio_path"], duration=round(info.duration, 4),
        sample_rate=info.sample_rate, num_channels=info.num_channels, text=entry["text"],
        text_normalized=text, speaker=entry["speaker"], split=entry["split"],
    )


def run(params: ManifestParams, out_dir: Path = OUT_DIR, metrics_file: Path = METRICS_FILE) -> dict:
    entries = demo_entries(params) if params.source == "demo" else recipe_json_entries(params)
    unknown_splits = set(entries["split"]) - set(SPLITS)
    if unknown_splits:
        raise StageError(f"unknown split name(s) {sorted(unknown_splits)}; expected {list(SPLITS)}")
    tokenizer = Tokenizer()
    accepted: dict[str, list[Utterance]] = {split: [] for split in SPLITS}
    rejects: list[Reject] = []
    seen: set[str] = set()
    for entry in tqdm(entries.to_dict("records"), desc="manifest", unit="utt"):
        try:
            if entry["id"] in seen:
                raise Rejected("duplicate_id", f"id {entry['id']!r} appears more than once")
            seen.add(entry["id"])
            accepted[entry["split"]].append(check(entry, params, tokenizer))
        except Rejected as err:
            rejects.append(Reject(entry["id"], entry["split"], entry["audio_path"], entry["text"], err.reason, err.detail))

    for split, rows in accepted.items():
        write_jsonl(rows, COLUMNS, out_dir / f"{split}.jsonl")
    write_jsonl(rejects, REJECT_COLUMNS, out_dir / "rejects.jsonl")
    metrics = {
        split: {"utterances": len(rows), "hours": round(sum(r.duration for r in rows) / 3600, 4),
                "speakers": len({r.speaker for r in rows})}
        for split, rows in accepted.items()
    }
    metrics["rejected"] = {"total": len(rejects), **Counter(r.reason for r in rejects)}
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")

    for split in SPLITS:
        print(f"{split}: {metrics[split]['utterances']} utterances, {metrics[split]['hours']:.2f} h")
    if rejects:
        print(f"rejected {len(rejects)}: {dict(Counter(r.reason for r in rejects))} — see {out_dir / 'rejects.jsonl'}")
    empty = [split for split in SPLITS if not accepted[split]]
    if empty:
        raise StageError(f"no usable utterances left in split(s) {empty}; reasons are in {out_dir / 'rejects.jsonl'}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("manifest", ManifestParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

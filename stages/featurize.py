"""Stage featurize: log-mel features for every accepted utterance, normalized by training statistics.

Audio is down-mixed to mono and resampled to featurize.sample_rate, then turned into
torchaudio log-mel frames. Each split is stored as one float16 array plus an index (see
ctcflow/data.py); features.json holds the settings and the training split's per-bin mean and
std, which train and evaluate apply when they load features. An utterance whose audio cannot be
decoded is written to data/features/rejects.jsonl and counted in metrics/featurize.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from ctcflow.audio import load_audio
from ctcflow.data import write_split
from ctcflow.features import LogMel, LogMelConfig, RunningStats
from ctcflow.manifest import REJECT_COLUMNS, SPLITS, Reject, Rejected, read_manifest, write_jsonl
from ctcflow.params import Section
from ctcflow.stage import StageError, stage_main

MANIFEST_DIR = Path("data/manifests")
OUT_DIR = Path("data/features")
METRICS_FILE = Path("metrics/featurize.json")


class FeaturizeParams(Section):
    sample_rate: int = Field(16000, ge=4000)
    n_fft: int = Field(400, gt=0)
    win_length: int = Field(400, gt=0)
    hop_length: int = Field(160, gt=0)
    n_mels: int = Field(80, gt=0)
    num_threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def window_fits(self):
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length {self.win_length} must not exceed n_fft {self.n_fft}")
        return self


def run(params: FeaturizeParams, manifest_dir: Path = MANIFEST_DIR, out_dir: Path = OUT_DIR,
        metrics_file: Path = METRICS_FILE) -> dict:
    torch.set_num_threads(params.num_threads)
    config = LogMelConfig(params.sample_rate, params.n_fft, params.win_length, params.hop_length, params.n_mels)
    logmel = LogMel(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = RunningStats(params.n_mels)
    rejects: list[Reject] = []
    metrics: dict = {}
    for split in SPLITS:
        manifest = read_manifest(manifest_dir / f"{split}.jsonl")
        frames, rows, offset = [], [], 0
        for utt in tqdm(manifest.itertuples(), total=len(manifest), desc=f"featurize {split}", unit="utt"):
            try:
                feats = logmel(load_audio(utt.audio_path, params.sample_rate)).numpy()
            except Rejected as err:
                rejects.append(Reject(utt.id, split, utt.audio_path, utt.text, err.reason, err.detail))
                continue
            if split == "train":
                stats.update(feats)
            frames.append(feats)
            rows.append({"id": utt.id, "speaker": utt.speaker, "duration": utt.duration,
                         "text_normalized": utt.text_normalized, "offset": offset, "num_frames": len(feats)})
            offset += len(feats)
        if not rows:
            raise StageError(f"no utterance of split '{split}' could be featurized; see {out_dir / 'rejects.jsonl'}")
        write_split(out_dir, split, pd.DataFrame(rows), frames, params.n_mels)
        metrics[split] = {"utterances": len(rows), "frames": offset,
                          "hours": round(sum(r["duration"] for r in rows) / 3600, 4)}

    mean, std = stats.mean_std()
    info = {"logmel": config.to_dict(), "mean": mean.tolist(), "std": std.tolist()}
    (out_dir / "features.json").write_text(json.dumps(info, indent=1) + "\n")
    write_jsonl(rejects, REJECT_COLUMNS, out_dir / "rejects.jsonl")
    metrics["rejected"] = {"total": len(rejects), **Counter(r.reason for r in rejects)}
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    if rejects:
        print(f"rejected {len(rejects)} utterance(s) — see {out_dir / 'rejects.jsonl'}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("featurize", FeaturizeParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

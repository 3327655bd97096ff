"""Stage evaluate: transcribe the test split with greedy CTC decoding and score it.

Writes metrics/eval.json (WER, CER, sentence accuracy, losses, blank ratio), a per-utterance
table reports/eval/utterances.csv (id, speaker, reference, hypothesis, error counts) and
reports/eval/examples.txt (evaluate.num_examples reference/hypothesis pairs, also printed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from ctcflow.checkpoint import load_checkpoint, model_from_checkpoint
from ctcflow.data import FeatureSplit
from ctcflow.inference import decode_split
from ctcflow.losses import CTCObjective
from ctcflow.metrics import error_rates, utterance_errors
from ctcflow.params import Section
from ctcflow.stage import stage_main

FEATURES_DIR = Path("data/features")
MODEL_DIR = Path("models")
REPORT_DIR = Path("reports/eval")
METRICS_FILE = Path("metrics/eval.json")


class EvaluateParams(Section):
    checkpoint: Literal["best", "last"] = "best"
    split: Literal["test", "valid"] = "test"
    batch_frames: int = Field(40000, gt=0)
    num_examples: int = Field(10, ge=0)
    examples_seed: int = 0
    num_threads: int = Field(2, ge=1)


def run(params: EvaluateParams, features_dir: Path = FEATURES_DIR, model_dir: Path = MODEL_DIR,
        report_dir: Path = REPORT_DIR, metrics_file: Path = METRICS_FILE) -> dict:
    torch.set_num_threads(params.num_threads)
    checkpoint = load_checkpoint(model_dir / f"{params.checkpoint}.pt")
    model, tokenizer = model_from_checkpoint(checkpoint)
    split = FeatureSplit(features_dir, params.split, tokenizer)
    # The penalty is left out: evaluation reports the plain CTC loss of the test data.
    objective = CTCObjective(tokenizer.blank, zero_infinity=True, penalty_mode="none", penalty_weight=0.0)
    result = decode_split(model, split, tokenizer, objective, params.batch_frames)

    references = split.index["text_normalized"].tolist()
    rates = error_rates(references, result.hypotheses)
    metrics = {
        **rates,
        "ctc_loss": result.ctc_loss,
        "blank_ratio": result.blank_ratio,
        "utterances": len(split),
        "checkpoint_epoch": checkpoint["epoch"],
    }
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")

    table = pd.DataFrame({"id": split.index["id"], "speaker": split.index["speaker"],
                          "reference": references, "hypothesis": result.hypotheses})
    errors = pd.DataFrame([utterance_errors(r, h) for r, h in zip(references, result.hypotheses)])
    table = pd.concat([table, errors], axis=1)
    report_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(report_dir / "utterances.csv", index=False)

    rng = np.random.default_rng(params.examples_seed)
    picks = sorted(rng.choice(len(table), size=min(params.num_examples, len(table)), replace=False))
    lines = [f"{params.split} {split.index['id'][i]}\n  REF: {references[i]}\n  HYP: {result.hypotheses[i]}"
             for i in picks]
    examples = "\n".join(lines) + "\n"
    (report_dir / "examples.txt").write_text(examples)
    print(examples)
    print(f"{params.split}: WER {rates['wer']:.2%}, CER {rates['cer']:.2%}, "
          f"sentence accuracy {rates['sentence_accuracy']:.2%} over {len(split)} utterances")
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", EvaluateParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

"""Stage evaluate: transcribe the test split with greedy and beam-search CTC decoding and score both.

Both decoders share one pass of the model. The beam search (flashlight, through torchaudio) can
be held to the lexicon and scored by the word n-gram LM that the lm stage builds (data/lm).
evaluate.decoder picks the decoder whose results are the top-level WER, CER and sentence
accuracy of metrics/eval.json; the blocks `greedy` and `beam` hold both side by side.
evaluate.blank_penalty is subtracted from the blank log-probability before either decoder runs.

Writes metrics/eval.json (WER, CER, sentence accuracy, losses, blank ratio), a per-utterance
table reports/eval/utterances.csv (id, speaker, reference, hypothesis of the chosen decoder,
its error counts, and both decoders' hypotheses) and reports/eval/examples.txt
(evaluate.num_examples reference/hypothesis pairs, also printed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from ctcflow.checkpoint import load_checkpoint, model_from_checkpoint
from ctcflow.data import FeatureSplit
from ctcflow.decoding import BeamParams, GreedyDecoder
from ctcflow.inference import decode_split
from ctcflow.losses import CTCObjective
from ctcflow.metrics import error_rates, utterance_errors
from ctcflow.params import Section
from stages.runner import StageError, stage_main

FEATURES_DIR = Path("data/features")
MODEL_DIR = Path("models")
LM_DIR = Path("data/lm")
REPORT_DIR = Path("reports/eval")
METRICS_FILE = Path("metrics/eval.json")


class EvaluateParams(Section):
    checkpoint: Literal["best", "last"]
    split: Literal["test", "valid"]
    batch_frames: int = Field(gt=0)
    num_examples: int = Field(ge=0)
    examples_seed: int
    num_threads: int = Field(ge=1)
    decoder: Literal["greedy", "beam"]
    blank_penalty: float
    beam: BeamParams


class Timed:
    """Wraps a decoder to add up the seconds it spends (printed, never written to metrics)."""

    def __init__(self, decode):
        self.decode, self.seconds = decode, 0.0

    def __call__(self, log_probs, lengths):
        started = time.perf_counter()
        texts = self.decode(log_probs, lengths)
        self.seconds += time.perf_counter() - started
        return texts


def run(params: EvaluateParams, features_dir: Path = FEATURES_DIR, model_dir: Path = MODEL_DIR,
        report_dir: Path = REPORT_DIR, metrics_file: Path = METRICS_FILE, lm_dir: Path = LM_DIR) -> dict:
    torch.set_num_threads(params.num_threads)
    checkpoint = load_checkpoint(model_dir / f"{params.checkpoint}.pt")
    model, tokenizer = model_from_checkpoint(checkpoint)
    split = FeatureSplit(features_dir, params.split, tokenizer)
    greedy = GreedyDecoder(tokenizer, params.blank_penalty)
    decoders = {"greedy": Timed(greedy)}
    # The beam search's lexicon and LM spell words in characters: word (gloss) units decode greedily.
    if tokenizer.unit == "char":
        decoders["beam"] = Timed(params.beam.decoder(tokenizer, lm_dir, params.blank_penalty))
    elif params.decoder == "beam":
        raise StageError("evaluate.decoder: beam needs character units; set it to greedy for word units")
    # The penalty is left out: evaluation reports the plain CTC loss of the test data.
    objective = CTCObjective(tokenizer.blank, zero_infinity=True, penalty_mode="none", penalty_weight=0.0)
    result = decode_split(model, split, tokenizer, objective, params.batch_frames, decoders)

    references = split.index["text_normalized"].tolist()
    per_decoder = {name: error_rates(references, hyps) for name, hyps in result.decoded.items()}
    per_decoder["greedy"]["blank_ratio"] = greedy.blank_ratio  # after the decode-time penalty
    hypotheses = result.decoded[params.decoder]
    rates = per_decoder[params.decoder]
    metrics = {
        "wer": rates["wer"],
        "cer": rates["cer"],
        "sentence_accuracy": rates["sentence_accuracy"],
        "ctc_loss": result.ctc_loss,
        "blank_ratio": result.blank_ratio,
        "utterances": len(split),
        "checkpoint_epoch": checkpoint["epoch"],
        **per_decoder,
    }
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")

    table = pd.DataFrame({"id": split.index["id"], "speaker": split.index["speaker"],
                          "reference": references, "hypothesis": hypotheses})
    errors = pd.DataFrame([utterance_errors(r, h) for r, h in zip(references, hypotheses)])
    by_decoder = pd.DataFrame({f"hypothesis_{name}": hyps for name, hyps in result.decoded.items()})
    table = pd.concat([table, errors, by_decoder], axis=1)
    report_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(report_dir / "utterances.csv", index=False)

    rng = np.random.default_rng(params.examples_seed)
    picks = sorted(rng.choice(len(table), size=min(params.num_examples, len(table)), replace=False))
    lines = [f"{params.split} {split.index['id'][i]}\n  REF: {references[i]}\n  HYP: {hypotheses[i]}"
             for i in picks]
    examples = "\n".join(lines) + "\n"
    (report_dir / "examples.txt").write_text(examples)
    print(examples)
    for name, decoder in decoders.items():
        chosen = " (evaluate.decoder)" if name == params.decoder else ""
        print(f"{params.split} {name}{chosen}: WER {per_decoder[name]['wer']:.2%}, CER {per_decoder[name]['cer']:.2%}, "
              f"sentence accuracy {per_decoder[name]['sentence_accuracy']:.2%} over {len(split)} utterances; "
              f"decoding took {decoder.seconds:.1f} s")
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", EvaluateParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

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

Every extra test set that featurize lists (data/features/test_sets.json, from manifest.test_sets)
is scored the same way: metrics/eval.json's `test_sets: {name: {wer, cer, sentence_accuracy,
ctc_loss, blank_ratio, utterances, greedy, beam}}` and reports/eval/<name>/utterances.csv.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from ctcflow.checkpoint import load_checkpoint, model_from_checkpoint
from ctcflow.data import FeatureSplit
from ctcflow.decoding import BeamParams, GreedyDecoder
from ctcflow.inference import decode_split
from ctcflow.losses import CTCObjective
from ctcflow.manifest import read_test_set_names
from ctcflow.metrics import error_rates, utterance_errors
from ctcflow.params import Section
from ctcflow.text import Tokenizer
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


class Scored(NamedTuple):
    summary: dict  # the evaluate.decoder's WER, CER and sentence accuracy; CTC loss, blank ratio, utterances
    per_decoder: dict  # decoder name → its WER, CER, sentence accuracy
    table: pd.DataFrame  # per utterance; its hypothesis column is the evaluate.decoder's
    decoders: dict[str, Timed]  # for their timing


def score(model: torch.nn.Module, split: FeatureSplit, tokenizer: Tokenizer, params: EvaluateParams,
          lm_dir: Path) -> Scored:
    """One split (or test set) transcribed by both decoders in one pass of the model."""
    greedy = GreedyDecoder(tokenizer, params.blank_penalty)
    decoders = {"greedy": Timed(greedy)}
    # The beam search's lexicon and LM spell words in characters: word (gloss) units decode greedily.
    if tokenizer.unit == "char":
        decoders["beam"] = Timed(params.beam.decoder(tokenizer, lm_dir, params.blank_penalty))
    # The penalty is left out: evaluation reports the plain CTC loss of the test data.
    objective = CTCObjective(tokenizer.blank, zero_infinity=True, penalty_mode="none", penalty_weight=0.0)
    result = decode_split(model, split, tokenizer, objective, params.batch_frames, decoders)

    references = split.index["text_normalized"].tolist()
    per_decoder = {name: error_rates(references, hyps) for name, hyps in result.decoded.items()}
    per_decoder["greedy"]["blank_ratio"] = greedy.blank_ratio  # after the decode-time penalty
    hypotheses = result.decoded[params.decoder]
    rates = per_decoder[params.decoder]
    summary = {"wer": rates["wer"], "cer": rates["cer"], "sentence_accuracy": rates["sentence_accuracy"],
               "ctc_loss": result.ctc_loss, "blank_ratio": result.blank_ratio, "utterances": len(split)}
    table = pd.DataFrame({"id": split.index["id"], "speaker": split.index["speaker"],
                          "reference": references, "hypothesis": hypotheses})
    errors = pd.DataFrame([utterance_errors(r, h) for r, h in zip(references, hypotheses)])
    by_decoder = pd.DataFrame({f"hypothesis_{name}": hyps for name, hyps in result.decoded.items()})
    return Scored(summary, per_decoder, pd.concat([table, errors, by_decoder], axis=1), decoders)


def report(name: str, scored: Scored, params: EvaluateParams) -> None:
    for decoder_name, decoder in scored.decoders.items():
        rates = scored.per_decoder[decoder_name]
        chosen = " (evaluate.decoder)" if decoder_name == params.decoder else ""
        print(f"{name} {decoder_name}{chosen}: WER {rates['wer']:.2%}, CER {rates['cer']:.2%}, "
              f"sentence accuracy {rates['sentence_accuracy']:.2%} over {scored.summary['utterances']} utterances; "
              f"decoding took {decoder.seconds:.1f} s")


def run(params: EvaluateParams, features_dir: Path = FEATURES_DIR, model_dir: Path = MODEL_DIR,
        report_dir: Path = REPORT_DIR, metrics_file: Path = METRICS_FILE, lm_dir: Path = LM_DIR) -> dict:
    torch.set_num_threads(params.num_threads)
    checkpoint = load_checkpoint(model_dir / f"{params.checkpoint}.pt")
    model, tokenizer = model_from_checkpoint(checkpoint)
    if tokenizer.unit != "char" and params.decoder == "beam":
        raise StageError("evaluate.decoder: beam needs character units; set it to greedy for word units")
    scored = score(model, FeatureSplit(features_dir, params.split, tokenizer), tokenizer, params, lm_dir)
    metrics = {**scored.summary, "checkpoint_epoch": checkpoint["epoch"], **scored.per_decoder}
    report_dir.mkdir(parents=True, exist_ok=True)
    table = scored.table
    table.to_csv(report_dir / "utterances.csv", index=False)

    rng = np.random.default_rng(params.examples_seed)
    picks = sorted(rng.choice(len(table), size=min(params.num_examples, len(table)), replace=False))
    lines = [f"{params.split} {table['id'][i]}\n  REF: {table['reference'][i]}\n  HYP: {table['hypothesis'][i]}"
             for i in picks]
    examples = "\n".join(lines) + "\n"
    (report_dir / "examples.txt").write_text(examples)
    print(examples)
    report(params.split, scored, params)

    for name in read_test_set_names(features_dir):
        scored = score(model, FeatureSplit(features_dir, name, tokenizer), tokenizer, params, lm_dir)
        # Only with test sets: a project without them keeps the metrics it had.
        metrics.setdefault("test_sets", {})[name] = {**scored.summary, **scored.per_decoder}
        (report_dir / name).mkdir(exist_ok=True)
        scored.table.to_csv(report_dir / name / "utterances.csv", index=False)
        report(f"test set {name}", scored, params)
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", EvaluateParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

"""Stage evaluate: transcribe the test split with greedy and beam-search CTC decoding and score both.

Both decoders share one pass of the model. The beam search (flashlight, through torchaudio) can
be held to the lexicon and scored by the word n-gram LM that the lm stage builds (data/lm).
evaluate.decoder picks the decoder whose results are the top-level WER, CER and sentence
accuracy of metrics/eval.json; the blocks `greedy` and `beam` hold both side by side.
evaluate.blank_penalty is subtracted from the blank log-probability before either decoder runs.

Writes metrics/eval.json (WER, CER, sentence accuracy, losses, blank ratio), a per-utterance
table reports/eval/utterances.csv (id, speaker, reference, hypothesis of the chosen decoder,
its error counts, both decoders' hypotheses, and the confidence of each hypothesis word),
reports/eval/words.csv (one row per hypothesis word of the chosen decoder: id, word, its
frames, confidence, and whether it is correct by jiwer's alignment to the reference) and
reports/eval/examples.txt (evaluate.num_examples reference/hypothesis pairs, also printed).

Word confidence (ctcflow.decoding.aligned_words) is the mean posterior of the word's frames on
its CTC alignment. metrics/eval.json's `confidence` block says how well it separates: the share of
wrong words among the 10 % least confident words, and among all words.

Every extra test set that featurize lists (data/features/test_sets.json, from manifest.test_sets)
is scored the same way: metrics/eval.json's `test_sets: {name: {wer, cer, sentence_accuracy,
ctc_loss, blank_ratio, utterances, rejected, oov_rate, greedy, beam}}` and
reports/eval/<name>/{utterances,words}.csv. `rejected` counts the set's rows that manifest or
featurize rejected (data/manifests/rejects.jsonl, data/features/rejects.jsonl), which its scores
leave out; `oov_rate` (with a beam search held to the lexicon) is the share of its reference words
outside data/lm/lexicon.txt, which beam search can never output. Every split is opened before
any is decoded, so a missing or bad test set fails the stage before it rewrites a report.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal, NamedTuple

import jiwer
import numpy as np
import pandas as pd
import torch
from pydantic import Field

from ctcflow.checkpoint import check_features, load_model
from ctcflow.data import INDEX_FILE, FeatureSplit
from ctcflow.decoding import BeamParams, GreedyDecoder, aligned_words
from ctcflow.inference import decode_split
from ctcflow.lm import oov_rate, read_lexicon
from ctcflow.losses import CTCObjective
from ctcflow.manifest import count_by_reason, read_test_set_names
from ctcflow.metrics import error_rates, utterance_errors
from ctcflow.params import Section
from ctcflow.text import Tokenizer
from stages.runner import StageError, stage_main

FEATURES_DIR = Path("data/features")
MANIFEST_DIR = Path("data/manifests")  # for its rejects.jsonl only
MODEL_DIR = Path("models")
LM_DIR = Path("data/lm")
REPORT_DIR = Path("reports/eval")
METRICS_FILE = Path("metrics/eval.json")


class EvaluateParams(Section):
    checkpoint: Literal["best", "best_epoch", "last"]  # models/{checkpoint}.pt
    split: Literal["test", "valid"]
    batch_frames: int = Field(gt=0)
    num_examples: int = Field(ge=0)
    examples_seed: int = Field(ge=0)  # numpy's generators take no negative seed
    num_threads: int = Field(ge=1)
    decoder: Literal["greedy", "beam"]
    blank_penalty: float = Field(allow_inf_nan=False)
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


class WithWords:
    """Wraps a decoder to give, for each utterance, its transcript and that transcript's words
    aligned to the same log-probabilities: (word, first frame, end frame, confidence)."""

    def __init__(self, decode, tokenizer: Tokenizer, blank_penalty: float):
        self.decode, self.tokenizer, self.blank_penalty = decode, tokenizer, blank_penalty

    def __call__(self, log_probs, lengths):
        return [(text, aligned_words(scores[:n], text, self.tokenizer, self.blank_penalty))
                for text, scores, n in zip(self.decode(log_probs, lengths), log_probs.cpu(), lengths.tolist())]


def correct_words(reference: str, hypothesis: str) -> list[bool]:
    """For each hypothesis word, whether jiwer's alignment to the reference matches it to the same word."""
    correct = [False] * len(hypothesis.split())
    if not correct:
        return correct
    for chunk in jiwer.process_words(reference, hypothesis).alignments[0]:
        if chunk.type == "equal":
            correct[chunk.hyp_start_idx:chunk.hyp_end_idx] = [True] * (chunk.hyp_end_idx - chunk.hyp_start_idx)
    return correct


def confidence_separation(words: pd.DataFrame) -> dict:
    """The share of wrong words among the 10 % least confident (at least one word), and among all."""
    if words.empty:
        return {"words": 0, "wrong_share_lowest10": 0.0, "wrong_share_all": 0.0}
    lowest = words.sort_values("confidence", kind="stable").head(math.ceil(0.1 * len(words)))
    return {"words": len(words), "wrong_share_lowest10": float((~lowest["correct"]).mean()),
            "wrong_share_all": float((~words["correct"]).mean())}


class Scored(NamedTuple):
    summary: dict  # the evaluate.decoder's WER, CER and sentence accuracy; CTC loss, blank ratio, utterances
    per_decoder: dict  # decoder name → its WER, CER, sentence accuracy
    table: pd.DataFrame  # per utterance; its hypothesis column is the evaluate.decoder's
    words: pd.DataFrame  # per hypothesis word of the evaluate.decoder: id, word, frames, confidence, correct
    decoders: dict[str, Timed]  # for their timing


def score(model: torch.nn.Module, split: FeatureSplit, tokenizer: Tokenizer, params: EvaluateParams,
          lm_dir: Path) -> Scored:
    """One split (or test set) transcribed by both decoders in one pass of the model."""
    greedy = GreedyDecoder(tokenizer, params.blank_penalty)
    timed = {"greedy": Timed(greedy)}
    # The beam search's lexicon and LM spell words in characters or BPE pieces: word (gloss) units decode greedily.
    if tokenizer.unit != "word":
        timed["beam"] = Timed(params.beam.decoder(tokenizer, lm_dir, params.blank_penalty))
    decoders = {**timed, params.decoder: WithWords(timed[params.decoder], tokenizer, params.blank_penalty)}
    # The penalty is left out: evaluation reports the plain CTC loss of the test data.
    objective = CTCObjective.plain(tokenizer.blank)
    result = decode_split(model, split, tokenizer, objective, params.batch_frames, decoders)
    hypotheses = [text for text, _ in result.decoded[params.decoder]]
    aligned = [words for _, words in result.decoded[params.decoder]]
    result.decoded[params.decoder] = hypotheses

    references = split.index["text_normalized"].tolist()
    per_decoder = {name: error_rates(references, hyps) for name, hyps in result.decoded.items()}
    per_decoder["greedy"]["blank_ratio"] = greedy.blank_ratio  # after the decode-time penalty
    rates = per_decoder[params.decoder]
    summary = {"wer": rates["wer"], "cer": rates["cer"], "sentence_accuracy": rates["sentence_accuracy"],
               "ctc_loss": result.ctc_loss, "blank_ratio": result.blank_ratio, "utterances": len(split)}
    table = pd.DataFrame({"id": split.index["id"], "speaker": split.index["speaker"],
                          "reference": references, "hypothesis": hypotheses})
    errors = pd.DataFrame([utterance_errors(r, h) for r, h in zip(references, hypotheses)])
    by_decoder = pd.DataFrame({f"hypothesis_{name}": hyps for name, hyps in result.decoded.items()})
    confidences = pd.DataFrame({"word_confidences": [" ".join(f"{c:.3f}" for *_, c in words) for words in aligned]})
    words = pd.DataFrame(
        [(id, word, first, end, confidence, correct)
         for id, reference, hypothesis, found in zip(split.index["id"], references, hypotheses, aligned)
         for (word, first, end, confidence), correct in zip(found, correct_words(reference, hypothesis))],
        columns=["id", "word", "first_frame", "end_frame", "confidence", "correct"])
    return Scored(summary, per_decoder, pd.concat([table, errors, by_decoder, confidences], axis=1), words, timed)


def report(name: str, scored: Scored, params: EvaluateParams, rejected: str = "", oov_rate: float = 0.0) -> None:
    """`rejected`: what to say after the count of utterances; `oov_rate` is printed beside the beam WER when above 0."""
    for decoder_name, decoder in scored.decoders.items():
        rates = scored.per_decoder[decoder_name]
        chosen = " (evaluate.decoder)" if decoder_name == params.decoder else ""
        oov = (f" ({oov_rate:.2%} of reference words outside the lexicon: beam search cannot output them)"
               if decoder_name == "beam" and oov_rate > 0 else "")
        print(f"{name} {decoder_name}{chosen}: WER {rates['wer']:.2%}{oov}, CER {rates['cer']:.2%}, "
              f"sentence accuracy {rates['sentence_accuracy']:.2%} over {scored.summary['utterances']} utterances"
              f"{rejected}; decoding took {decoder.seconds:.1f} s")


def open_split(features_dir: Path, name: str, tokenizer: Tokenizer, what: str, manifest_dir: Path) -> FeatureSplit:
    """A split's features and encoded transcripts, or a one-line error naming it (`what`) and its file."""
    try:
        return FeatureSplit(features_dir, name, tokenizer)
    except FileNotFoundError as err:
        raise StageError(f"{what}: {err}") from None
    except ValueError as err:  # a transcript outside the label unit: featurize copies the manifest's unchecked
        raise StageError(f"{what}: {err} (in {features_dir / name / INDEX_FILE}, from "
                         f"{manifest_dir / name}.jsonl: rerun manifest, which checks transcripts, and featurize)") from None


def read_rejects(files: list[Path]) -> dict[Path, list[dict]]:
    """The rows of manifest's and featurize's rejects files, by file; {} where neither is there."""
    return {path: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for path in files if path.is_file()}


def set_rejects(name: str, rejects: dict[Path, list[dict]]) -> tuple[dict, list[Path]] | None:
    """A test set's rejects (split = its name): their count {"total": n, "<reason>": n, ...} and the
    files that have some; None where neither rejects file is there."""
    if not rejects:
        return None
    reasons = {path: [row["reason"] for row in rows if row["split"] == name] for path, rows in rejects.items()}
    return count_by_reason(r for found in reasons.values() for r in found), [p for p, found in reasons.items() if found]


def run(params: EvaluateParams, features_dir: Path = FEATURES_DIR, model_dir: Path = MODEL_DIR,
        report_dir: Path = REPORT_DIR, metrics_file: Path = METRICS_FILE, lm_dir: Path = LM_DIR,
        manifest_dir: Path = MANIFEST_DIR) -> dict:
    torch.set_num_threads(params.num_threads)
    path = model_dir / f"{params.checkpoint}.pt"
    checkpoint, model, tokenizer = load_model(path, also=("epoch",))
    if tokenizer.unit == "word" and params.decoder == "beam":
        raise StageError("evaluate.decoder: beam needs character or BPE units; set it to greedy for word units")
    check_features(checkpoint, features_dir, str(path))
    # All opened before any is decoded: a missing or bad test set fails here, not after the
    # main split's reports were rewritten.
    split = open_split(features_dir, params.split, tokenizer, f"evaluate.split {params.split}", manifest_dir)
    test_sets = {name: open_split(features_dir, name, tokenizer, f"test set {name}", manifest_dir)
                 for name in read_test_set_names(features_dir)}
    scored = score(model, split, tokenizer, params, lm_dir)
    # The beam search is held to the lexicon as score() builds it (which has checked the file is there).
    held_to_lexicon = tokenizer.unit != "word" and params.beam.lexicon
    vocabulary = set(read_lexicon(lm_dir / "lexicon.txt")) if test_sets and held_to_lexicon else None
    metrics = {**scored.summary, "checkpoint_epoch": checkpoint["epoch"], **scored.per_decoder,
               "confidence": confidence_separation(scored.words)}
    report_dir.mkdir(parents=True, exist_ok=True)
    table = scored.table
    table.to_csv(report_dir / "utterances.csv", index=False)
    scored.words.to_csv(report_dir / "words.csv", index=False)

    rng = np.random.default_rng(params.examples_seed)
    picks = sorted(rng.choice(len(table), size=min(params.num_examples, len(table)), replace=False))
    lines = [f"{params.split} {table['id'][i]}\n  REF: {table['reference'][i]}\n  HYP: {table['hypothesis'][i]}"
             for i in picks]
    examples = "\n".join(lines) + "\n"
    (report_dir / "examples.txt").write_text(examples)
    print(examples)
    report(params.split, scored, params)

    rejects = read_rejects([manifest_dir / "rejects.jsonl", features_dir / "rejects.jsonl"]) if test_sets else {}
    for name, test_set in test_sets.items():
        scored = score(model, test_set, tokenizer, params, lm_dir)
        # Only with test sets: a project without them keeps the metrics it had.
        block = metrics.setdefault("test_sets", {})[name] = dict(scored.summary)
        note = ""
        if found := set_rejects(name, rejects):
            block["rejected"], files = found
            if files:
                note = f", {block['rejected']['total']} rejected: see {' and '.join(map(str, files))}"
        if vocabulary is not None:
            block["oov_rate"] = oov_rate(test_set.index["text_normalized"].tolist(), vocabulary)
        block.update(scored.per_decoder)
        (report_dir / name).mkdir(exist_ok=True)
        scored.table.to_csv(report_dir / name / "utterances.csv", index=False)
        scored.words.to_csv(report_dir / name / "words.csv", index=False)
        report(f"test set {name}", scored, params, note, block.get("oov_rate", 0.0))
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", EvaluateParams, run, __doc__, argv)


if __name__ == "__main__":
    main()

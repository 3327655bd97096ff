"""Accuracy, not speed: the beam search's LM weight and word score, chosen on a split.

`evaluate.beam.lm_weight` and `word_score` are chosen on the validation split. Rerunning evaluate
for every pair runs the model again each time; this runs it once per split and decodes its output
with every pair of the grid (beam search + lexicon + LM, the rest of `evaluate.beam` as
params.yaml says). Splits are the feature store's: valid (the default), test, and any extra test
set that featurize wrote (manifest.test_sets). For each split and pair it prints WER in % and the
share of empty answers, then the pair with the lowest WER on the first split: choose there, and
read the others only to see what the choice does beyond it. Writes
benchmarks/results/lm_sweep.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/lm_sweep.py --project-dir .   # after `make demo`
    PYTHONPATH=$PWD .venv/bin/python benchmarks/lm_sweep.py --project-dir . --splits valid test fsdd \\
        --lm-weights 1 1.5 2 2.5 3 --word-scores -1 0 1 2 --out /tmp/lm_sweep.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `ctcflow`
from common import demo_paths, machine, results_path, write_results  # noqa: E402

from ctcflow.checkpoint import load_model  # noqa: E402
from ctcflow.data import FeatureSplit  # noqa: E402
from ctcflow.decoding import BeamParams, GreedyDecoder  # noqa: E402
from ctcflow.inference import decode_split  # noqa: E402
from ctcflow.losses import CTCObjective  # noqa: E402
from ctcflow.metrics import error_rates  # noqa: E402
from ctcflow.params import load_section  # noqa: E402
from stages.evaluate import EvaluateParams  # noqa: E402


def point(lm_weight: float, word_score: float) -> str:
    return f"lm_weight={lm_weight:g} word_score={word_score:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."), help="a project after `make demo`")
    parser.add_argument("--splits", nargs="+", default=["valid"],
                        help="feature-store splits to decode; the best pair is chosen on the first (default: valid)")
    parser.add_argument("--lm-weights", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--word-scores", type=float, nargs="+", default=[-1.0, 0.0, 1.0, 2.0])
    parser.add_argument("--checkpoint", help="models/<this>.pt (default: evaluate.checkpoint)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="results under benchmarks/results/quick/")
    parser.add_argument("--out", help="results file (default: benchmarks/results/lm_sweep.json)")
    args = parser.parse_args()
    if any(w <= 0 for w in args.lm_weights):
        parser.error("--lm-weights: each must be above 0 (0 is no LM; evaluate.beam.lm_weight: 0 scores that)")

    torch.set_num_threads(args.threads)
    project = args.project_dir.resolve()
    paths = demo_paths(project, "features", "lm")
    evaluate = load_section("evaluate", EvaluateParams, project / "params.yaml")
    model_path = project / "models" / f"{args.checkpoint or evaluate.checkpoint}.pt"
    if not model_path.is_file():
        raise SystemExit(f"{model_path} not found: run `make demo` (or `dvc repro`) in {project} first")
    _, model, tokenizer = load_model(model_path)
    if tokenizer.unit == "word":
        raise SystemExit(f"{model_path}: word units decode greedily only; there is no LM weight to choose")
    splits = {}
    for name in args.splits:
        try:
            splits[name] = FeatureSplit(paths["features"], name, tokenizer)
        except FileNotFoundError as err:
            raise SystemExit(f"--splits {name}: {err}") from None

    decoders = {"greedy": GreedyDecoder(tokenizer, evaluate.blank_penalty)}
    for lm_weight in args.lm_weights:
        for word_score in args.word_scores:
            beam = BeamParams(**{**evaluate.beam.model_dump(), "lexicon": True, "lm_weight": lm_weight,
                                 "word_score": word_score})
            decoders[point(lm_weight, word_score)] = beam.decoder(tokenizer, paths["lm"], evaluate.blank_penalty)
    objective = CTCObjective.plain(tokenizer.blank)

    results = {}
    for name, split in splits.items():
        references = split.index["text_normalized"].tolist()
        decoded = decode_split(model, split, tokenizer, objective, evaluate.batch_frames, decoders).decoded
        results[name] = {key: {"wer_percent": round(100 * error_rates(references, hyps)["wer"], 2),
                               "empty_percent": round(100 * sum(not h for h in hyps) / len(hyps), 1)}
                         for key, hyps in decoded.items()}
        print(f"{name} ({len(split)} utterances): WER % (empty answers %); greedy "
              f"{results[name]['greedy']['wer_percent']:.2f}", flush=True)
        print("  lm_weight \\ word_score " + "".join(f"{s:>16g}" for s in args.word_scores))
        for lm_weight in args.lm_weights:
            cells = [results[name][point(lm_weight, s)] for s in args.word_scores]
            print(f"  {lm_weight:>22g} " + "".join(f"{c['wer_percent']:>9.2f} ({c['empty_percent']:>4.1f})"
                                                    for c in cells), flush=True)
    first = results[args.splits[0]]
    best = min((key for key in first if key != "greedy"), key=lambda key: first[key]["wer_percent"])
    now = point(evaluate.beam.lm_weight, evaluate.beam.word_score)
    print(f"lowest WER on {args.splits[0]}: {best} ({first[best]['wer_percent']:.2f} %)"
          + (f"; params.yaml's {now}: {first[now]['wer_percent']:.2f} %" if now in first else ""))
    write_results(results_path("lm_sweep", args.quick, args.out), {
        "model": str(model_path.relative_to(project)), "chosen_on": args.splits[0], "best": best,
        "lm_weights": args.lm_weights, "word_scores": args.word_scores, "results": results, **machine()})


if __name__ == "__main__":
    main()

"""`ctcflow`: run one pipeline stage, or the whole pipeline through DVC.

Each stage command reads only its own section of params.yaml and writes the same files
`dvc repro` would; `ctcflow repro` runs `dvc repro` itself, which skips stages that are
up to date. `ctcflow transcribe MODEL AUDIO...` transcribes audio files with a trained model.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import torch

from ctcflow.audio import AudioError
from ctcflow.params import DEFAULT_PARAMS, ParamsError, load_section
from ctcflow.transcribe import Transcriber
from ctcflow.transcribe import __doc__ as transcriber_doc
from stages.evaluate import EvaluateParams

# Stage name → module; the order is the pipeline's.
STAGES = {
    "synth": "stages.synth",
    "manifest": "stages.manifest",
    "featurize": "stages.featurize",
    "train": "stages.train",
    "lm": "stages.lm",
    "evaluate": "stages.evaluate",
    "plots": "stages.plots",
}


def first_line(module_name: str) -> str:
    doc = importlib.import_module(module_name).__doc__ or ""
    return doc.strip().splitlines()[0].removeprefix("Stage ").split(": ", 1)[-1]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ctcflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in STAGES.items():
        # add_help=False: the stage's own parser answers `ctcflow NAME --help`.
        commands.add_parser(name, help=first_line(module), add_help=False)
    commands.add_parser("repro", help="run the whole pipeline with `dvc repro` (extra arguments go to dvc)",
                        add_help=False)
    commands.add_parser("transcribe", help="transcribe audio files with a trained model (MODEL AUDIO...)",
                        add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return
    command, rest = argv[0], argv[1:]
    if command == "repro":
        sys.exit(subprocess.call(["dvc", "repro", *rest]))
    if command == "transcribe":
        return transcribe(rest)
    if command not in STAGES:
        parser.error(f"unknown command {command!r}; choose from {', '.join([*STAGES, 'repro', 'transcribe'])}")
    importlib.import_module(STAGES[command]).main(rest)


def transcribe(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ctcflow transcribe", description=transcriber_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint, e.g. models/best.pt")
    parser.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG, MP3; any sample rate)")
    parser.add_argument("--decoder", choices=["greedy", "beam"], help="default: evaluate.decoder in --params")
    parser.add_argument("--blank-penalty", type=float, help="default: evaluate.blank_penalty in --params")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS),
                        help="beam settings and defaults come from its evaluate section, if the file exists "
                             "(default: %(default)s)")
    parser.add_argument("--features", default="data/features",
                        help="features directory the model was trained on, read for the feature mean/std only "
                             "if the checkpoint predates storing them (default: %(default)s)")
    parser.add_argument("--lm-dir", default="data/lm", help="lexicon and LM for beam search (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="JSON lines with per-word start/end times")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-seconds", type=float, default=30.0, help="window length (default: %(default)s)")
    parser.add_argument("--overlap-seconds", type=float, default=4.0,
                        help="overlap of consecutive windows; longer than any word (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        evaluate = (load_section("evaluate", EvaluateParams, args.params) if Path(args.params).is_file()
                    else EvaluateParams())
        transcriber = Transcriber(
            args.model, args.features, args.decoder or evaluate.decoder, evaluate.beam, args.lm_dir,
            evaluate.blank_penalty if args.blank_penalty is None else args.blank_penalty, args.device,
            args.chunk_seconds, args.overlap_seconds, args.batch_size)
        for transcript in transcriber.transcribe(args.audio):
            if args.json:
                print(transcript.to_json(), flush=True)
            else:
                print(transcript.text if len(args.audio) == 1 else f"{transcript.path}\t{transcript.text}", flush=True)
    except (ParamsError, AudioError, FileNotFoundError, ValueError) as err:
        sys.exit(f"ctcflow transcribe: error: {err}")


if __name__ == "__main__":
    main()

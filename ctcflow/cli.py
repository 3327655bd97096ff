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
        from ctcflow.transcribe import main as transcribe

        return transcribe(rest)
    if command not in STAGES:
        parser.error(f"unknown command {command!r}; choose from {', '.join([*STAGES, 'repro', 'transcribe'])}")
    importlib.import_module(STAGES[command]).main(rest)


if __name__ == "__main__":
    main()

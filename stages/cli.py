"""`ctcflow`: run one pipeline stage, or the whole pipeline through DVC.

Each stage command reads only its own section of params.yaml and writes the same files
`dvc repro` would; `ctcflow repro` runs `dvc repro` itself, which skips stages that are
up to date. `ctcflow transcribe MODEL AUDIO...` transcribes audio files with a trained model
(a checkpoint, or an ONNX file); `ctcflow export MODEL OUT.onnx` exports a checkpoint to ONNX
(the pipeline's export stage runs as `python -m stages.export`); `ctcflow summary` prints the
test error rates and where the plots are.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import soundfile
import torch

from ctcflow.checkpoint import check_features, load_model
from ctcflow.data import FeatureSplit
from ctcflow.errors import CtcflowError
from ctcflow.export import MAX_OPSET, OnnxModel, check_parity, export_onnx, quantize_int8
from ctcflow.params import DEFAULT_PARAMS, ParamsError, load_section, read_yaml
from ctcflow.transcribe import Transcriber, check_device
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
    commands.add_parser("export", help="export a checkpoint to ONNX, checked against PyTorch (MODEL OUT.onnx)",
                        add_help=False)
    commands.add_parser("summary", help="the test WER and CER of both decoders, and where the plots are",
                        add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return
    command, rest = argv[0], argv[1:]
    if command == "repro":
        # This interpreter's dvc, and its `python` for the stage commands, as in an activated venv.
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        sys.exit(subprocess.call([sys.executable, "-m", "dvc", "repro", *rest], env=env))
    if command == "transcribe":
        return transcribe(rest)
    if command == "export":
        return export(rest)
    if command == "summary":
        return summary(rest)
    if command not in STAGES:
        commands = ", ".join([*STAGES, "repro", "transcribe", "export", "summary"])
        parser.error(f"unknown command {command!r}; choose from {commands}")
    importlib.import_module(STAGES[command]).main(rest)


TRANSCRIBE_HELP = """\
Transcribe audio files (WAV, FLAC, OGG, MP3; any length, sample rate and channel count) with a
trained model: a checkpoint (.pt) or a file `ctcflow export` wrote (.onnx).

Output, on stdout, one line per file in the order given: the text alone for one file,
PATH<TAB>TEXT for several. With --json, one JSON object per line and file: path, text, duration,
and words, each with word, start and end (seconds) and confidence (0-1).

Decoder, unless --decoder: evaluate.decoder of the params file, with its beam settings and blank penalty; the params
file is --params, or params.yaml in the current directory if there is one (the project's says
beam: beam search with the lexicon and LM in --lm-dir). Without a params file: greedy decoding.

Every file is read through before any is transcribed: one that cannot be decoded or holds NaN or
infinite samples stops the command with a one-line error naming it; a silent or clipped one is
transcribed, with a warning on stderr. Long files go through the model in overlapping windows
(--chunk-seconds, --overlap-seconds). More: docs/decoding.md.
"""


def transcribe(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ctcflow transcribe", description=TRANSCRIBE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint, e.g. models/best.pt, or an exported model, e.g. export/model.onnx")
    parser.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG, MP3; any sample rate)")
    parser.add_argument("--decoder", choices=["greedy", "beam"],
                        help="beam reads its settings from the params file; default: evaluate.decoder of the "
                             "params file, greedy without one")
    parser.add_argument("--blank-penalty", type=finite_float,
                        help="subtracted from the blank log-probability before decoding; default: "
                             "evaluate.blank_penalty of the params file; 0 without one")
    parser.add_argument("--params", help="params file: its evaluate section gives the beam search settings "
                                         "and the defaults above, its featurize section the levels the silent "
                                         f"and clipped warnings use (default: {DEFAULT_PARAMS}, if it exists)")
    parser.add_argument("--lm-dir", default="data/lm", help="lexicon and LM for beam search (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="JSON lines with per-word start/end times")
    parser.add_argument("--device", type=device_name,
                        help=f"cpu, cuda or cuda:N; for a checkpoint: cuda where a GPU is available, else cpu (here: "
                             f"{default_device()}); an ONNX model runs on the cpu")
    parser.add_argument("--threads", type=positive_int, help="CPU threads of PyTorch and onnxruntime (default: theirs)")
    parser.add_argument("--chunk-seconds", type=finite_float, default=30.0, help="window length (default: %(default)s)")
    parser.add_argument("--overlap-seconds", type=finite_float, default=4.0,
                        help="overlap of consecutive windows; longer than any word (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per batch (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        # A params file named on the command line must exist; the default one is optional.
        params_file = args.params or (DEFAULT_PARAMS if DEFAULT_PARAMS.is_file() else None)
        evaluate = load_section("evaluate", EvaluateParams, params_file) if params_file else None
        decoder = args.decoder or (evaluate.decoder if evaluate else "greedy")
        if decoder == "beam" and evaluate is None:
            raise ParamsError(f"--decoder beam reads its settings from the evaluate section of a params file, "
                              f"and there is no {DEFAULT_PARAMS} here: pass --params")
        blank_penalty = args.blank_penalty
        if blank_penalty is None:
            blank_penalty = evaluate.blank_penalty if evaluate else 0.0
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cpu" if args.model.endswith(".onnx") else default_device())
        transcriber = Transcriber(
            args.model, decoder, evaluate.beam if evaluate else None, args.lm_dir, blank_penalty, device,
            args.chunk_seconds, args.overlap_seconds, args.batch_size, args.threads,
            **(screening(params_file) if params_file else {}))
        for transcript in transcriber.transcribe(args.audio, warn=transcribe_warning):
            if args.json:
                print(transcript.to_json(), flush=True)
            else:
                print(transcript.text if len(args.audio) == 1 else f"{transcript.path}\t{transcript.text}", flush=True)
    # ParamsError: a ValueError; AudioError: both. transcribe turns read errors into AudioErrors; any
    # libsndfile or file-system error left over is still the file's one line, not a traceback.
    except (CtcflowError, OSError, soundfile.SoundFileError, ValueError) as err:
        sys.exit(f"ctcflow transcribe: error: {err}")


def transcribe_warning(message: str) -> None:
    print(f"ctcflow transcribe: warning: {message}", file=sys.stderr, flush=True)


def screening(params_file: str | Path) -> dict:
    """featurize.silence_db and clip_warn_fraction of the params file, when it has a featurize section:
    transcribe warns of the files featurize would reject as silent or flag as clipped."""
    if "featurize" not in (read_yaml(params_file) or {}):
        return {}
    from stages.featurize import FeaturizeParams  # its augmentation imports, only when needed

    featurize = load_section("featurize", FeaturizeParams, params_file)
    return {"silence_db": featurize.silence_db, "clip_warn_fraction": featurize.clip_warn_fraction}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# argparse types: a bad value is argparse's one-line error naming the flag, not torch's traceback later.
def positive_int(text: str) -> int:
    value = int(text)  # argparse reports its ValueError as an invalid value
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def seconds(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


# The oldest operator set the TorchScript exporter writes (torch.onnx.export with dynamo=False).
MIN_OPSET = 9


def opset(text: str) -> int:
    value = int(text)
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"must be {MIN_OPSET}–{MAX_OPSET}, got {value}")
    return value


def device_name(text: str) -> str:
    try:
        check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def export(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ctcflow export",
        description="Export a checkpoint's model to ONNX for onnxruntime: dynamic batch and time axes, and the "
                    "feature settings, units and normalization in its metadata, so the file stands alone "
                    "(`ctcflow transcribe OUT.onnx AUDIO...` runs it; docs/export.md). With --check-split, "
                    "PyTorch and onnxruntime transcribe that split of a feature store greedily and the "
                    "largest log-probability difference and the transcripts that differ are printed. The "
                    "pipeline's export stage (python -m stages.export) does the same from params.yaml.")
    parser.add_argument("model", help="checkpoint, e.g. models/best.pt")
    parser.add_argument("out", help="the ONNX file to write, e.g. model.onnx; the name must end in .onnx, which is "
                                    "how `ctcflow transcribe` tells it from a checkpoint")
    parser.add_argument("--int8", metavar="OUT_INT8", help="also write a copy with int8 weights (onnxruntime's "
                                                           "dynamic quantization) to this file: another .onnx "
                                                           "name than OUT, e.g. model.int8.onnx")
    parser.add_argument("--check-split", metavar="DIR", help="a split of a feature store, e.g. data/features/test, "
                                                             "to check the ONNX model(s) against PyTorch on")
    parser.add_argument("--opset", type=opset, default=17,
                        help=f"ONNX operator set, {MIN_OPSET}–{MAX_OPSET} (default: %(default)s)")
    parser.add_argument("--batch-frames", type=positive_int, default=40000,
                        help="--check-split: padded frames per batch (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads of PyTorch and onnxruntime (default: theirs)")
    args = parser.parse_args(argv)
    try:
        # The files to write and the split, checked before the model is loaded or anything written.
        out = onnx_target(args.out, "OUT")
        if args.int8:
            int8 = onnx_target(args.int8, "--int8")
            if int8.resolve() == out.resolve():
                raise ValueError(f"--int8 {args.int8} is OUT itself: the int8 copy would overwrite the fp32 model; "
                                 f"name another file, e.g. {out.with_suffix('.int8.onnx')}")
        if args.check_split and (Path(args.check_split) / "features.json").is_file():
            store = Path(args.check_split)
            found = sorted(d.name for d in store.iterdir() if d.is_dir())
            raise ValueError(f"--check-split {store} is a whole feature store: name one of its split folders, such as "
                             f"{store / 'test'} (the store has splits {', '.join(found)})")
        if args.threads:
            torch.set_num_threads(args.threads)
        checkpoint, model, tokenizer = load_model(args.model)
        split = None
        if args.check_split:  # read before any file is written
            split = Path(args.check_split)
            if not split.is_dir() and (split.parent / "features.json").is_file():
                found = sorted(d.name for d in split.parent.iterdir() if d.is_dir())
                raise ValueError(f"--check-split {split}: {split.parent} has no split {split.name!r} "
                                 f"(it has {', '.join(found)})")
            check_features(checkpoint, split.parent, args.model, units=False)
            split = FeatureSplit(split.parent, split.name, tokenizer)
        export_onnx(checkpoint, model, tokenizer, args.out, args.opset)
        print(f"wrote {args.out}")
        files = [args.out]
        if args.int8:
            Path(args.int8).parent.mkdir(parents=True, exist_ok=True)  # as export_onnx makes OUT's
            quantize_int8(args.out, args.int8)
            print(f"wrote {args.int8}")
            files.append(args.int8)
        if split is not None:
            for path in files:
                parity = check_parity(model, OnnxModel(path, args.threads), split, args.batch_frames)
                print(parity.describe(path))
    except (CtcflowError, OSError, ValueError) as err:  # OSError: a file system's refusal to write OUT, say
        sys.exit(f"ctcflow export: error: {err}")


def onnx_target(path: str, flag: str) -> Path:
    """An ONNX file export can write, or a ValueError naming it: a .onnx name (`ctcflow transcribe`
    reads any other as a checkpoint), not a directory, not under a file."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory: name the file to write, e.g. {target / 'model.onnx'}")
    if target.suffix != ".onnx":
        raise ValueError(f"{flag} {path}: the file name must end in .onnx (`ctcflow transcribe` reads any other "
                         f"as a checkpoint)")
    parent = next(p for p in target.parents if p.exists())  # `.` or `/` at the latest
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
    return target


def summary(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ctcflow summary",
        description="A few lines for the end of `make demo`: the test WER and CER of greedy decoding and of "
                    "beam search (and of each extra test set, manifest.test_sets), how long the pipeline took, "
                    "and where the plots are.")
    parser.add_argument("--elapsed", type=seconds, metavar="SECONDS", help="the pipeline's run time, to print")
    parser.add_argument("--metrics", default="metrics/eval.json",
                        help="the evaluate stage's metrics (default: %(default)s)")
    parser.add_argument("--params", default=DEFAULT_PARAMS,
                        help="the params file whose evaluate.split the metrics are of (default: %(default)s; "
                             "test where there is none)")
    args = parser.parse_args(argv)
    metrics_file = Path(args.metrics)
    try:
        params = read_yaml(args.params) if Path(args.params).exists() else {}
    except ParamsError as err:
        sys.exit(f"ctcflow summary: error: {err}")
    evaluate = params.get("evaluate") if isinstance(params, dict) else None
    split = evaluate.get("split") if isinstance(evaluate, dict) else None
    if not isinstance(split, str) or not split:  # evaluate refuses anything else, so its metrics are test's
        split = "test"
    if metrics_file.is_dir():
        sys.exit(f"ctcflow summary: error: {metrics_file} is a directory; --metrics takes the evaluate stage's "
                 f"metrics file (metrics/eval.json)")
    if not metrics_file.is_file():
        sys.exit(f"ctcflow summary: error: {metrics_file} not found (run the pipeline first: dvc repro)")
    try:
        metrics = json.loads(metrics_file.read_text())
        lines = error_lines(str(split), metrics)
        if not lines:  # another stage's metrics (lm.json, say) would print nothing but the plots line
            raise ValueError("no 'greedy' or 'beam' block")
        test_sets = metrics.get("test_sets", {})
        if not isinstance(test_sets, dict):
            raise TypeError(f"'test_sets' is a {type(test_sets).__name__}, not a mapping of test sets")
        for name, block in test_sets.items():
            found = error_lines(f"test set {name}:", block)
            if not found:  # evaluate scores every test set greedily at least: silence would hide one
                raise ValueError(f"test set {name!r} has no 'greedy' or 'beam' block")
            lines += found
    except (ValueError, TypeError, KeyError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        sys.exit(f"ctcflow summary: error: {metrics_file} is not the evaluate stage's metrics "
                 f"({type(err).__name__}: {err})")
    for line in lines:
        print(line)
    if args.elapsed is not None:
        print(f"pipeline time: {minutes_seconds(args.elapsed)}")
    print("plots: plots/*.png, or all of them in one HTML page: dvc plots show")


def error_lines(what: str, metrics: dict) -> list[str]:
    # Word units have no beam block: the beam search spells words in characters.
    return [f"{what} WER {metrics[name]['wer']:6.2%}  CER {metrics[name]['cer']:6.2%}  {label}"
            for name, label in (("greedy", "greedy decoding"), ("beam", "beam search")) if name in metrics]


def minutes_seconds(seconds: float) -> str:
    """723 → "12 min 03 s"; under a minute, "45 s"."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


if __name__ == "__main__":
    main()

"""Accuracy, not speed: `ctcflow transcribe` on audio cut less tightly than the training utterances.

The demo trains on tightly cut synthesized utterances. This takes the first --utterances of the
project's test split (data/manifests/test.jsonl, its audio) and transcribes them with the
project's model (models/best.pt; greedy, and beam search + LM as params.yaml's evaluate section
says), as they are and then:
  - padded with --pad seconds of digital silence at each end;
  - padded with --pad seconds of faint white noise (amplitude --noise, seeded) at each end;
  - joined into one long file with --gap seconds of silence between them, transcribed in
    windows of each --chunk-seconds (overlap --overlap-seconds, by default 4 s or a fifth of the
    window when that is less):
    the window borders fall inside words, so this also tests how words at borders are merged.
WER in % of each, over the same reference words (the long file's hypothesis against the
references joined). Writes benchmarks/results/long_audio.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/long_audio.py --project-dir .   # after `make demo`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `ctcflow`
from common import demo_paths, machine, results_path, write_results  # noqa: E402

from ctcflow.manifest import read_manifest  # noqa: E402
from ctcflow.metrics import error_rates  # noqa: E402
from ctcflow.params import load_section  # noqa: E402
from ctcflow.transcribe import Transcriber  # noqa: E402
from stages.evaluate import EvaluateParams  # noqa: E402


def write(path: Path, samples: np.ndarray, rate: int) -> Path:
    soundfile.write(path, samples, rate, subtype="FLOAT")
    return path


def variants(rows, out: Path, pad: float, noise: float, gap: float, seed: int) -> dict[str, list[Path]]:
    """The test files as they are, padded with silence, padded with noise, and all in one file."""
    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {"as they are": [], "padded with silence": [], "padded with faint noise": []}
    joined, rate = [], None
    for i, row in enumerate(rows):
        samples, rate = soundfile.read(row.audio_path, dtype="float32", always_2d=True)
        samples = samples.mean(axis=1)
        edge = np.zeros(round(pad * rate), dtype=np.float32)
        files["as they are"].append(Path(row.audio_path))
        files["padded with silence"].append(write(out / f"silence{i}.wav", np.concatenate([edge, samples, edge]), rate))
        noisy = [noise * rng.standard_normal(len(edge)).astype(np.float32) for _ in range(2)]
        files["padded with faint noise"].append(write(out / f"noise{i}.wav", np.concatenate([noisy[0], samples, noisy[1]]),
                                                      rate))
        joined += [samples, np.zeros(round(gap * rate), dtype=np.float32)]
    files["one long file"] = [write(out / "long.wav", np.concatenate(joined), rate)]
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."), help="a project after `make demo`")
    parser.add_argument("--utterances", type=int, default=200, help="the first this many of the test split")
    parser.add_argument("--pad", type=float, default=0.25, help="seconds of silence or noise at each end")
    parser.add_argument("--noise", type=float, default=0.001, help="the faint noise's amplitude (std)")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds of silence between utterances in the long file")
    parser.add_argument("--chunk-seconds", type=float, nargs="+", default=[3.0, 5.0, 10.0, 20.0, 30.0],
                        help="window lengths for the long file")
    parser.add_argument("--overlap-seconds", type=float, default=None,
                        help="overlap of the long file's windows (default: 4 s, or a fifth of the window when less)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="results under benchmarks/results/quick/")
    parser.add_argument("--out", help="results file (default: benchmarks/results/long_audio.json)")
    args = parser.parse_args()

    project = args.project_dir.resolve()
    paths = demo_paths(project, "manifests", "lm")
    rows = list(read_manifest(paths["manifests"] / "test.jsonl").head(args.utterances).itertuples())
    rows = [row._replace(audio_path=str(project / row.audio_path)) for row in rows]
    references = [row.text_normalized for row in rows]
    evaluate = load_section("evaluate", EvaluateParams, project / "params.yaml")
    model = project / "models" / f"{evaluate.checkpoint}.pt"

    def transcriber(decoder: str, chunk: float) -> Transcriber:
        overlap = args.overlap_seconds if args.overlap_seconds is not None else min(4.0, chunk / 5)
        return Transcriber(model, decoder, evaluate.beam, paths["lm"], evaluate.blank_penalty, "cpu", chunk,
                           overlap, 8, None)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = variants(rows, Path(tmp), args.pad, args.noise, args.gap, args.seed)
        for decoder in ("greedy", "beam"):
            for name, audio in files.items():
                chunks = args.chunk_seconds if name == "one long file" else [30.0]
                for chunk in chunks:
                    texts = [t.text for t in transcriber(decoder, chunk).transcribe(audio, warn=lambda line: None)]
                    refs = [" ".join(references)] if name == "one long file" else references
                    label = f"{name}, {chunk:g} s windows" if name == "one long file" else name
                    wer = round(100 * error_rates(refs, texts)["wer"], 2)
                    results.setdefault(label, {})[decoder] = wer
                    print(f"{label}, {decoder}: WER {wer:.2f} %", flush=True)
    write_results(results_path("long_audio", args.quick, args.out), {
        "model": str(model.relative_to(project)), "utterances": len(rows), "pad_seconds": args.pad,
        "noise_amplitude": args.noise, "gap_seconds": args.gap, "overlap_seconds": args.overlap_seconds,
        "wer_percent": results, **machine()})


if __name__ == "__main__":
    main()

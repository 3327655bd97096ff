"""Benchmark: real-time factor of transcription on the CPU, PyTorch against onnxruntime (fp32 and int8).

On the project's test split (its audio, data/manifests/test.jsonl, and its features,
data/features/test), with the project's trained model (models/best.pt), at --threads CPU threads:
  - bare forward: the PyTorch model on the stored features, in the batches transcription makes
    (--batch-size utterances in manifest order), nothing else: no audio, no features, no decoding;
  - pytorch: `ctcflow transcribe models/best.pt` (ctcflow.transcribe.Transcriber, greedy): reading
    and resampling the audio, log-mel features, the model, greedy decoding and word timings;
  - onnxruntime fp32 / int8: the same transcription of the model exported by ctcflow.export, and
    of its copy with int8 weights (onnxruntime's dynamic quantization), run by onnxruntime.
The real-time factor is processing seconds / audio seconds (lower is faster; 0.01 = 100× real
time); each figure is the best of --rounds interleaved rounds. Each comes with its greedy test WER
(no blank penalty), which says what int8 costs in accuracy. Writes benchmarks/results/rtf.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/rtf.py --project-dir .           # after `make demo`
    PYTHONPATH=$PWD .venv/bin/python benchmarks/rtf.py --project-dir . --quick   # 24 utterances, 1 round
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `ctcflow`
from common import demo_paths, machine, results_path, write_results  # noqa: E402

from ctcflow.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ctcflow.data import FeatureSplit  # noqa: E402
from ctcflow.decoding import GreedyDecoder  # noqa: E402
from ctcflow.export import export_onnx, quantize_int8  # noqa: E402
from ctcflow.manifest import read_manifest  # noqa: E402
from ctcflow.metrics import error_rates  # noqa: E402
from ctcflow.transcribe import Transcriber  # noqa: E402


@torch.no_grad()
def bare_forward(model: torch.nn.Module, split: FeatureSplit, rows: list[int], batch_size: int,
                 decode: GreedyDecoder) -> tuple[float, list[str]]:
    """Seconds of the model's forward passes alone (features read beforehand), and the greedy transcripts."""
    batches = [[split[i][0] for i in rows[start:start + batch_size]] for start in range(0, len(rows), batch_size)]
    seconds, texts = 0.0, []
    for feats in batches:
        padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
        lengths = torch.tensor([len(f) for f in feats])
        start = time.perf_counter()
        log_probs, out_lengths = model(padded, lengths)
        seconds += time.perf_counter() - start
        texts += decode(log_probs, out_lengths)
    return seconds, texts


def transcribe(model: Path, paths: list[Path], batch_size: int, threads: int) -> tuple[float, list[str]]:
    """Seconds of `ctcflow transcribe` (loading the model and a first file to warm it up excluded), and
    its transcripts."""
    transcriber = Transcriber(model, decoder="greedy", beam=None, lm_dir=None, blank_penalty=0.0, device="cpu",
                              chunk_seconds=30.0, overlap_seconds=4.0, batch_size=batch_size, num_threads=threads)
    list(transcriber.transcribe(paths[:1]))  # onnxruntime's first run allocates and plans; not what is measured
    start = time.perf_counter()
    texts = [t.text for t in transcriber.transcribe(paths)]
    return time.perf_counter() - start, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."),
                        help="a project after `make demo`: its models/best.pt, data/manifests, data/features and audio")
    parser.add_argument("--utterances", type=int, default=None, help="the first N test utterances (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of PyTorch and onnxruntime "
                                                               "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per batch, as `ctcflow transcribe` "
                                                                  "batches windows (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the best")
    parser.add_argument("--quick", action="store_true", help="24 utterances, 1 round: a smoke test, figures are noise")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/rtf.json; "
                                                    "--quick: benchmarks/results/quick/rtf.json)")
    args = parser.parse_args()
    if args.quick:
        args.utterances, args.rounds = min(args.utterances or 24, 24), 1
    project = args.project_dir.resolve()
    paths = demo_paths(project, "manifests", "features")
    torch.set_num_threads(args.threads)

    checkpoint = load_checkpoint(project / "models/best.pt")
    model, tokenizer = model_from_checkpoint(checkpoint)
    split = FeatureSplit(paths["features"], "test", tokenizer)
    manifest = read_manifest(paths["manifests"] / "test.jsonl").set_index("id")
    ids = split.index["id"].tolist()[:args.utterances]
    rows = list(range(len(ids)))
    audio = [project / manifest.loc[i, "audio_path"] for i in ids]
    references = split.index["text_normalized"].tolist()[:len(ids)]
    audio_seconds = float(split.index["duration"][:len(ids)].sum())

    work = Path(tempfile.mkdtemp(prefix="ctcflow-bench-rtf-"))
    try:
        onnx_files = {"onnxruntime fp32": work / "model.onnx", "onnxruntime int8": work / "model.int8.onnx"}
        export_onnx(checkpoint, model, tokenizer, onnx_files["onnxruntime fp32"], opset=17)
        quantize_int8(onnx_files["onnxruntime fp32"], onnx_files["onnxruntime int8"])
        runs = {"bare forward": lambda: bare_forward(model, split, rows, args.batch_size, GreedyDecoder(tokenizer, 0.0)),
                "pytorch": lambda: transcribe(project / "models/best.pt", audio, args.batch_size, args.threads),
                **{name: (lambda path=path: transcribe(path, audio, args.batch_size, args.threads))
                   for name, path in onnx_files.items()}}
        best: dict[str, float] = {}
        wer: dict[str, float] = {}
        for round_ in range(1, args.rounds + 1):
            for name, run in runs.items():
                seconds, texts = run()
                best[name] = min(best.get(name, seconds), seconds)
                wer[name] = error_rates(references, texts)["wer"]
            print(f"  round {round_}: " + "; ".join(f"{name} {best[name] / audio_seconds:.4f}" for name in runs),
                  flush=True)
        sizes = {name: round(path.stat().st_size / 1e6, 2) for name, path in onnx_files.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{len(ids)} test utterances, {audio_seconds:.0f} s of audio, {args.threads} threads")
    print(f"{'':18s} {'RTF':>8s} {'x real time':>12s} {'greedy WER':>11s}")
    for name in runs:
        print(f"{name:18s} {best[name] / audio_seconds:8.4f} {audio_seconds / best[name]:12.0f} {wer[name]:11.2%}")
    write_results(results_path("rtf", args.quick, args.out), {
        "quick": args.quick, "utterances": len(ids), "audio_seconds": round(audio_seconds, 2),
        "threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds,
        "arch": checkpoint["model_config"]["arch"], "onnx_size_mb": sizes,
        "runs": {name: {"seconds": round(best[name], 3), "rtf": round(best[name] / audio_seconds, 5),
                        "greedy_wer": wer[name]} for name in runs},
        **machine()})


if __name__ == "__main__":
    main()

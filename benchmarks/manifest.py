"""Benchmark: the manifest stage on a synthetic LibriSpeech-layout corpus of many tiny FLAC files.

Prints files per second for, in the same run and over the same files:
  - a plain `soundfile.info` loop (the baseline the issue names),
  - header reading alone in a thread pool (why the stage uses processes),
  - the whole manifest stage (listing, headers, checks, writing), with 1 and with N processes,
each the best of --rounds interleaved rounds (the least disturbed by other work on the
machine), with the CPU time per file, which other work does not change. Writes the figures to
benchmarks/results/manifest.json. Not part of the test suite.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/manifest.py --files 100000 --workers 2
    PYTHONPATH=$PWD .venv/bin/python benchmarks/manifest.py --quick   # 2,000 files, 1 round: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from ctcflow.audio import read_info
from ctcflow.params import load_section
from stages import manifest

RESULTS = Path(__file__).parent / "results" / "manifest.json"


def make_corpus(root: Path, files: int, per_chapter: int = 100, chapters: int = 10) -> list[str]:
    """<reader>/<chapter>/<id>.flac + .trans.txt; every file holds the same 0.5 s of audio."""
    buffer = io.BytesIO()
    t = np.arange(4000) / 8000
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * 440 * t), 8000, format="FLAC")
    audio = buffer.getvalue()
    paths = []
    for n in range(0, files, per_chapter):
        reader, chapter = 1000 + n // (per_chapter * chapters), n // per_chapter % chapters
        folder = root / str(reader) / str(chapter)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(min(per_chapter, files - n)):
            utt = f"{reader}-{chapter}-{i:04d}"
            (folder / f"{utt}.flac").write_bytes(audio)
            lines.append(f"{utt} HELLO THERE\n")
            paths.append(str(folder / f"{utt}.flac"))
        (folder / f"{reader}-{chapter}.trans.txt").write_text("".join(lines))
    return paths


def timed(fn) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of this process and its (reaped) children."""
    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    cpu_start, start = cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - start, cpu() - cpu_start


def run_stage(root: Path, out: Path, workers: int) -> None:
    defaults = load_section("manifest", manifest.ManifestParams, "params.yaml")  # their one home
    params = defaults.model_copy(update={"source": "librispeech", "corpus_dir": str(root), "num_workers": workers})
    with contextlib.redirect_stdout(io.StringIO()):
        manifest.run(params, out_dir=out / "manifests", metrics_file=out / "manifest.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to build the corpus (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="2,000 files, 1 round: a smoke test, figures are noise")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/manifest.json; "
                                                    "--quick: benchmarks/results/quick/manifest.json)")
    args = parser.parse_args()
    if args.quick:
        args.files, args.rounds = min(args.files, 2000), 1
    out = Path(args.out) if args.out else RESULTS.parent / "quick" / RESULTS.name if args.quick else RESULTS

    work = Path(args.dir or tempfile.mkdtemp(prefix="ctcflow-bench-"))
    root = work / "corpus"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    paths = make_corpus(root, args.files)
    print(f"{len(paths):,} FLAC files generated in {time.perf_counter() - start:.1f} s under {root}")

    def threads() -> None:
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(read_info, paths))

    runs = {
        "soundfile.info loop": lambda: [sf.info(p) for p in paths],
        f"read_info, {args.workers} threads": threads,
        "manifest stage, 1 process": lambda: run_stage(root, work, 1),
        f"manifest stage, {args.workers} processes": lambda: run_stage(root, work, args.workers),
    }
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            wall, cpu = timed(fn)
            best[name] = min(best.get(name, (wall, cpu)), (wall, cpu))

    baseline = len(paths) / best["soundfile.info loop"][0]
    results = {"files": len(paths), "rounds": args.rounds, "cpus": os.cpu_count(),
               "load_average_1min_at_end": round(os.getloadavg()[0], 2), "python": platform.python_version(),
               "libsndfile": sf.__libsndfile_version__, "files_per_second": {}, "ratio_to_soundfile_info_loop": {},
               "cpu_microseconds_per_file": {}}
    print(f"{'best of ' + str(args.rounds):36s} {'s':>7s} {'files/s':>9s} {'× loop':>7s} {'CPU µs/file':>12s}")
    for name, (wall, cpu) in best.items():
        rate = len(paths) / wall
        results["files_per_second"][name] = round(rate)
        results["ratio_to_soundfile_info_loop"][name] = round(rate / baseline, 2)
        results["cpu_microseconds_per_file"][name] = round(cpu / len(paths) * 1e6)
        print(f"{name:36s} {wall:7.1f} {rate:9,.0f} {rate / baseline:7.2f} {cpu / len(paths) * 1e6:12.0f}")
    print(f"({os.cpu_count()} CPUs, 1-minute load average {results['load_average_1min_at_end']} at the end)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

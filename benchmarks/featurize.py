"""Benchmark: the featurize stage against a bare loop of soundfile read + torchaudio log-mel.

Over the same files (the demo corpus's manifests, or a seeded sample of --utterances of them),
in one run, in interleaved rounds, each figure the best of --rounds:
  - bare loop: soundfile.read + torchaudio MelSpectrogram → clamp → log, the project's
    featurize settings, 1 torch thread, one process (the floor the issue names),
  - the featurize stage (featurize.run: decoding checks, clipping and silence checks, training
    statistics, the float16 store, rejects and metrics), 1 worker, 1 torch thread,
  - the stage with featurize.num_workers = --workers processes, 1 torch thread each.
Prints audio-seconds per wall-second, the ratio to the bare loop, the speed-up the extra workers
give over 1, and CPU seconds per audio hour of the one-process runs (which other work on the
machine does not change; the workers are the forkserver's children, outside this process's count).
The first round of the parallel stage also starts multiprocessing's forkserver (one import of
torch), which every `python -m stages.featurize` with workers pays once; it is reported apart.
The files are read once before timing, so every round reads them from the page cache. Writes
benchmarks/results/featurize.json. Not part of the test suite.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/featurize.py --project-dir .       # after `make demo`
    PYTHONPATH=$PWD .venv/bin/python benchmarks/featurize.py --project-dir . --quick   # ~1 min smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio.functional as AF
import torchaudio.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `stages` and `ctcflow`
from common import demo_paths, files_under, machine, results_path, timed, write_results  # noqa: E402

from ctcflow.manifest import SPLITS, read_manifest  # noqa: E402
from ctcflow.params import load_section  # noqa: E402
from stages import featurize  # noqa: E402


def sample_manifests(manifests: Path, project: Path, utterances: int, seed: int, out: Path) -> pd.DataFrame:
    """A manifest folder holding `utterances` rows (0 = all), spread over the splits in proportion,
    in manifest order, with absolute audio paths."""
    tables = {split: read_manifest(manifests / f"{split}.jsonl") for split in SPLITS}
    total = sum(len(t) for t in tables.values())
    fraction = 1.0 if utterances <= 0 or utterances >= total else utterances / total
    out.mkdir(parents=True, exist_ok=True)
    chosen = []
    for split, table in tables.items():
        keep = table.sample(frac=fraction, random_state=seed).sort_index() if fraction < 1 else table
        keep = keep.assign(audio_path=[str(p if Path(p).is_absolute() else project / p) for p in keep["audio_path"]])
        keep.to_json(out / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)
        chosen.append(keep)
    if (manifests / "tokens.json").is_file():  # the label unit; older projects have none (the recipe's, then)
        shutil.copy(manifests / "tokens.json", out / "tokens.json")
    return pd.concat(chosen)


def bare_loop(paths: list[str], params: featurize.FeaturizeParams) -> None:
    """The floor: read, log-mel, nothing else (no checks, statistics or store)."""
    torch.set_num_threads(1)
    mel = T.MelSpectrogram(sample_rate=params.sample_rate, n_fft=params.n_fft, win_length=params.win_length,
                           hop_length=params.hop_length, n_mels=params.n_mels)
    with torch.no_grad():
        for path in paths:
            samples, rate = sf.read(path, dtype="float32")
            waveform = torch.from_numpy(samples if samples.ndim == 1 else samples.mean(axis=1))
            if rate != params.sample_rate:
                waveform = AF.resample(waveform, rate, params.sample_rate)
            mel(waveform).clamp_min(1e-10).log().T.numpy()


def run_stage(params: featurize.FeaturizeParams, manifests: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        featurize.run(params, manifest_dir=manifests, out_dir=out / "features", metrics_file=out / "featurize.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."),
                        help="a project after `make demo`: its data/manifests, data/corpus and params.yaml are read")
    parser.add_argument("--utterances", type=int, default=0, help="how many files (0 = every file of the manifests)")
    parser.add_argument("--workers", type=int, default=2, help="featurize.num_workers of the parallel run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each figure is the best")
    parser.add_argument("--seed", type=int, default=0, help="for the sample of files")
    parser.add_argument("--quick", action="store_true", help="1,000 files, 2 rounds: a smoke test, figures are noise")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/featurize.json; "
                                                    "--quick: benchmarks/results/quick/featurize.json)")
    args = parser.parse_args()
    if args.quick:
        args.utterances, args.rounds = args.utterances or 1000, 2
    project = args.project_dir.resolve()
    paths = demo_paths(project, "manifests", "corpus")
    base = load_section("featurize", featurize.FeaturizeParams, project / "params.yaml")

    work = Path(tempfile.mkdtemp(prefix="ctcflow-bench-featurize-"))
    try:
        chosen = sample_manifests(paths["manifests"], project, args.utterances, args.seed, work / "manifests")
        files = chosen["audio_path"].tolist()
        audio_seconds = float(chosen["duration"].sum())
        for path in files:  # into the page cache, so no round pays for the first read from disk
            Path(path).read_bytes()
        print(f"{len(files):,} files, {audio_seconds / 3600:.2f} audio hours; {args.rounds} interleaved round(s)",
              flush=True)

        one = base.model_copy(update={"num_workers": 1, "num_threads": 1})
        many = base.model_copy(update={"num_workers": args.workers, "num_threads": 1})
        runs = {
            "bare loop (soundfile.read + log-mel), 1 process": lambda: bare_loop(files, one),
            "featurize stage, 1 worker": lambda: run_stage(one, work / "manifests", work / "one"),
            f"featurize stage, {args.workers} workers": lambda: run_stage(many, work / "manifests", work / "many"),
        }
        best: dict[str, tuple[float, float]] = {}
        first: dict[str, float] = {}
        for round_ in range(1, args.rounds + 1):
            for name, fn in runs.items():
                wall, cpu = timed(fn)
                best[name] = min(best.get(name, (wall, cpu)), (wall, cpu))
                first.setdefault(name, wall)
                print(f"  round {round_}: {name}: {wall:.2f} s, {audio_seconds / wall:,.0f} audio-s/s", flush=True)
        identical = files_under(work / "one" / "features") == files_under(work / "many" / "features")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    names = list(runs)
    rates = {name: audio_seconds / wall for name, (wall, _) in best.items()}
    results = {"files": len(files), "audio_hours": round(audio_seconds / 3600, 3), "rounds": args.rounds,
               "quick": args.quick, **machine(),
               "settings": base.model_dump(include={"sample_rate", "n_fft", "win_length", "hop_length", "n_mels"}),
               "audio_seconds_per_second": {n: round(r) for n, r in rates.items()},
               "ratio_to_bare_loop": {n: round(r / rates[names[0]], 3) for n, r in rates.items()},
               f"speedup_{args.workers}_workers_over_1": round(rates[names[2]] / rates[names[1]], 3),
               "cpu_seconds_per_audio_hour": {n: round(cpu / audio_seconds * 3600, 1)
                                              for n, (_, cpu) in list(best.items())[:2]},
               "forkserver_start_seconds": round(first[names[2]] - best[names[2]][0], 2) if args.rounds > 1 else None,
               "parallel_output_identical": identical}
    print(f"\n{'best of ' + str(args.rounds):50s} {'s':>7s} {'audio-s/s':>10s} {'× bare':>7s} {'CPU s/audio h':>14s}")
    for name, (wall, cpu) in best.items():
        measured = name in results["cpu_seconds_per_audio_hour"]
        cpu_text = f"{cpu / audio_seconds * 3600:14.1f}" if measured else f"{'—':>14s}"
        print(f"{name:50s} {wall:7.2f} {rates[name]:10,.0f} {rates[name] / rates[names[0]]:7.2f} {cpu_text}")
    print(f"{args.workers} workers over 1: {results[f'speedup_{args.workers}_workers_over_1']:.2f}×; "
          f"their features are {'identical' if identical else 'NOT identical'} to 1 worker's")
    if args.rounds > 1:
        print(f"starting the forkserver (first parallel round − best): {results['forkserver_start_seconds']:.1f} s, "
              "once per stage run")
    print(f"({results['cpus']} CPUs, 1-minute load average {results['load_average_1min_at_end']} at the end"
          + ("; --quick: the figures are a smoke test, not a measurement)" if args.quick else ")"))
    write_results(results_path("featurize", args.quick, args.out), results)


if __name__ == "__main__":
    main()

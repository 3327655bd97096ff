"""Benchmark: the featurize stage on a Dask cluster against the local executor, over the same files.

Over the demo corpus's manifests (or a seeded sample of --utterances of them), in one run, in
interleaved rounds, each figure the best of --rounds, the featurize stage (featurize.run) with:
  - featurize.executor local: 1 worker (the stage's own process), and --workers processes,
  - featurize.executor dask: Dask clusters of 1 and of --workers workers (the local cluster the
    stage starts with scheduler_address null: processes on 127.0.0.1, one thread each), started
    before the rounds and reached through featurize.scheduler_address, as a standing cluster on
    other machines would be.
Prints audio-seconds per wall-second, and each run's ratio to the local executor with as many
workers and to the local executor's 1 worker. Starting a cluster (its processes, and the stage's
import in each worker) is timed apart: a run with scheduler_address null pays it every time.
Checks that every run wrote the bytes of the local executor's 1 worker. Writes
benchmarks/results/dask_featurize.json. Not part of the test suite.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/dask_featurize.py --project-dir .       # after `make demo`
    PYTHONPATH=$PWD .venv/bin/python benchmarks/dask_featurize.py --project-dir . --quick   # smoke test
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `stages` and `ctcflow`
from common import demo_paths, files_under, machine, results_path, timed, write_results  # noqa: E402
from featurize import run_stage, sample_manifests  # noqa: E402  (benchmarks/featurize.py)

from ctcflow.params import load_section  # noqa: E402
from ctcflow.workers import local_cluster  # noqa: E402
from stages import featurize  # noqa: E402


def start_cluster(workers: int) -> tuple[LocalCluster, Client, float]:
    """The local Dask cluster the stage starts itself, whose workers have imported the stage, and
    the seconds that took."""
    start = time.perf_counter()
    cluster = local_cluster(workers)
    client = Client(cluster)
    client.run(__import__, "stages.featurize")
    return cluster, client, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."),
                        help="a project after `make demo`: its data/manifests, data/corpus and params.yaml are read")
    parser.add_argument("--utterances", type=int, default=0, help="how many files (0 = every file of the manifests)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the larger local pool and Dask cluster")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the best")
    parser.add_argument("--seed", type=int, default=0, help="for the sample of files")
    parser.add_argument("--quick", action="store_true", help="300 files, 2 rounds: a smoke test, figures are noise")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/dask_featurize.json; "
                                                    "--quick: benchmarks/results/quick/dask_featurize.json)")
    args = parser.parse_args()
    if args.quick:
        args.utterances, args.rounds = args.utterances or 300, 2
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the clusters run in this process: no INFO lines
    project = args.project_dir.resolve()
    paths = demo_paths(project, "manifests", "corpus")
    base = load_section("featurize", featurize.FeaturizeParams, project / "params.yaml")
    sizes = [1, args.workers]

    work = Path(tempfile.mkdtemp(prefix="ctcflow-bench-dask-"))
    clusters = {}
    try:
        chosen = sample_manifests(paths["manifests"], project, args.utterances, args.seed, work / "manifests")
        audio_seconds = float(chosen["duration"].sum())
        for path in chosen["audio_path"]:  # into the page cache, so no round pays for the first read from disk
            Path(path).read_bytes()
        for size in sizes:
            clusters[size] = start_cluster(size)
        print(f"{len(chosen):,} files, {audio_seconds / 3600:.2f} audio hours; {args.rounds} interleaved round(s); "
              "cluster start: " + ", ".join(f"{n} worker(s) {s:.1f} s" for n, (_, _, s) in clusters.items()), flush=True)

        settings = {f"local, {n} worker(s)": {"executor": "local", "num_workers": n} for n in sizes}
        settings |= {f"dask, {n} worker(s)": {"executor": "dask", "scheduler_address": clusters[n][0].scheduler_address}
                     for n in sizes}
        best: dict[str, float] = {}
        outputs: dict[str, dict[str, bytes]] = {}
        for round_ in range(1, args.rounds + 1):
            for n, (name, setting) in enumerate(settings.items()):
                params = base.model_copy(update={"num_threads": 1, **setting})
                wall, _ = timed(lambda: run_stage(params, work / "manifests", work / f"run{n}"))
                best[name] = min(best.get(name, wall), wall)
                outputs.setdefault(name, files_under(work / f"run{n}"))
                print(f"  round {round_}: {name}: {wall:.2f} s, {audio_seconds / wall:,.0f} audio-s/s", flush=True)
    finally:
        for cluster, client, _ in clusters.values():
            client.close()
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)

    reference = outputs["local, 1 worker(s)"]
    identical = all(files == reference for files in outputs.values())
    rates = {name: audio_seconds / wall for name, wall in best.items()}
    same_workers = {name: rates[f"local, {name.split(', ')[1]}"] for name in rates}
    results = {"files": len(chosen), "audio_hours": round(audio_seconds / 3600, 3), "rounds": args.rounds,
               "quick": args.quick, **machine(),
               "audio_seconds_per_second": {name: round(rate) for name, rate in rates.items()},
               "ratio_to_local_executor_same_workers": {name: round(rate / same_workers[name], 3)
                                                        for name, rate in rates.items()},
               "ratio_to_local_1_worker": {name: round(rate / rates["local, 1 worker(s)"], 3)
                                           for name, rate in rates.items()},
               "cluster_start_seconds": {f"{n} worker(s)": round(s, 2) for n, (_, _, s) in clusters.items()},
               "output_identical": identical}
    print(f"\n{'best of ' + str(args.rounds):24s} {'s':>7s} {'audio-s/s':>10s} {'× local, same workers':>22s} "
          f"{'× local, 1 worker':>18s}")
    for name, wall in best.items():
        print(f"{name:24s} {wall:7.2f} {rates[name]:10,.0f} {results['ratio_to_local_executor_same_workers'][name]:22.2f} "
              f"{results['ratio_to_local_1_worker'][name]:18.2f}")
    print(f"every run's features are {'identical' if identical else 'NOT identical'} to the local executor's 1 worker")
    print(f"({results['cpus']} CPUs, 1-minute load average {results['load_average_1min_at_end']} at the end"
          + ("; --quick: the figures are a smoke test, not a measurement)" if args.quick else ")"))
    write_results(results_path("dask_featurize", args.quick, args.out), results)


if __name__ == "__main__":
    main()

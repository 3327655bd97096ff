"""Every benchmark, one after the other, as `make bench` runs them; then one summary file.

  manifest           files/s of the stage against a soundfile.info loop (--manifest-files synthetic FLACs)
  featurize          audio-s/s of the stage (1 and 2 workers) against a soundfile + log-mel loop
  dask_featurize     audio-s/s of the stage on a local Dask cluster of 1 and 2 workers against the local executor
  train              frames/s of the training loop against a bare PyTorch loop; the data loader's share
  memory             peak RSS of each stage on the demo corpus
  memory_scale       peak memory of featurize and of train's data loading at 2.5, 20 and 50 h of
                     audio (the demo corpus listed over and over), and of two DDP ranks at 20 h
  orchestration      no-op `dvc repro` against the no-op Prefect flow; skipped, with the reason,
                     unless the project's pipeline is up to date (this never runs the pipeline)
  time_to_accuracy   test WER against wall-clock time, default config against the recipe's (--budget each)
  rtf                real-time factor of transcription on 2 CPU threads: the bare model forward, PyTorch,
                     onnxruntime fp32 and int8 (models/best.pt exported), each with its greedy test WER

They read the project's demo outputs (data/corpus, data/manifests, data/features, models/best.pt: run `make demo`
first) and leave them as they are: the work happens in temporary folders, and the figures go to
benchmarks/results/ of this repository. Each runs in its own
process; one that fails is reported and the others still run. Roughly: 1 min manifest,
1.5 featurize, 1.5 dask_featurize, 2 train, 2–3 memory, 15 memory_scale, 1 orchestration, 2 × --budget + 0.5 time to
accuracy, ~5 rtf (an estimate); with the default --budget of 240 s, about 37 minutes on an idle 2-core machine (an
estimate; bench.json records the real time). Writes each benchmark's benchmarks/results/<name>.json and
benchmarks/results/bench.json (status, wall time and results of each). The figures need an
otherwise idle machine: other work on the same cores (above all another torch process) makes
them meaningless.

    make bench                  # = python benchmarks/run_all.py --project-dir .
    make bench QUICK=1          # = ... --quick: every benchmark in its smoke-test mode, ~3-4 min,
                                #   results under benchmarks/results/quick/ (figures are noise)
    python benchmarks/run_all.py --only train featurize
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from common import QUICK_RESULTS_DIR, RESULTS_DIR, machine  # noqa: E402

NAMES = ("manifest", "featurize", "dask_featurize", "train", "memory", "memory_scale", "orchestration",
         "time_to_accuracy", "rtf")


def pipeline_state(project: Path, env: dict) -> str | None:
    """None when `dvc status` finds the project's pipeline up to date, else why not."""
    if not (project / ".dvc").is_dir():
        return f"{project} is not a DVC project"
    # dvc.yaml alone, as `dvc repro` reads it: with no target DVC checks every dvc.yaml of the repo,
    # and the FSDD recipe's is never up to date without FSDD's recordings.
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], cwd=project, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"`dvc status` failed: {(done.stderr or done.stdout).strip()[-300:]}"
    stale = json.loads(done.stdout or "{}")
    if stale:
        return f"the pipeline is not up to date (changed: {', '.join(sorted(stale))}); run `dvc repro` first"
    return None


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    project, quick = str(args.project_dir), ["--quick"] if args.quick else []
    threads = ["--set", f"train.num_threads={args.num_threads}"] if args.num_threads else []
    return {
        "manifest": ["manifest.py", "--files", str(args.manifest_files), *quick],
        "featurize": ["featurize.py", "--project-dir", project, *quick],
        "dask_featurize": ["dask_featurize.py", "--project-dir", project, *quick],
        "train": ["train.py", "--project-dir", project, *quick,
                  *(["--num-threads", str(args.num_threads)] if args.num_threads else [])],
        "memory": ["memory.py", "--project-dir", project, *quick, *threads],
        "memory_scale": ["memory_scale.py", "--project-dir", project, *quick, *threads],
        "orchestration": ["orchestration.py", "--project-dir", project, *quick],
        "time_to_accuracy": ["time_to_accuracy.py", "--project-dir", project, "--budget", str(args.budget),
                             *quick, *threads],
        "rtf": ["rtf.py", "--project-dir", project, *quick],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."), help="a project after `make demo`")
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke-test mode; figures are noise")
    parser.add_argument("--budget", type=float, default=240, help="time_to_accuracy: seconds per config")
    parser.add_argument("--manifest-files", type=int, default=20_000, help="manifest: synthetic files")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="train.num_threads for train, memory, memory_scale and time_to_accuracy (default: params.yaml's)")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), help="run only these")
    args = parser.parse_args()
    args.project_dir = args.project_dir.resolve()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    results_dir = QUICK_RESULTS_DIR if args.quick else RESULTS_DIR

    summary: dict = {}
    cmds = commands(args)
    started = time.perf_counter()
    for n, name in enumerate(args.only, 1):
        print(f"\n=== {name} ({n}/{len(args.only)}) {' '.join(cmds[name])}", flush=True)
        if name == "orchestration" and (reason := pipeline_state(args.project_dir, env)):
            print(f"skipped: {reason}", flush=True)
            summary[name] = {"status": "skipped", "reason": reason}
            continue
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / cmds[name][0]), *cmds[name][1:]], cwd=REPO, env=env)
        seconds = round(time.perf_counter() - start, 1)
        path = results_dir / f"{name}.json"
        summary[name] = {"status": "ok" if done.returncode == 0 else f"failed (exit {done.returncode})",
                         "seconds": seconds,
                         "results": json.loads(path.read_text()) if done.returncode == 0 and path.is_file() else None}

    total = round(time.perf_counter() - started, 1)
    print(f"\n=== summary ({total / 60:.1f} min in all{', --quick: figures are noise' if args.quick else ''})")
    for name, entry in summary.items():
        print(f"{name:18s} {entry['status']:10s} {entry.get('seconds', 0):7.1f} s  {entry.get('reason', '')}")
    if set(args.only) != set(NAMES):  # bench.json is the record of a whole `make bench`
        print(f"{results_dir / 'bench.json'} left as it was: --only ran {len(args.only)} of {len(NAMES)}")
        sys.exit(0 if all(e["status"] in ("ok", "skipped") for e in summary.values()) else 1)
    out = results_dir / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "total_seconds": total, "project": os.path.relpath(args.project_dir, REPO),  # no machine paths in results
                               **machine(), "benchmarks": summary}, indent=2) + "\n")
    print(f"written to {out}")
    sys.exit(0 if all(e["status"] in ("ok", "skipped") for e in summary.values()) else 1)


if __name__ == "__main__":
    main()

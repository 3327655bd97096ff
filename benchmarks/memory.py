"""Benchmark: peak memory (RSS) of each pipeline stage on the demo corpus.

Each stage runs as its own process, the command dvc.yaml gives it (`python -m stages.<name>
--params params.yaml`), in a scratch copy of the project whose data/corpus is a symbolic link to
the project's demo corpus (read, never written). Two figures per stage:
  - peak RSS of its largest process, from the kernel (os.wait4's ru_maxrss: the stage's own
    process and the workers it waited for). The kernel also counts the launching process's RSS
    at the moment of exec, so this script never imports torch before the stages have run,
  - peak RSS of all its processes together (the stage and its workers: manifest's header
    readers, synth's synthesizers, featurize's workers), sampled every 0.1 s from /proc; pages
    the processes share count once per process, so this is an upper bound.
Shortened where the full stage would not fit a 20-minute `make bench`, and the output says so:
  - synth makes --synth-fraction of the demo's utterances and speakers (its memory does not grow
    with the corpus: it writes each file as it goes), in a folder of its own,
  - train runs --train-epochs epoch(s) (default 1) of the full demo features: the model,
    optimizer and batches are all allocated in the first epoch.
manifest, featurize, lm, evaluate and plots run in full. Writes benchmarks/results/memory.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory.py --project-dir .      # after `make demo`; ~3 min
    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory.py --quick              # the chain on a small synthesized corpus
    ... --set train.num_threads=1 --set featurize.num_workers=2                 # any param, for every stage
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root, for `stages` and `ctcflow`
from common import machine, results_path, with_dotted, write_results  # noqa: E402

STAGES = ("synth", "manifest", "featurize", "lm", "train", "evaluate", "export", "plots")
PAGE = os.sysconf("SC_PAGE_SIZE")


def group_rss(pgid: int) -> int:
    """Bytes resident in every process of a process group, from /proc."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # field 5 of /proc/<pid>/stat: the process group
            total += int(fields[21]) * PAGE  # field 24: resident pages
    return total


def run_stage(name: str, project: Path, log: Path) -> dict:
    """The stage's command in its own process group; its peak RSS two ways, and its wall time."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", f"stages.{name}", "--params", "params.yaml"], cwd=project,
                                 env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], group_rss(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {child.returncode}); its output:\n{log.read_text()[-3000:]}")
    return {"peak_rss_mib_largest_process": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
            "peak_rss_mib_all_processes_sampled": round(peak[0] / 2**20, 1),
            "wall_seconds": round(time.perf_counter() - start, 1)}


def make_project(root: Path, source: Path, params: dict, corpus: Path | None) -> Path:
    """params.yaml and the synth grammar; data/corpus a link to `corpus` when given."""
    (root / "data").mkdir(parents=True)
    shutil.copy(source / "data" / "demo_grammar.yaml", root / "data" / "demo_grammar.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if corpus:
        (root / "data" / "corpus").symlink_to(corpus, target_is_directory=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."),
                        help="a project after `make demo`: its params.yaml and data/corpus are read")
    parser.add_argument("--synth-fraction", type=float, default=0.25,
                        help="share of the demo's utterances and speakers that synth makes (default 0.25)")
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for every stage, e.g. train.num_threads=1 (YAML value)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: every stage on a corpus synth makes at 2%% of the demo's size "
                             "(the demo corpus is not needed); figures are not the demo's")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/memory.json; "
                                                    "--quick: benchmarks/results/quick/memory.json)")
    args = parser.parse_args()
    if args.quick:
        args.synth_fraction = 0.02
    project = args.project_dir.resolve()
    params = yaml.safe_load((project / "params.yaml").read_text())
    demo_corpus = (project / "data" / "corpus").resolve()
    if not args.quick and not (demo_corpus / "metadata.csv").is_file():
        raise SystemExit(f"{demo_corpus}/metadata.csv not found: run `make demo` (or `dvc repro`) in {project} first")

    splits = {name: {k: max(1, round(v * args.synth_fraction)) for k, v in size.items()}
              for name, size in params["synth"]["splits"].items()}
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: yaml.safe_load(v) for k, v in overrides.items()}
    synth_params = with_dotted(params, {**overrides, "synth.splits": splits})
    # The rest reads the demo corpus (or, --quick, the small one); train keeps nothing between runs.
    pipeline_params = with_dotted(params, {**overrides, "train.epochs": args.train_epochs, "train.resume": False})

    work = Path(tempfile.mkdtemp(prefix="ctcflow-bench-memory-"))
    results: dict = {"stages": {}}
    try:
        synth_dir = make_project(work / "synth", project, synth_params, None)
        corpus = synth_dir / "data" / "corpus" if args.quick else demo_corpus
        main_dir = make_project(work / "pipeline", project, pipeline_params, corpus)
        notes = {
            "synth": f"{args.synth_fraction:.0%} of the demo's utterances and speakers: "
                     + ", ".join(f"{s} {v['utterances']}/{v['speakers']}" for s, v in splits.items()),
            "train": f"{args.train_epochs} epoch(s) of {params['train']['epochs']}",
        }
        if args.quick:
            notes["manifest"] = "--quick: every stage from here on reads synth's small corpus, not the demo's"
        print(f"{'stage':10s} {'largest process MiB':>20s} {'all processes MiB':>18s} {'wall s':>8s}", flush=True)
        for name in STAGES:
            figures = run_stage(name, synth_dir if name == "synth" else main_dir, work / f"{name}.log")
            figures["note"] = notes.get(name, "full")
            results["stages"][name] = figures
            print(f"{name:10s} {figures['peak_rss_mib_largest_process']:20,.0f} "
                  f"{figures['peak_rss_mib_all_processes_sampled']:18,.0f} {figures['wall_seconds']:8.1f}   "
                  f"{figures['note']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results.update({"corpus": "synth --quick corpus" if args.quick else "data/corpus of the project", "overrides": overrides,
                    "quick": args.quick, **machine()})
    print(f"({results['cpus']} CPUs, {results['memory_gib']} GiB, 1-minute load average "
          f"{results['load_average_1min_at_end']} at the end"
          + ("; --quick: a smoke test on a tiny corpus, not the demo's figures)" if args.quick else ")"))
    write_results(results_path("memory", args.quick, args.out), results)


if __name__ == "__main__":
    main()

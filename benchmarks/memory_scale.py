"""Benchmark: memory against corpus size, for featurize and for train's data loading.

Corpora of --hours hours of audio (2.5, 20 and 50 unless given) are made by listing the demo
corpus's files over and over through the `table` source: each copy of a row gets an id of its
own and keeps its split, text and speaker. For each size, in a scratch project whose data/corpus
is a link to the demo corpus (read, never written), with this repository's params.yaml:
  - the manifest stage runs (not measured),
  - featurize runs as its own process (`python -m stages.featurize`),
  - train's data loading runs as its own process: FeatureSplit of the training split, the
    length-bucketing sampler and a DataLoader over one epoch, as train builds them; no model.
At the --ddp-hours size (20 h unless given), two data-loading processes then run at once, ranks 0
and 1 of 2, each with its own FeatureSplit and the DistributedLengthBatchSampler, as two DDP
ranks on one node would.

Figures per process: RSS, the kernel's peak (wait4's ru_maxrss); the rest are peaks sampled
from /proc every 0.1 s:
  - anonymous RSS (RssAnon, /proc/PID/status): the process's own memory (Python, torch, the
    index, the token ids, batches), which it cannot give back;
  - shard RSS (/proc/PID/smaps): the pages of the memory-mapped shards it maps. They are the
    kernel's page cache: shared by every process that maps the same file, and dropped (to be
    read again) when memory runs short;
  - PSS (/proc/PID/smaps): RSS with each shared page divided by the number of processes that map
    it. The libraries' pages are shared with every other torch process on the machine, so on a
    busy machine this figure moves with them;
  - node total: what the measured processes hold together, each page once: their anonymous
    RSS, their shards' PSS (only they map the shards, so it adds up to the pages resident), and
    the other file pages (the libraries' code, the same files in each process) once.
How the issue's goals are judged: on RSS, as the issue states them ("within 1.2× of the 2.5-h
figure" against the smallest size run; "two DDP processes ≤ 1.4× one" as the two ranks' summed
RSS against one process's at the same size). FeatureSplit hands the pages it has read back to
the page cache as it goes, so RSS holds no more of the corpus than anonymous RSS does; the node
total shows what summed RSS counts twice (the libraries' pages).
Prints the figures and ratios; writes benchmarks/results/memory_scale.json. Not part of the test
suite. The scratch projects are deleted as it goes; the largest size needs about 3 GB of disk for
its features. Full run (about 15 minutes on an idle 2-core machine):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory_scale.py --project-dir .   # after `make demo` (or synth)
    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory_scale.py --project-dir . --quick   # 0.25 h and 1 h
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

# Nothing heavy is imported here: the kernel's peak RSS of a child counts this process's RSS at
# the moment it starts the child, so torch and pandas are imported only in the children.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root, for `stages` and `ctcflow` in the children
from common import machine, results_path, with_dotted, write_results  # noqa: E402

MIB = 2**20
FIGURES = ("rss_peak_mib", "anon_rss_peak_mib", "shard_rss_peak_mib", "pss_peak_mib")


def corpus_table(metadata: Path, hours: float, out: Path) -> None:
    """The demo corpus's rows, repeated until they hold `hours` of audio, as a `table` source file."""
    with metadata.open(newline="") as f:
        rows = list(csv.DictReader(f))
    seconds, copy = 0.0, 0
    with out.open("w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["id", "path", "text", "speaker", "split"])
        while seconds < hours * 3600:
            for row in rows:
                table.writerow([f"{row['id']}-copy{copy}", f"corpus/{row['path']}", row["text"], row["speaker"],
                                row["split"]])
                seconds += float(row["duration"])
                if seconds >= hours * 3600:
                    break
            copy += 1


def read_memory(pid: int, store: str) -> dict[str, int] | None:
    """Bytes of a process's memory by kind, from /proc/PID/status and /proc/PID/smaps; None once it is gone.
    anon: its own; shard_rss, shard_pss: the pages of the store's files it maps (only the measured
    processes map those, so their shard PSS adds up to the pages resident); other_file: every other
    file-backed page (the code of Python, torch and the other libraries); pss: all of it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        smaps = Path(f"/proc/{pid}/smaps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "RssAnon" not in fields:  # a zombie: its memory is gone
        return None
    kib = {"shard_rss": 0, "shard_pss": 0, "pss": 0}
    in_store = False
    for line in smaps.splitlines():
        name, _, value = line.partition(":")
        if "-" in line.split(maxsplit=1)[0]:  # a mapping's header: address range, ..., its file if any
            in_store = line.rstrip().endswith(".npy") and store in line
        elif name in ("Rss", "Pss"):
            size = int(value.split()[0])
            if name == "Pss":
                kib["pss"] += size
            if in_store:
                kib[f"shard_{name.lower()}"] += size
    anon, file = int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])
    return {k: v * 1024 for k, v in {**kib, "anon": anon, "other_file": file - kib["shard_rss"]}.items()}


def node_total(samples: list[dict[str, int]]) -> int:
    """What the processes hold together, each page counted once: each one's own memory, the shard
    pages (their PSS adds up to them), and the code pages once, since every process maps the same files."""
    return (sum(m["anon"] + m["shard_pss"] for m in samples)
            + max((m["other_file"] for m in samples), default=0))


class Memory:
    """Samples the memory of a set of processes every 0.1 s: each one's peaks, and the peak of their node total."""

    def __init__(self, pids: list[int], store: Path):
        self.pids, self.store = pids, os.path.realpath(store)
        self.peaks = {pid: {"anon": 0, "shard_rss": 0, "pss": 0} for pid in pids}
        self.node_peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.done.wait(0.1):
            now = {pid: read_memory(pid, self.store) for pid in self.pids}
            for pid, memory in now.items():
                if memory:
                    self.peaks[pid] = {k: max(v, memory[k]) for k, v in self.peaks[pid].items()}
            self.node_peak = max(self.node_peak, node_total([m for m in now.values() if m]))

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def run_processes(commands: list[list[str]], cwd: Path, log: Path) -> tuple[list[dict], float]:
    """The commands at once, each in its own process; each one's figures, and the peak of their node total in MiB."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    with log.open("w") as out:
        children = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT) for cmd in commands]
    memory = Memory([c.pid for c in children], cwd / "data" / "features")
    figures = []
    for child in children:
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        peaks = memory.peaks[child.pid]
        figures.append({"rss_peak_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
                        "anon_rss_peak_mib": round(peaks["anon"] / MIB, 1),
                        "shard_rss_peak_mib": round(peaks["shard_rss"] / MIB, 1),
                        "pss_peak_mib": round(peaks["pss"] / MIB, 1),
                        "wall_seconds": round(time.perf_counter() - start, 1)})
    memory.stop()
    if any(c.returncode for c in children):
        raise SystemExit(f"{' '.join(commands[0][:4])}… failed; its output:\n{log.read_text()[-3000:]}")
    return figures, round(memory.node_peak / MIB, 1)


def load_one_epoch(features: Path, rank: int, world_size: int) -> None:
    """The child: train's data loading over one epoch of the training split (no model)."""
    import torch
    from torch.utils.data import DataLoader

    from ctcflow.data import DistributedLengthBatchSampler, FeatureSplit, LengthBatchSampler, collate
    from ctcflow.params import load_section
    from ctcflow.text import Tokenizer
    from stages.train import TrainParams

    params = load_section("train", TrainParams, Path("params.yaml"))
    torch.set_num_threads(params.num_threads)
    split = FeatureSplit(features, "train", Tokenizer.load(features, blank=params.ctc.blank))
    if world_size > 1:
        sampler = DistributedLengthBatchSampler(split.num_frames, params.batch_frames, shuffle=True, seed=params.seed,
                                                rank=rank, world_size=world_size)
    else:
        sampler = LengthBatchSampler(split.num_frames, params.batch_frames, shuffle=True, seed=params.seed)
    frames = sum(int(batch.lengths.sum()) for batch in DataLoader(split, batch_sampler=sampler, collate_fn=collate))
    print(f"rank {rank} of {world_size}: {len(sampler)} batches, {frames:,} frames", flush=True)


def measure_size(hours: float, args: argparse.Namespace, params: dict, work: Path, ddp: bool) -> dict:
    """Manifest (not measured), featurize, the data loading and, with `ddp`, two ranks of it, at one size."""
    project = work / f"{hours:g}h"
    (project / "data").mkdir(parents=True)
    (project / "data" / "corpus").symlink_to(args.corpus, target_is_directory=True)
    corpus_table(args.corpus / "metadata.csv", hours, project / "data" / "table.csv")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    python = [sys.executable]
    run_processes([[*python, "-m", "stages.manifest", "--params", "params.yaml"]], project, work / "manifest.log")
    (featurize,), _ = run_processes([[*python, "-m", "stages.featurize", "--params", "params.yaml"]], project,
                                    work / "featurize.log")
    sizes = json.loads((project / "metrics" / "featurize.json").read_text())
    loader_cmd = [*python, str(Path(__file__).resolve()), "--load-epoch", "data/features"]
    (loader,), node_total = run_processes([loader_cmd], project, work / "loader.log")
    train_store = sum(p.stat().st_size for p in (project / "data/features/train").iterdir())
    result = {"hours_asked": hours,
              "audio_hours": round(sum(sizes[s]["hours"] for s in ("train", "valid", "test")), 2),
              "train_hours": sizes["train"]["hours"], "train_utterances": sizes["train"]["utterances"],
              "train_store_mib": round(train_store / MIB, 1),
              "featurize": featurize, "train_data_loading": {**loader, "node_total_peak_mib": node_total}}
    if ddp:
        ranks, node_total = run_processes([[*loader_cmd, "--rank", str(r), "--world-size", "2"] for r in (0, 1)],
                                          project, work / "ddp.log")
        result["two_ranks"] = {"ranks": ranks, "node_total_peak_mib": node_total,
                               **{f"sum_of_{figure}": round(sum(r[figure] for r in ranks), 1) for figure in FIGURES}}
    shutil.rmtree(project)
    return result


def print_size(size: dict) -> None:
    rows = [("featurize", size["featurize"]), ("train data loading", size["train_data_loading"])]
    rows += [(f"DDP rank {r} of 2", figures) for r, figures in enumerate(size.get("two_ranks", {}).get("ranks", []))]
    for name, f in rows:
        node_total = f"{f['node_total_peak_mib']:,.0f}" if "node_total_peak_mib" in f else "—"
        print(f"{size['audio_hours']:7.2f} h  {name:20s} {f['rss_peak_mib']:9,.0f} {f['anon_rss_peak_mib']:9,.0f} "
              f"{f['shard_rss_peak_mib']:9,.0f} {f['pss_peak_mib']:9,.0f} {node_total:>10s}", flush=True)
    if "two_ranks" in size:
        two = size["two_ranks"]
        print(f"{size['audio_hours']:7.2f} h  {'DDP, both ranks':20s} {two['sum_of_rss_peak_mib']:9,.0f} "
              f"{two['sum_of_anon_rss_peak_mib']:9,.0f} {two['sum_of_shard_rss_peak_mib']:9,.0f} "
              f"{two['sum_of_pss_peak_mib']:9,.0f} {two['node_total_peak_mib']:10,.0f}", flush=True)


def ratios(sizes: list[dict]) -> dict:
    """Each figure against the smallest size's; two ranks against one."""
    base = sizes[0]
    scale = {f"{step} at {s['audio_hours']} h / {base['audio_hours']} h":
             {figure: round(s[step][figure] / base[step][figure], 3) for figure in FIGURES if base[step][figure]}
             for s in sizes[1:] for step in ("featurize", "train_data_loading")}
    out: dict = {"scale": scale}
    goals = {"every size within 1.2x of the smallest (RSS)": all(r["rss_peak_mib"] <= 1.2 for r in scale.values())}
    for s in sizes:
        if "two_ranks" in s:
            one, two = s["train_data_loading"], s["two_ranks"]
            out["two_ranks_over_one"] = {
                "audio_hours": s["audio_hours"],
                "node_total": round(two["node_total_peak_mib"] / one["node_total_peak_mib"], 3),
                **{figure: round(two[f"sum_of_{figure}"] / one[figure], 3) for figure in FIGURES if one[figure]}}
            goals["two ranks at most 1.4x one (summed RSS)"] = out["two_ranks_over_one"]["rss_peak_mib"] <= 1.4
    out["goals_met"] = goals
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."),
                        help="a project after `make demo` (or its synth stage): its data/corpus is read")
    parser.add_argument("--hours", type=float, nargs="+", default=[2.5, 20, 50], help="corpus sizes, smallest first")
    parser.add_argument("--ddp-hours", type=float, default=None,
                        help="the size at which two ranks run (default: the one of --hours nearest 20)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. featurize.num_workers=2 (YAML value)")
    parser.add_argument("--quick", action="store_true", help="0.25 h and 1 h: a smoke test, not the issue's sizes")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/memory_scale.json; "
                                                    "--quick: benchmarks/results/quick/memory_scale.json)")
    parser.add_argument("--load-epoch", type=Path, help=argparse.SUPPRESS)  # the child's mode: a feature store
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_epoch:
        return load_one_epoch(args.load_epoch, args.rank, args.world_size)
    if args.quick:
        args.hours = [0.25, 1.0]
    args.hours = sorted(args.hours)
    ddp_hours = args.ddp_hours if args.ddp_hours is not None else min(args.hours, key=lambda h: abs(h - 20))
    if ddp_hours not in args.hours:  # it was skipped without a word
        parser.error(f"--ddp-hours {ddp_hours:g} is none of --hours {' '.join(f'{h:g}' for h in args.hours)}")
    args.corpus = (args.project_dir / "data" / "corpus").resolve()
    if not (args.corpus / "metadata.csv").is_file():
        raise SystemExit(f"{args.corpus}/metadata.csv not found: run `make demo` (or `dvc repro synth`) first")

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    params = with_dotted(yaml.safe_load((REPO / "params.yaml").read_text()), {
        "manifest.source": "table", "manifest.corpus_dir": "data/corpus", "manifest.table": "data/table.csv",
        "manifest.columns": {"path": "path", "text": "text", "speaker": "speaker", "split": "split", "id": "id"},
        "manifest.test_sets": {}, **overrides})

    work = Path(tempfile.mkdtemp(prefix="ctcflow-bench-memory-scale-"))
    sizes = []
    print(f"peak MiB {'':12s} {'':9s} {'RSS':>9s} {'anon RSS':>9s} {'shards':>9s} {'PSS':>9s} {'node total':>10s}",
          flush=True)
    try:
        for hours in args.hours:
            sizes.append(measure_size(hours, args, params, work, ddp=hours == ddp_hours))
            print_size(sizes[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {"sizes": sizes, **ratios(sizes), "overrides": overrides, "quick": args.quick, **machine()}
    print(f"\nagainst the smallest size ({', '.join(FIGURES)}):")
    for name, r in results["scale"].items():
        print(f"  {name:45s} " + " ".join(f"{r[f]:5.2f}×" if f in r else "    —" for f in FIGURES))
    if "two_ranks_over_one" in results:
        two = results["two_ranks_over_one"]
        print(f"two DDP ranks over one at {two['audio_hours']} h: node total {two['node_total']:.2f}×; summed RSS "
              f"{two['rss_peak_mib']:.2f}× (shared pages twice), anonymous RSS {two['anon_rss_peak_mib']:.2f}× "
              f"(two torch processes), PSS {two['pss_peak_mib']:.2f}×")
    print("goals:", "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in results["goals_met"].items()))
    print(f"({results['cpus']} CPUs, {results['memory_gib']} GiB, 1-minute load average "
          f"{results['load_average_1min_at_end']} at the end"
          + ("; --quick: a smoke test, not the issue's sizes)" if args.quick else ")"))
    write_results(results_path("memory_scale", args.quick, args.out), results)


if __name__ == "__main__":
    main()

"""What the benchmarks share: the machine's description, CPU timing, the demo data they read, results files."""

from __future__ import annotations

import json
import os
import shutil
import platform
import resource
import time
from pathlib import Path

import yaml

RESULTS_DIR = Path(__file__).parent / "results"
# --quick runs are smoke tests: their figures go here, never over the real ones.
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"


def machine() -> dict:
    """The machine and software the figures were measured with; the load average says how busy it was."""
    import torch  # here, not above: benchmarks/memory.py must stay small while it starts the stages
    import torchaudio

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                      * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "torchaudio": torchaudio.__version__}


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (pool workers included)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds of fn()."""
    cpu_start, start = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu_start


def demo_paths(project: Path, *needed: str) -> dict[str, Path]:
    """The project's pipeline outputs a benchmark reads (never writes): data/corpus, data/manifests, data/features."""
    paths = {name: (project / "data" / name).resolve() for name in needed}
    missing = [str(p) for p in paths.values() if not p.is_dir()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found: run `make demo` (or `dvc repro`) in {project} first, "
                         "or point --project-dir at a project that has them")
    return paths


def results_path(name: str, quick: bool, out: str | None) -> Path:
    return Path(out) if out else (QUICK_RESULTS_DIR if quick else RESULTS_DIR) / f"{name}.json"


def write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by its relative path: what a stage wrote, to compare two runs byte for byte."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def subset_store(source: Path, target: Path, counts: dict[str, int], seed: int) -> None:
    """A feature store holding a seeded sample of each split (the same statistics and label unit)."""
    from ctcflow.data import SplitWriter, map_shards, read_index

    target.mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        index = read_index(source / split)
        keep = index.sample(n=count, random_state=seed).sort_index() if count < len(index) else index
        shards = [shard.frames for shard in map_shards(source / split, index)]
        with SplitWriter(target / split, shards[0].shape[1], shards[0].dtype, shard_bytes=64_000_000) as writer:
            for row in keep.itertuples():
                writer.add(row._asdict(), shards[row.shard][row.offset : row.offset + row.num_frames])
    for name in ("features.json", "tokens.json"):
        shutil.copy(source / name, target / name)


def with_dotted(base: dict, dotted: dict) -> dict:
    """A deep copy of params `base` with `{"train.epochs": 2, ...}` set, as `dvc exp run -S` would."""
    out = yaml.safe_load(yaml.safe_dump(base))
    for key, value in dotted.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out

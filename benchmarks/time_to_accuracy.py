"""Benchmark: test WER against wall-clock time, the default config against the original recipe's.

Each config trains with the train stage itself (`python -m stages.train`, in a scratch project
whose data/features is a link to the project's features, read only) for the same wall-clock
budget, --budget seconds, one config after the other; then the run is stopped. Everything the
stage does counts against the budget: starting up, loading features, the validation pass and
the checkpoints after each epoch. The stage writes models/last.pt after every epoch; each one is
kept (a hard link, so no copying) with the time it appeared. After both runs, outside the
budgets, every kept checkpoint is scored on the test split with greedy decoding.

  default: params.yaml's train section (bilstm),
  recipe:  the original notebook's settings on top of it: train.model.arch recipe (one
           unidirectional LSTM of 1024), blank_penalty.mode mean_logprob (weight as in
           params.yaml), clip_grad_norm 1.0, scheduler.enabled false (never stepped).
Same features, batches (batch_frames), learning rate, warm-up, SpecAugment and seed.

Prints each curve (seconds, epoch, validation WER, test WER) and the test WER each config had
reached when its budget ran out (its last epoch finished within the budget). Writes
benchmarks/results/time_to_accuracy.json and a plot, time_to_accuracy.png, beside it.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/time_to_accuracy.py --project-dir . --budget 240
    PYTHONPATH=$PWD .venv/bin/python benchmarks/time_to_accuracy.py --project-dir . --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root, for `stages` and `ctcflow`
from common import demo_paths, machine, results_path, subset_store, with_dotted, write_results  # noqa: E402

RECIPE = {"train.model.arch": "recipe", "train.model.hidden_size": 1024, "train.model.num_layers": 1,
          "train.blank_penalty.mode": "mean_logprob", "train.clip_grad_norm": 1.0, "train.scheduler.enabled": False}


def train_for(budget: float, params: dict, features: Path, root: Path, name: str) -> list[dict]:
    """The stage under `params` for `budget` seconds; every epoch's checkpoint with its time."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "features").symlink_to(features, target_is_directory=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    kept = root / "kept"
    kept.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1"}
    last, seen, points = root / "models" / "last.pt", None, []
    start = time.perf_counter()
    with (root / "train.log").open("w") as log:
        child = subprocess.Popen([sys.executable, "-m", "stages.train", "--params", "params.yaml"], cwd=root, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while (elapsed := time.perf_counter() - start) < budget and child.poll() is None:
            try:
                stat = last.stat()
            except FileNotFoundError:
                stat = None
            # The stage replaces last.pt atomically: a new inode is a new epoch, and the link keeps it.
            if stat and (stat.st_ino, stat.st_mtime_ns) != seen:
                seen = (stat.st_ino, stat.st_mtime_ns)
                path = kept / f"{len(points) + 1}.pt"
                os.link(last, path)
                points.append({"seconds": round(elapsed, 1), "checkpoint": path})
                print(f"  {name}: epoch {len(points)} done at {elapsed:.1f} s", flush=True)
            time.sleep(0.2)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)  # its own process group: the stage and anything it started
        child.wait()
    if child.returncode not in (0, -signal.SIGTERM):
        raise SystemExit(f"{name}: the train stage failed (exit {child.returncode}):\n"
                         f"{(root / 'train.log').read_text()[-3000:]}")
    print(f"  {name}: stopped at {time.perf_counter() - start:.0f} s, {len(points)} epoch(s) within the budget",
          flush=True)
    return points


def score(points: list[dict], features: Path, num_threads: int) -> None:
    """Greedy test WER (and the stage's validation WER) of each kept checkpoint, in place."""
    import torch

    from ctcflow.checkpoint import load_checkpoint, model_from_checkpoint
    from ctcflow.data import FeatureSplit
    from ctcflow.inference import decode_split
    from ctcflow.losses import CTCObjective
    from ctcflow.metrics import error_rates

    torch.set_num_threads(num_threads)
    split = None
    for point in points:
        checkpoint = load_checkpoint(point.pop("checkpoint"))
        model, tokenizer = model_from_checkpoint(checkpoint)
        split = split or FeatureSplit(features, "test", tokenizer)
        objective = CTCObjective.plain(tokenizer.blank)
        result = decode_split(model, split, tokenizer, objective, batch_frames=40000)
        point.update(epoch=checkpoint["epoch"], valid_wer=round(checkpoint["valid_wer"], 4),
                     test_wer=round(error_rates(split.index["text_normalized"].tolist(), result.hypotheses)["wer"], 4))


def plot(curves: dict[str, list[dict]], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([p["seconds"] for p in points], [100 * p["test_wer"] for p in points], marker="o", label=name)
    ax.axvline(budget, color="grey", linestyle=":", label="budget")
    ax.set(xlabel="wall-clock seconds (training, validation and checkpoints)", ylabel="test WER, greedy (%)",
           title="Time to accuracy, same features and budget", xlim=(0, budget * 1.02))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."),
                        help="a project after `make demo`: its data/features and params.yaml are read")
    parser.add_argument("--budget", type=float, default=240, help="wall-clock seconds per config (default 240)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for both configs, e.g. train.num_threads=1 (YAML value)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 400 training, 40 validation and 60 test utterances, 45 s per config")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/time_to_accuracy.json; "
                                                    "--quick: benchmarks/results/quick/time_to_accuracy.json)")
    args = parser.parse_args()
    if args.quick:
        args.budget = min(args.budget, 45)
    project = args.project_dir.resolve()
    features = demo_paths(project, "features")["features"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    # Epochs without end: the budget stops the run. Nothing is resumed from an earlier run.
    base = {**overrides, "train.epochs": 10_000, "train.resume": False, "train.early_stopping_patience": 0}
    configs = {"default": with_dotted(params, base), "recipe": with_dotted(params, {**base, **RECIPE})}

    work = Path(tempfile.mkdtemp(prefix="ctcflow-bench-tta-"))
    try:
        if args.quick:
            subset_store(features, work / "features", {"train": 400, "valid": 40, "test": 60}, seed=0)
            features = work / "features"
        curves = {}
        for name, config in configs.items():
            print(f"{name}: training for {args.budget:.0f} s", flush=True)
            curves[name] = train_for(args.budget, config, features, work / name, name)
        print("scoring the kept checkpoints on the test split (greedy, outside the budgets)", flush=True)
        for name, points in curves.items():
            score(points, features, configs[name]["train"]["num_threads"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {"budget_seconds": args.budget, "quick": args.quick, "overrides": overrides,
               "configs": {"default": "params.yaml train section", "recipe": RECIPE}, **machine(),
               "curves": curves,
               "test_wer_at_budget": {name: points[-1]["test_wer"] if points else None
                                      for name, points in curves.items()}}
    for name, points in curves.items():
        print(f"\n{name}: {'seconds':>8s} {'epoch':>6s} {'valid WER':>10s} {'test WER':>9s}")
        for p in points:
            print(f"{'':{len(name) + 1}s} {p['seconds']:8.0f} {p['epoch']:6d} {p['valid_wer']:10.2%} "
                  f"{p['test_wer']:9.2%}")
    print(f"\ntest WER at the {args.budget:.0f} s budget (the last epoch finished within it):")
    for name, wer in results["test_wer_at_budget"].items():
        print(f"  {name:8s} {'no epoch finished' if wer is None else f'{wer:.2%}'}")
    print(f"({results['cpus']} CPUs, 1-minute load average {results['load_average_1min_at_end']} at the end"
          + ("; --quick: a smoke test on a small sample, not the demo's figures)" if args.quick else ")"))
    out = results_path("time_to_accuracy", args.quick, args.out)
    write_results(out, results)
    plot(curves, args.budget, out.with_suffix(".png"))
    print(f"plot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

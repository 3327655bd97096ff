"""Benchmark: waveform augmentation on the fly, each epoch, against augmented copies made once by featurize.

On the fly (lhotse's way), DataLoader workers read every training utterance, augment it and
compute its log-mel again each epoch. This measures that work with the featurize stage's own
functions, on 1 core (one process, 1 torch thread), over a seeded sample of --utterances of the
project's training split, with params.yaml's featurize.augment settings, and scales it to the
whole split by audio duration:
  - read + log-mel (stages.featurize.extract): featurize's work per utterance, paid once,
  - read + augment + log-mel (stages.featurize.extract_copy): paid every epoch on the fly, and
    once per copy in featurize,
  - each effect alone at probability 1 (the rest off), over the first --breakdown-utterances of
    the sample: what the chain's cost is made of.
Against it: the train stage's epoch time on the same split, from the project's per-epoch
throughput (metrics/train/plots/metrics/audio_seconds_per_second.tsv): the fastest epoch and the
median one. With --stage, also the featurize stage itself on the whole project, with
augment.copies 0 and 1 (1 worker, 1 thread): its seconds per copy.
CPU seconds are given beside wall seconds: other work on the machine stretches wall time much
more than CPU time. Writes benchmarks/results/augment.json. Not part of the test suite.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/augment.py --project-dir .            # after `make demo`
    PYTHONPATH=$PWD .venv/bin/python benchmarks/augment.py --project-dir . --quick    # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `stages` and `ctcflow`
from common import demo_paths, machine, results_path, timed, write_results  # noqa: E402

from ctcflow.augment import NOISE_KINDS  # noqa: E402
from ctcflow.manifest import read_manifest  # noqa: E402
from ctcflow.params import load_section  # noqa: E402
from stages import featurize  # noqa: E402

THROUGHPUT = Path("metrics/train/plots/metrics/audio_seconds_per_second.tsv")


def with_augment(params: featurize.FeaturizeParams, **changes) -> featurize.FeaturizeParams:
    return params.model_copy(update={"augment": params.augment.model_copy(update=changes)})


def one_effect(params: featurize.FeaturizeParams, effect: str) -> featurize.FeaturizeParams:
    """Every effect off but `effect` (a noise kind for noise), which always happens; gain stays 0 dB."""
    augment = params.augment
    noise = effect in NOISE_KINDS
    return with_augment(params, speed=replace(augment.speed, enabled=effect == "speed"),
                        pitch=replace(augment.pitch, prob=float(effect == "pitch")),
                        reverb=replace(augment.reverb, prob=float(effect == "reverb")),
                        noise=replace(augment.noise, prob=float(noise), kinds=(effect,) if noise else augment.noise.kinds),
                        channel=replace(augment.channel, prob=float(effect == "channel")), gain_db=(0.0, 0.0))


def clean_loop(paths: list[str], params: featurize.FeaturizeParams) -> None:
    for path in paths:
        featurize.extract(path, params, precomputed=False, with_stats=False)


def augmented_loop(positions: list[int], originals: tuple[str, ...], params: featurize.FeaturizeParams) -> None:
    for position in positions:
        featurize.extract_copy(featurize.CopyJob(1, position, position), params, originals)


def epoch_seconds(project: Path, split_seconds: float) -> dict | None:
    """The train stage's epoch time on this split: fastest and median epoch, from its logged throughput."""
    path = project / THROUGHPUT
    if not path.is_file():
        return None
    rates = pd.read_csv(path, sep="\t")["audio_seconds_per_second"]
    return {"fastest": round(split_seconds / rates.max(), 1), "median": round(split_seconds / statistics.median(rates), 1),
            "epochs": len(rates)}


def run_stage(params: featurize.FeaturizeParams, project: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.chdir(project), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        featurize.run(params, out_dir=out / "features", metrics_file=out / "featurize.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."),
                        help="a project after `make demo`: its data/manifests, data/corpus, params.yaml and train "
                             "metrics are read")
    parser.add_argument("--utterances", type=int, default=400, help="training utterances timed (0 = all)")
    parser.add_argument("--breakdown-utterances", type=int, default=100, help="of them, timed per effect")
    parser.add_argument("--seed", type=int, default=0, help="for the sample of utterances")
    parser.add_argument("--stage", action="store_true", help="also run featurize with copies 0 and 1 (minutes)")
    parser.add_argument("--quick", action="store_true", help="40 utterances, 10 per effect: a smoke test")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/augment.json; "
                                                    "--quick: benchmarks/results/quick/augment.json)")
    args = parser.parse_args()
    if args.quick:
        args.utterances, args.breakdown_utterances = 40, 10
    project = args.project_dir.resolve()
    demo_paths(project, "manifests", "corpus")
    torch.set_num_threads(1)
    params = load_section("featurize", featurize.FeaturizeParams, project / "params.yaml")
    params = params.model_copy(update={"num_workers": 1, "num_threads": 1})

    train = read_manifest(project / "data/manifests/train.jsonl")
    originals = tuple(str(project / p) for p in train["audio_path"])
    sample = train.sample(n=min(args.utterances or len(train), len(train)), random_state=args.seed).sort_index()
    positions = sample.index.tolist()
    split_seconds, sample_seconds = float(train["duration"].sum()), float(sample["duration"].sum())
    for path in originals:  # into the page cache: babble reads any of them
        Path(path).read_bytes()
    print(f"{len(sample):,} of {len(train):,} training utterances, {sample_seconds / 3600:.2f} of "
          f"{split_seconds / 3600:.2f} audio hours, 1 torch thread", flush=True)

    def per_epoch(wall_cpu: tuple[float, float], seconds: float) -> dict:
        wall, cpu = wall_cpu
        return {"wall_s": round(wall / seconds * split_seconds, 2), "cpu_s": round(cpu / seconds * split_seconds, 2)}

    paths = [originals[p] for p in positions]
    clean = per_epoch(timed(lambda: clean_loop(paths, params)), sample_seconds)
    print(f"read + log-mel:           {clean['cpu_s']:7.1f} CPU s per epoch of the split", flush=True)
    on_the_fly = per_epoch(timed(lambda: augmented_loop(positions, originals, params)), sample_seconds)
    print(f"read + augment + log-mel: {on_the_fly['cpu_s']:7.1f} CPU s per epoch of the split", flush=True)

    breakdown_positions = positions[: args.breakdown_utterances]
    breakdown_seconds = float(train["duration"].iloc[breakdown_positions].sum())
    breakdown_paths = [originals[p] for p in breakdown_positions]
    floor = per_epoch(timed(lambda: clean_loop(breakdown_paths, params)), breakdown_seconds)
    effects = {}
    for effect in ["speed", "pitch", "reverb", *NOISE_KINDS, "channel"]:
        alone = per_epoch(timed(lambda: augmented_loop(breakdown_positions, originals, one_effect(params, effect))),
                          breakdown_seconds)
        effects[effect] = round(alone["cpu_s"] - floor["cpu_s"], 1)
        print(f"  {effect:8s} alone adds {effects[effect]:7.1f} CPU s per epoch", flush=True)

    stage = None
    if args.stage:
        work = Path(tempfile.mkdtemp(prefix="ctcflow-bench-augment-"))
        try:
            copies = {n: timed(lambda: run_stage(with_augment(params, copies=n), project, work / str(n))) for n in (0, 1)}
            written = json.loads((work / "1" / "featurize.json").read_text())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # Training time per epoch follows the frames it trains on.
        growth = written["train_augmented"]["frames"] / written["train"]["frames"]
        stage = {"copies_0": {"wall_s": round(copies[0][0], 1), "cpu_s": round(copies[0][1], 1)},
                 "copies_1": {"wall_s": round(copies[1][0], 1), "cpu_s": round(copies[1][1], 1)},
                 "per_copy": {"wall_s": round(copies[1][0] - copies[0][0], 1),
                              "cpu_s": round(copies[1][1] - copies[0][1], 1)},
                 "training_frames_added_per_copy": round(growth, 4)}
        print(f"featurize stage, 1 worker: {stage['per_copy']['wall_s']:.1f} s ({stage['per_copy']['cpu_s']:.1f} CPU s) "
              f"per copy of the training split; each copy adds {growth:.3f}× the clean training frames", flush=True)

    epoch = epoch_seconds(project, split_seconds)
    results = {"utterances": len(sample), "breakdown_utterances": len(breakdown_positions),
               "split_utterances": len(train), "split_audio_hours": round(split_seconds / 3600, 3), "quick": args.quick,
               **machine(), "augment": params.augment.model_dump(mode="json", exclude={"copies"}),
               "per_epoch_of_the_split": {"read + log-mel": clean, "read + augment + log-mel": on_the_fly},
               "augment_cpu_s_per_epoch_by_effect": effects, "featurize_stage": stage,
               "train_epoch_seconds": epoch}
    if epoch:
        print(f"train stage epoch on this split: {epoch['fastest']:.1f} s (fastest of {epoch['epochs']}), "
              f"{epoch['median']:.1f} s (median); on the fly adds {on_the_fly['cpu_s'] / epoch['fastest']:.1f}× "
              "the fastest epoch in CPU seconds, every epoch")
    print(f"({results['cpus']} CPUs, 1-minute load average {results['load_average_1min_at_end']} at the end"
          + ("; --quick: the figures are a smoke test, not a measurement)" if args.quick else ")"))
    write_results(results_path("augment", args.quick, args.out), results)


if __name__ == "__main__":
    main()

"""Benchmark: the train stage's training loop against a bare PyTorch loop over the same batches.

On a seeded sample of --utterances training utterances of the project's features (and a few
validation utterances, since the stage validates after each epoch), with the project's train
params, one epoch, in interleaved rounds, each figure the best of --rounds:
  - the stage: stages.train.run, everything included (data loader, SpecAugment, loss tally,
    non-finite checks, progress bar); its figure is the one the stage itself reports, over the
    training loop only (not loading, validation or checkpoints, which are timed apart); once for
    each of --loader-workers (train.loader_workers; with workers, their start is in the epoch)
    and each of --precisions (train.precision: fp32, or bf16 autocast),
  - the bare loop: the same model (same seed, so the same initial weights), the same batches
    built beforehand and held in memory, the same SpecAugment, loss, clipping, warm-up and
    AdamW, and nothing else: no logging, no metrics, no checks; once for each precision,
  - the data loader alone: the same epoch's batches from the stage's DataLoader, no training,
    for each of --loader-workers.
Prints input frames (real, unpadded) per second, the ratio of the stage to the bare loop, the
ratio of each precision's bare loop to fp32's (bf16 pays off only on a CPU with bf16
instructions, avx512_bf16 or AMX: the results say whether this one has them), and the data loader's
share of the stage's step time. Both loops (of one precision) draw the same random numbers in
the same order, so their weights after the epoch must match bit for bit, for any number of
loader workers: the script checks it, which shows they did the same work. Writes
benchmarks/results/train.json.

--profile instead runs the stage once under torch.profiler and cProfile and prints where the
time goes (operators, and Python functions).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/train.py --project-dir .        # after `make demo`; ~2 min
    PYTHONPATH=$PWD .venv/bin/python benchmarks/train.py --project-dir . --quick
    PYTHONPATH=$PWD .venv/bin/python benchmarks/train.py --project-dir . --profile --utterances 300
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `stages` and `ctcflow`
from common import demo_paths, machine, results_path, subset_store, write_results  # noqa: E402

from ctcflow.checkpoint import load_checkpoint  # noqa: E402
from ctcflow.data import FeatureSplit, LengthBatchSampler, collate, read_feature_info  # noqa: E402
from ctcflow.distributed import World  # noqa: E402
from ctcflow.features import spec_augment  # noqa: E402
from ctcflow.losses import CTCObjective  # noqa: E402
from ctcflow.model import build_model, count_parameters  # noqa: E402
from ctcflow.params import load_section  # noqa: E402
from ctcflow.text import Tokenizer  # noqa: E402
from stages import train  # noqa: E402


def run_stage(params: train.TrainParams, store: Path, work: Path) -> dict:
    """The stage, one epoch; its own figure for the training loop, and the whole run's wall time."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    # In the scratch folder: dvclive looks for a git/DVC repository around the working directory.
    with contextlib.chdir(work), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        metrics = train.run(params, features_dir=store, model_dir=work / "models", live_dir=work / "live",
                            resume_dir=work / "resume")
    info = read_feature_info(store)
    frame_seconds = info["logmel"]["hop_length"] / info["logmel"]["sample_rate"]
    return {"frames_per_second": metrics["audio_seconds_per_second"] / frame_seconds,
            "run_seconds": time.perf_counter() - start,
            "weights": load_checkpoint(work / "models" / "last.pt")["model"]}


def epoch_batches(params: train.TrainParams, train_set: FeatureSplit) -> DataLoader:
    """The stage's DataLoader for epoch 1: the same sampler, seed and collate."""
    sampler = LengthBatchSampler(train_set.num_frames, params.batch_frames, shuffle=True, seed=params.seed)
    sampler.set_epoch(1)
    return DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)


def run_bare(params: train.TrainParams, store: Path) -> dict:
    """The floor: the stage's computation per step over batches already in memory, nothing else."""
    precision = train.mixed_precision(params, World(0, 1, torch.device("cpu")))
    train.seed_everything(params.seed)  # the stage's random draws, in the stage's order
    torch.set_num_threads(params.num_threads)
    tokenizer = Tokenizer.load(store, blank=params.ctc.blank)
    train_set = FeatureSplit(store, "train", tokenizer)
    model = build_model(params.model.model_dump(), read_feature_info(store)["logmel"]["n_mels"], tokenizer.num_classes)
    objective = CTCObjective(tokenizer.blank, params.ctc.zero_infinity, params.blank_penalty.mode,
                             params.blank_penalty.weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    augment = spec_augment(**params.specaugment.model_dump(exclude={"enabled"}))
    max_norm = params.clip_grad_norm or float("inf")
    batches = list(epoch_batches(params, train_set))  # built before the clock starts
    frames = sum(int(b.lengths.sum()) for b in batches)
    padded = sum(b.feats.shape[0] * b.feats.shape[1] for b in batches)
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        feats = batch.feats
        if params.specaugment.enabled:
            feats = augment(feats.transpose(1, 2)).transpose(1, 2)
        with precision:
            log_probs, lengths = model(feats, batch.lengths)
            loss = objective(log_probs, lengths, batch.targets, batch.target_lengths).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if step < params.warmup_steps:
            for group in optimizer.param_groups:
                group["lr"] = params.lr * (step + 1) / params.warmup_steps
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"frames_per_second": frames / seconds, "seconds": seconds, "frames": frames, "padded_frames": padded,
            "batches": len(batches), "parameters": count_parameters(model), "weights": model.state_dict()}


def run_loader(params: train.TrainParams, store: Path) -> float:
    """Seconds the stage's DataLoader (train.loader_workers, their start included) takes to produce
    one epoch's batches."""
    torch.set_num_threads(params.num_threads)
    train_set = FeatureSplit(store, "train", Tokenizer.load(store, blank=params.ctc.blank))
    start = time.perf_counter()
    loader = train.make_loader(params, World(0, 1, torch.device(params.device)), train_set)
    loader.batch_sampler.set_epoch(1)
    for _ in loader:
        pass
    return time.perf_counter() - start


def profile_stage(params: train.TrainParams, store: Path, work: Path) -> None:
    """Where the stage's time goes: torch operators (self CPU time), then Python functions."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_stage(params, store, work / "torch-profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    profiler = cProfile.Profile()
    profiler.enable()
    run_stage(params, store, work / "cprofile")
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."),
                        help="a project after `make demo`: its data/features and params.yaml (train section) are read")
    parser.add_argument("--utterances", type=int, default=1200, help="training utterances in the epoch")
    parser.add_argument("--valid-utterances", type=int, default=40, help="validation utterances (the stage's "
                                                                         "per-epoch pass, outside the figure)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; each figure is the best")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads (default: train.num_threads of the project); on a machine shared with "
                             "other work, fewer threads than cores avoids the collapse that oversubscription causes")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2],
                        help="train.loader_workers values to run the stage with, each in every round")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="train.precision values to run the stage and the bare loop with, each in every round")
    parser.add_argument("--seed", type=int, default=0, help="for the sample of utterances")
    parser.add_argument("--quick", action="store_true", help="200 utterances, 1 round: a smoke test, figures are noise")
    parser.add_argument("--profile", action="store_true", help="profile the stage once instead of benchmarking")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/train.json; "
                                                    "--quick: benchmarks/results/quick/train.json)")
    args = parser.parse_args()
    if args.quick:
        args.utterances, args.valid_utterances, args.rounds = min(args.utterances, 200), 10, 1
    project = args.project_dir.resolve()
    features = demo_paths(project, "features")["features"]
    params = load_section("train", train.TrainParams, project / "params.yaml").model_copy(
        update={"epochs": 1, "resume": False, "early_stopping_patience": 0, "init_from": None, "nproc": 1,
                "device": "cpu", "precision": "fp32", "grad_accumulation": 1})
    if args.num_threads:
        params = params.model_copy(update={"num_threads": args.num_threads})

    work = Path(tempfile.mkdtemp(prefix="ctcflow-bench-train-"))
    try:
        store = work / "features"
        subset_store(features, store, {"train": args.utterances, "valid": args.valid_utterances}, args.seed)
        if args.profile:
            profile_stage(params, store, work)
            return
        variants = {f"{p}, {n} loader workers": params.model_copy(update={"precision": p, "loader_workers": n})
                    for p in args.precisions for n in args.loader_workers}
        best: dict[str, float] = {}
        same = True
        for round_ in range(1, args.rounds + 1):
            bares = {p: run_bare(params.model_copy(update={"precision": p}), store) for p in args.precisions}
            timings = {f"bare, {p}": bare["seconds"] for p, bare in bares.items()}
            for name, variant in variants.items():
                bare = bares[variant.precision]
                stage = run_stage(variant, store, work / "stage")
                timings |= {f"stage, {name}": bare["frames"] / stage["frames_per_second"],
                            f"stage run, {name}": stage["run_seconds"], f"loader, {name}": run_loader(variant, store)}
                same &= stage["weights"].keys() == bare["weights"].keys() and all(
                    torch.equal(stage["weights"][k], bare["weights"][k]) for k in bare["weights"])
            for name, value in timings.items():
                best[name] = min(best.get(name, value), value)
            print(f"  round {round_}: "
                  + "; ".join(f"bare loop, {p} {bare['frames_per_second']:,.0f} frames/s" for p, bare in bares.items())
                  + "; " + "; ".join(f"stage, {name} {bare['frames'] / timings[f'stage, {name}']:,.0f} frames/s, its "
                                     f"data loader alone {timings[f'loader, {name}']:.2f} s" for name in variants),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    frames = bare["frames"]

    def by_variant(figure) -> dict:
        return {name: figure(name) for name in variants}

    def bare_of(name: str) -> float:
        return best[f"bare, {variants[name].precision}"]

    results = {
        "model": {**params.model.model_dump(), "parameters": bare["parameters"]},
        "batch_frames": params.batch_frames, "num_threads": params.num_threads, "utterances": args.utterances,
        "batches": bare["batches"], "frames": frames, "padding_share": round(1 - frames / bare["padded_frames"], 3),
        "rounds": args.rounds, "quick": args.quick, **machine(), "native_bf16": train.native_bf16(torch.device("cpu")),
        "frames_per_second": {**{f"bare PyTorch loop, {p}": round(frames / best[f"bare, {p}"])
                                 for p in args.precisions},
                              **{f"stage training loop, {name}": round(frames / best[f"stage, {name}"])
                                 for name in variants}},
        "ratio_bare_to_fp32_bare": ({p: round(best["bare, fp32"] / best[f"bare, {p}"], 3) for p in args.precisions}
                                    if "fp32" in args.precisions else None),
        "ratio_stage_to_bare": by_variant(lambda name: round(bare_of(name) / best[f"stage, {name}"], 3)),
        "data_loader_seconds": by_variant(lambda name: round(best[f"loader, {name}"], 2)),
        "data_loader_share_of_step_time": by_variant(lambda name: round(best[f"loader, {name}"]
                                                                        / best[f"stage, {name}"], 3)),
        "stage_run_seconds_incl_loading_validation_checkpoints": by_variant(
            lambda name: round(best[f"stage run, {name}"], 1)),
        "weights_identical_after_the_epoch": same,
        "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    print(f"\nbest of {args.rounds}: {args.utterances} utterances, {bare['batches']} batches, {frames:,} frames "
          f"({results['padding_share']:.1%} of the padded batches is padding), model {params.model.arch} "
          f"{bare['parameters'] / 1e6:.2f} M parameters, {params.num_threads} torch threads; "
          f"bfloat16 {'native' if results['native_bf16'] else 'emulated'} on this CPU")
    for p in args.precisions:
        seconds = best[f"bare, {p}"]
        ratio = results["ratio_bare_to_fp32_bare"]
        print(f"{f'bare PyTorch loop, {p}':40s} {seconds:7.1f} s {frames / seconds:9,.0f} frames/s"
              + (f": {ratio[p]:.3f}× fp32's" if ratio and p != "fp32" else ""))
    for name in variants:
        seconds = best[f"stage, {name}"]
        print(f"{f'stage training loop, {name}':40s} {seconds:7.1f} s {frames / seconds:9,.0f} frames/s: "
              f"{results['ratio_stage_to_bare'][name]:.3f}× the bare loop; data loader alone "
              f"{results['data_loader_seconds'][name]:.2f} s = {results['data_loader_share_of_step_time'][name]:.1%} "
              f"of the stage's step time; whole stage run (loading, validation, checkpoints) "
              f"{best[f'stage run, {name}']:.1f} s")
    print(f"weights after the epoch: {'identical' if same else 'DIFFERENT'} (every stage run against the bare loop "
          f"of its precision)")
    print(f"({results['cpus']} CPUs, 1-minute load average {results['load_average_1min_at_end']} at the end"
          + ("; --quick: the figures are a smoke test, not a measurement)" if args.quick else ")"))
    write_results(results_path("train", args.quick, args.out), results)


if __name__ == "__main__":
    main()

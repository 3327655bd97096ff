"""Distributed data parallel on CPU (gloo): the sampler's shares, and 2 processes against 1."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from conftest import section
from ctcflow.checkpoint import load_checkpoint
from ctcflow.data import DistributedLengthBatchSampler, LengthBatchSampler
from ctcflow.distributed import World
from stages.train import TrainParams, loss_shares, run


def test_ranks_share_each_global_batch_and_run_the_same_number_of_steps():
    lengths = np.random.default_rng(0).integers(50, 400, size=203)
    single = LengthBatchSampler(lengths, 3000, shuffle=True, seed=5, min_batch=3)
    ranks = [DistributedLengthBatchSampler(lengths, 3000, shuffle=True, seed=5, rank=r, world_size=3) for r in range(3)]
    for epoch in (1, 2):
        single.set_epoch(epoch)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        assert len({len(sampler) for sampler in ranks}) == 1
        for i, batch in enumerate(single):
            shares = [sampler.batches[i] for sampler in ranks]
            assert sorted(u for share in shares for u in share) == sorted(batch)  # each utterance once
            assert all(shares) and ranks[0].global_sizes[i] == len(batch)
            # Every rank's padded size is at most a third of the global one, plus one utterance.
            padded = [max(lengths[share]) * len(share) for share in shares]
            assert max(padded) <= max(lengths[batch]) * (len(batch) // 3 + 1)


def test_every_rank_resumes_an_epoch_at_the_same_global_batch_with_its_loss_shares():
    lengths = np.random.default_rng(0).integers(50, 400, size=203)

    def ranks(start: int) -> list[DistributedLengthBatchSampler]:
        samplers = [DistributedLengthBatchSampler(lengths, 3000, shuffle=True, seed=5, rank=r, world_size=2)
                    for r in range(2)]
        for sampler in samplers:
            sampler.set_epoch(2, start=start)
        return samplers

    whole_epoch, resumed = ranks(0), ranks(4)
    for rank in range(2):
        world = World(rank, 2, torch.device("cpu"))
        assert list(resumed[rank]) == list(whole_epoch[rank])[4:] and len(resumed[rank]) == len(whole_epoch[rank]) - 4
        assert loss_shares(resumed[rank], world) == loss_shares(whole_epoch[rank], world)[4:]


def test_a_global_batch_holds_at_least_one_utterance_per_rank():
    # 5000 frames each: alone they fill the budget, yet each of the 2 ranks needs one.
    lengths = np.array([5000, 5000, 5000, 10, 20])
    batches = list(LengthBatchSampler(lengths, 1000, shuffle=False, min_batch=2))
    assert all(len(batch) >= 2 for batch in batches)
    assert sorted(i for b in batches for i in b) == list(range(5))


# No SpecAugment and no dropout: the two runs then draw no random numbers while training, and
# differ only in how the floating-point sums of the gradient are ordered.
SETTINGS = {"epochs": 2, "batch_frames": 3000, "num_threads": 1, "lr": 0.003, "specaugment": {"enabled": False},
            "model": {"dropout": 0.0}}


def train(features, root, **changes) -> tuple[pd.DataFrame, dict]:
    run(section("train", TrainParams, **{**SETTINGS, **changes}), features_dir=features, model_dir=root / "models",
        live_dir=root / "live", resume_dir=root / "checkpoints")
    series = {name: pd.read_csv(root / "live/plots/metrics" / f"{name}.tsv", sep="\t").set_index("step")[name.split("/")[-1]]
              for name in ("train/loss", "train/grad_norm", "valid/ctc_loss", "valid/loss")}
    return pd.DataFrame(series), load_checkpoint(root / "models/last.pt")


def test_two_processes_train_like_one_on_the_same_global_batches(tiny_pipeline, tmp_path):
    features = tiny_pipeline / "data/features"
    # The comparison needs the same global batches: a one-process batch of a single utterance
    # would be two in DDP (each rank needs one), so every batch here must hold two or more.
    lengths = pd.read_csv(features / "train/index.csv")["num_frames"].to_numpy()
    for epoch in (1, 2):
        sampler = LengthBatchSampler(lengths, SETTINGS["batch_frames"], shuffle=True, seed=section("train", TrainParams).seed)
        sampler.set_epoch(epoch)
        assert min(len(batch) for batch in sampler) >= 2
    one, one_checkpoint = train(features, tmp_path / "one")
    two, two_checkpoint = train(features, tmp_path / "two", nproc=2)

    # Same global batches, the gradient of the same mean loss: only the order of float32 sums
    # differs (each rank sums its half, then gloo adds the halves). Measured here: per-epoch
    # metrics within a relative 3.4e-6. Averaging the halves without weighting them by their
    # share of utterances gave 1.6e-3 by epoch 2, so rtol 1e-4 keeps a margin either side.
    pd.testing.assert_frame_equal(one, two, check_exact=False, rtol=1e-4)
    # Adam divides each gradient element by its own running scale, so an element whose gradient
    # is near 0 moves by a noise-driven part of one step: weights agree to a fraction of lr
    # (measured: 8e-5 at most, lr 3e-3, median 5e-8).
    for key, weights in one_checkpoint["model"].items():
        torch.testing.assert_close(two_checkpoint["model"][key], weights, rtol=0, atol=0.1 * SETTINGS["lr"])
    # Rank 0 alone wrote the metrics: every epoch once.
    assert two.index.tolist() == [1, 2]
    summary = json.loads((tmp_path / "two/live/metrics.json").read_text())
    assert summary["step"] == 2 and summary["run"]["nonfinite_steps"] == 0


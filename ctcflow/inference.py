"""Run a model over a whole feature split: losses, blank ratio and greedy transcripts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ctcflow.data import FeatureSplit, LengthBatchSampler, collate
from ctcflow.decoding import greedy_decode
from ctcflow.losses import CTCObjective, hard_blank_ratio
from ctcflow.text import Tokenizer


@dataclass
class SplitResult:
    hypotheses: list[str]  # in the split's index order
    loss: float  # total (CTC + penalty), mean over utterances
    ctc_loss: float
    blank_penalty: float
    blank_ratio: float  # share of real output frames whose argmax is blank (batch ratios, utterance-weighted)


@torch.no_grad()
def decode_split(model: torch.nn.Module, split: FeatureSplit, tokenizer: Tokenizer,
                 objective: CTCObjective, batch_frames: int) -> SplitResult:
    model.eval()
    loader = DataLoader(split, batch_sampler=LengthBatchSampler(split.num_frames, batch_frames, shuffle=False),
                        collate_fn=collate)
    hypotheses = [""] * len(split)
    sums = {"loss": 0.0, "ctc": 0.0, "penalty": 0.0, "blank": 0.0}
    for batch in loader:
        log_probs, lengths = model(batch.feats, batch.lengths)
        parts = objective(log_probs, lengths, batch.targets, batch.target_lengths)
        n = len(batch.indices)
        sums["loss"] += parts.total.item() * n
        sums["ctc"] += parts.ctc.item() * n
        sums["penalty"] += parts.penalty.item() * n
        sums["blank"] += hard_blank_ratio(log_probs, lengths, tokenizer.blank).item() * n
        for i, ids in zip(batch.indices, greedy_decode(log_probs, lengths, tokenizer.blank)):
            hypotheses[i] = tokenizer.decode(ids)
    n = len(split)
    return SplitResult(hypotheses, sums["loss"] / n, sums["ctc"] / n, sums["penalty"] / n, sums["blank"] / n)

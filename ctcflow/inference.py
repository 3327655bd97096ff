"""Run a model over a whole feature split: losses, blank ratio and greedy transcripts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from ctcflow.data import FeatureSplit, LengthBatchSampler, collate
from ctcflow.decoding import greedy_decode
from ctcflow.losses import CTCObjective, LossTally
from ctcflow.text import Tokenizer


@dataclass
class SplitResult:
    hypotheses: list[str]  # in the split's index order
    loss: float  # total (CTC + penalty), mean over utterances
    ctc_loss: float
    blank_penalty: float
    blank_ratio: float  # share of real output frames whose argmax is blank (batch ratios, utterance-weighted)
    decoded: dict[str, list[str]] = field(default_factory=dict)  # decoder name → transcripts, index order


@torch.no_grad()
def decode_split(model: torch.nn.Module, split: FeatureSplit, tokenizer: Tokenizer,
                 objective: CTCObjective, batch_frames: int,
                 decoders: dict[str, Callable[[torch.Tensor, torch.Tensor], list[str]]] | None = None) -> SplitResult:
    """`decoders` (name → (log_probs, lengths) → transcripts) also transcribe every batch,
    so several decoders share one pass of the model; their results land in `decoded`."""
    decoders = decoders or {}
    model.eval()
    loader = DataLoader(split, batch_sampler=LengthBatchSampler(split.num_frames, batch_frames, shuffle=False),
                        collate_fn=collate)
    hypotheses = [""] * len(split)
    tally = LossTally()
    decoded = {name: [""] * len(split) for name in decoders}
    device = next(model.parameters()).device
    for batch in loader:
        batch = batch.to(device)
        log_probs, lengths = model(batch.feats, batch.lengths)
        tally.add(objective(log_probs, lengths, batch.targets, batch.target_lengths), log_probs, lengths,
                  tokenizer.blank)
        for i, ids in zip(batch.indices, greedy_decode(log_probs, lengths, tokenizer.blank)):
            hypotheses[i] = tokenizer.decode(ids)
        for name, decode in decoders.items():
            for i, text in zip(batch.indices, decode(log_probs, lengths)):
                decoded[name][i] = text
    return SplitResult(hypotheses, **tally.means(), decoded=decoded)

"""Run a model over a whole feature split: losses, blank ratio and transcripts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ctcflow.data import FeatureSplit, LengthBatchSampler, collate
from ctcflow.decoding import GreedyDecoder
from ctcflow.losses import CTCObjective, LossTally
from ctcflow.text import Tokenizer

Decoder = Callable[[torch.Tensor, torch.Tensor], list[str]]  # (log_probs, lengths) → transcripts


@dataclass
class SplitResult:
    loss: float  # total (CTC + penalty), mean over utterances
    ctc_loss: float
    blank_penalty: float
    blank_ratio: float  # share of real output frames whose argmax is blank (batch ratios, utterance-weighted)
    decoded: dict[str, list[str]]  # decoder name → transcripts, in the split's index order

    @property
    def hypotheses(self) -> list[str]:
        """The greedy (best-path) transcripts."""
        return self.decoded["greedy"]


@torch.no_grad()
def decode_split(model: torch.nn.Module, split: FeatureSplit, tokenizer: Tokenizer, objective: CTCObjective,
                 batch_frames: int, decoders: dict[str, Decoder] | None = None) -> SplitResult:
    """Every decoder transcribes every batch, so several decoders share one pass of the model.
    Without `decoders`: greedy decoding without a blank penalty, under the name "greedy"."""
    decoders = decoders or {"greedy": GreedyDecoder(tokenizer, blank_penalty=0.0)}
    model.eval()
    loader = DataLoader(split, batch_sampler=LengthBatchSampler(split.num_frames, batch_frames, shuffle=False),
                        collate_fn=collate)
    tally = LossTally()
    decoded = {name: [""] * len(split) for name in decoders}
    device = next(model.parameters()).device
    for batch in loader:
        batch = batch.to(device)
        log_probs, lengths = model(batch.feats, batch.lengths)
        tally.add(objective(log_probs, lengths, batch.targets, batch.target_lengths), log_probs, lengths,
                  tokenizer.blank)
        for name, decode in decoders.items():
            for i, text in zip(batch.indices, decode(log_probs, lengths)):
                decoded[name][i] = text
    return SplitResult(**tally.means(), decoded=decoded)

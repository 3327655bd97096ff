"""Greedy (best-path) CTC decoding."""

from __future__ import annotations

import torch


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best path per utterance: argmax per frame, merge repeats, drop blanks.

    log_probs: (batch, frames, classes); lengths: valid frames per utterance.
    """
    best = log_probs.argmax(dim=-1).cpu()
    hypotheses = []
    for path, length in zip(best, lengths.tolist()):
        merged = torch.unique_consecutive(path[:length])
        hypotheses.append(merged[merged != blank].tolist())
    return hypotheses

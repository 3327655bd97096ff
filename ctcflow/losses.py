"""CTC loss plus the blank penalties of the original recipe and its fix note.

All penalties see log-probabilities shaped (batch, frames, classes) and only the
frames below each utterance's output length: padding never counts.

- none:          0.
- mean_logprob:  weight × mean log p(blank). The original formula. It is unbounded
                 below (log p → −∞), so a large weight can outweigh CTC itself.
- ratio:         weight × share of frames whose argmax is blank. The fix note's
                 formula. An argmax count is constant in the weights: it changes the
                 reported loss but adds no gradient, so it cannot change training.
- soft_ratio:    weight × mean p(blank): the expected share of blank frames, a
                 differentiable version of `ratio` bounded in [0, weight].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctcflow.data import frame_mask

BLANK_PENALTY_MODES = ("none", "mean_logprob", "ratio", "soft_ratio")


def hard_blank_ratio(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """Share of real frames whose most likely class is blank (no gradient)."""
    mask = frame_mask(lengths, log_probs.shape[1])
    is_blank = log_probs.detach().argmax(dim=-1) == blank
    return (is_blank & mask).sum() / mask.sum().clamp_min(1)


def blank_penalty(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank: int, mode: str, weight: float
) -> torch.Tensor:
    if mode not in BLANK_PENALTY_MODES:
        raise ValueError(f"unknown blank penalty mode {mode!r}; choose one of {BLANK_PENALTY_MODES}")
    if mode == "none":
        return log_probs.new_zeros(())
    if mode == "ratio":
        return weight * hard_blank_ratio(log_probs, lengths, blank)
    mask = frame_mask(lengths, log_probs.shape[1])
    blank_log_probs = log_probs[..., blank][mask]
    if mode == "mean_logprob":
        return weight * blank_log_probs.mean()
    return weight * blank_log_probs.exp().mean()  # soft_ratio


@dataclass
class LossParts:
    total: torch.Tensor
    ctc: torch.Tensor
    penalty: torch.Tensor


class CTCObjective(torch.nn.Module):
    """torch.nn.CTCLoss (mean over the batch, per target length) + a blank penalty."""

    def __init__(self, blank: int, zero_infinity: bool, penalty_mode: str, penalty_weight: float):
        super().__init__()
        if penalty_mode not in BLANK_PENALTY_MODES:
            raise ValueError(f"unknown blank penalty mode {penalty_mode!r}; choose one of {BLANK_PENALTY_MODES}")
        self.blank = blank
        self.ctc = torch.nn.CTCLoss(blank=blank, zero_infinity=zero_infinity)
        self.penalty_mode = penalty_mode
        self.penalty_weight = penalty_weight

    @classmethod
    def plain(cls, blank: int) -> CTCObjective:
        """CTC alone, for scoring a model whatever penalty trained it; an impossible alignment adds 0."""
        return cls(blank, zero_infinity=True, penalty_mode="none", penalty_weight=0.0)

    def forward(
        self,
        log_probs: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> LossParts:
        # CTCLoss wants (frames, batch, classes).
        ctc = self.ctc(log_probs.transpose(0, 1), targets, lengths, target_lengths)
        penalty = blank_penalty(log_probs, lengths, self.blank, self.penalty_mode, self.penalty_weight)
        return LossParts(total=ctc + penalty, ctc=ctc, penalty=penalty)


class LossTally:
    """Utterance-weighted means over batches of the loss parts and the hard blank ratio."""

    def __init__(self) -> None:
        self.utterances = 0
        self.sums = dict.fromkeys(("loss", "ctc_loss", "blank_penalty", "blank_ratio"), 0.0)

    def add(self, parts: LossParts, log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> None:
        n = len(lengths)
        self.utterances += n
        self.sums["loss"] += parts.total.item() * n
        self.sums["ctc_loss"] += parts.ctc.item() * n
        self.sums["blank_penalty"] += parts.penalty.item() * n
        self.sums["blank_ratio"] += hard_blank_ratio(log_probs, lengths, blank).item() * n

    def means(self) -> dict[str, float]:
        return {name: total / self.utterances for name, total in self.sums.items()}

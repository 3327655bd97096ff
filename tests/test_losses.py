import pytest
import torch

from ctcflow.losses import BLANK_PENALTY_MODES, CTCObjective, blank_penalty, hard_blank_ratio

BLANK = 4
LENGTHS = torch.tensor([5, 3])  # second utterance: frames 3 and 4 are padding


def logits_with_padding(junk: float) -> torch.Tensor:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 5)
    logits[1, 3:] = junk  # padded frames
    return logits.requires_grad_()


def real_blank_probs(logits):
    log_probs = logits.log_softmax(-1)
    return torch.cat([log_probs[0, :, BLANK], log_probs[1, :3, BLANK]])


@pytest.mark.parametrize("junk", [0.0, 50.0])
def test_mean_logprob_value_ignores_padding(junk):
    logits = logits_with_padding(junk)
    value = blank_penalty(logits.log_softmax(-1), LENGTHS, BLANK, "mean_logprob", weight=0.5)
    assert value.item() == pytest.approx(0.5 * real_blank_probs(logits).mean().item(), rel=1e-6)


@pytest.mark.parametrize("junk", [0.0, 50.0])
def test_soft_ratio_value_ignores_padding(junk):
    logits = logits_with_padding(junk)
    value = blank_penalty(logits.log_softmax(-1), LENGTHS, BLANK, "soft_ratio", weight=0.5)
    assert value.item() == pytest.approx(0.5 * real_blank_probs(logits).exp().mean().item(), rel=1e-6)
    assert 0.0 <= value.item() <= 0.5


def test_ratio_counts_argmax_blank_frames_of_real_frames_only():
    log_probs = torch.full((2, 5, 5), -5.0)
    log_probs[0, [0, 1], BLANK] = 0.0  # 2 of 5 real frames blank
    log_probs[0, [2, 3, 4], 1] = 0.0
    log_probs[1, [0], BLANK] = 0.0  # 1 of 3 real frames blank
    log_probs[1, [1, 2], 2] = 0.0
    log_probs[1, [3, 4], BLANK] = 0.0  # padding: must not count
    assert hard_blank_ratio(log_probs, LENGTHS, BLANK).item() == pytest.approx(3 / 8)
    assert blank_penalty(log_probs, LENGTHS, BLANK, "ratio", 0.5).item() == pytest.approx(0.5 * 3 / 8)


@pytest.mark.parametrize("mode", ["mean_logprob", "soft_ratio"])
def test_differentiable_penalties_push_blank_down_on_real_frames_only(mode):
    logits = logits_with_padding(1.0)
    blank_penalty(logits.log_softmax(-1), LENGTHS, BLANK, mode, weight=1.0).backward()
    grad = logits.grad
    assert torch.all(grad[1, 3:] == 0), "padded frames must get no gradient"
    # Gradient descent lowers the blank logit on every real frame.
    assert torch.all(grad[0, :, BLANK] > 0) and torch.all(grad[1, :3, BLANK] > 0)


@pytest.mark.parametrize("mode", ["none", "ratio"])
def test_none_and_ratio_contribute_no_gradient(mode):
    logits = logits_with_padding(1.0)
    penalty = blank_penalty(logits.log_softmax(-1), LENGTHS, BLANK, mode, weight=0.5)
    assert not penalty.requires_grad


def test_ratio_adds_to_the_loss_but_not_to_the_gradient():
    """The fix note's penalty: the reported total changes, the update does not."""
    targets, target_lengths = torch.tensor([1, 2, 3, 1]), torch.tensor([3, 1])
    results = {}
    for mode in ("none", "ratio"):
        logits = logits_with_padding(1.0)
        objective = CTCObjective(BLANK, zero_infinity=True, penalty_mode=mode, penalty_weight=0.5)
        parts = objective(logits.log_softmax(-1), LENGTHS, targets, target_lengths)
        parts.total.backward()
        results[mode] = (parts, logits.grad.clone())
    none_parts, none_grad = results["none"]
    ratio_parts, ratio_grad = results["ratio"]
    assert ratio_parts.ctc.item() == pytest.approx(none_parts.ctc.item())
    assert ratio_parts.penalty.item() > 0
    assert ratio_parts.total.item() == pytest.approx(ratio_parts.ctc.item() + ratio_parts.penalty.item())
    assert torch.equal(ratio_grad, none_grad)


def test_ratio_mode_trains_exactly_like_no_penalty():
    def train(mode):
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 5)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        objective = CTCObjective(BLANK, True, mode, 0.5)
        x = torch.randn(2, 5, 3)
        for _ in range(5):
            parts = objective(model(x).log_softmax(-1), LENGTHS, torch.tensor([1, 2, 3, 1]), torch.tensor([3, 1]))
            opt.zero_grad()
            parts.total.backward()
            opt.step()
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(train("ratio"), train("none"))
    assert not torch.equal(train("soft_ratio"), train("none"))


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown blank penalty mode 'argmax'"):
        CTCObjective(BLANK, True, "argmax", 0.5)
    assert set(BLANK_PENALTY_MODES) == {"none", "mean_logprob", "ratio", "soft_ratio"}

import pytest
import torch

from conftest import tiny_params
from ctcflow.losses import CTCObjective
from ctcflow.model import ARCHITECTURES, build_model

SMALL = {**tiny_params()["train"]["model"], "num_layers": 2,  # hidden_size and conv_channels 32
         "model_dim": 32, "blocks": 2, "ffn_size": 64}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_lengths_match_valid_frames(arch):
    torch.manual_seed(0)
    model = build_model({**SMALL, "arch": arch}, n_mels=16, num_classes=29).eval()
    feats, lengths = torch.randn(3, 120, 16), torch.tensor([120, 80, 41])
    feats[1, 80:] = 0  # zero padding, as collate() makes it
    feats[2, 41:] = 0
    log_probs, out_lengths = model(feats, lengths)
    assert log_probs.shape[0] == 3 and log_probs.shape[2] == 29
    assert out_lengths.max() == log_probs.shape[1]
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]), atol=1e-5)
    # Padding must not change what a shorter utterance's real frames produce.
    alone, alone_len = model(feats[2:, :41], lengths[2:])
    assert torch.allclose(alone[0, : alone_len[0]], log_probs[2, : out_lengths[2]], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_few_steps_lower_the_ctc_loss(arch):
    torch.manual_seed(0)
    model = build_model({**SMALL, "arch": arch, "dropout": 0.0}, n_mels=16, num_classes=29)
    objective = CTCObjective.plain(28)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    feats, lengths = torch.randn(2, 100, 16), torch.tensor([100, 90])
    targets, target_lengths = torch.tensor([2, 3, 4, 5, 6, 7]), torch.tensor([4, 2])
    losses = []
    for _ in range(15):
        log_probs, out_lengths = model(feats, lengths)
        loss = objective(log_probs, out_lengths, targets, target_lengths).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown model architecture 'gru'"):
        build_model({"arch": "gru"}, 16, 29)

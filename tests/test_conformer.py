import math

import pytest
import torch

from conftest import section, tiny_params
from ctcflow.checkpoint import CheckpointError, check_compatible, load_checkpoint, model_from_checkpoint
from ctcflow.losses import CTCObjective
from ctcflow.model import build_model, rotary_angles, rotate
from ctcflow.text import Tokenizer
from stages.train import TrainParams, run

SMALL = {**tiny_params()["train"]["model"], "arch": "conformer", "model_dim": 32, "blocks": 2,
         "attention_heads": 4, "ffn_size": 64, "conv_kernel": 5, "subsample": 3}
N_MELS = 16


def small_conformer(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model({**SMALL, **overrides}, n_mels=N_MELS, num_classes=29)


def padded(*utterances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as collate() makes it: zero padding after each utterance."""
    return (torch.nn.utils.rnn.pad_sequence(utterances, batch_first=True),
            torch.tensor([len(u) for u in utterances]))


def test_output_frames_are_the_input_frames_divided_by_the_stride_rounded_up():
    log_probs, out_lengths = small_conformer().eval()(*padded(*(torch.randn(n, N_MELS) for n in (300, 301, 7, 1))))
    assert out_lengths.tolist() == [100, 101, 3, 1]
    assert log_probs.shape == (4, 101, 29)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(4, 101), atol=1e-5)


def test_an_utterance_s_outputs_do_not_depend_on_the_rest_of_its_batch():
    model = small_conformer().eval()
    torch.manual_seed(1)
    utterance = torch.randn(95, N_MELS)  # 32 output frames: the depthwise kernel (5) reaches past its end
    alone, alone_lengths = model(*padded(utterance))
    batched, lengths = model(*padded(torch.randn(240, N_MELS), utterance, 10 * torch.randn(40, N_MELS)))
    assert alone_lengths.tolist() == [32] and lengths.tolist() == [80, 32, 14]
    assert (alone[0] - batched[1, :32]).abs().max() < 1e-5


def test_rotary_positions_turn_channel_pairs_by_frame_times_frequency():
    cos, sin = rotary_angles(frames=2, head_dim=4, device=torch.device("cpu"))
    # Frequencies 10000^(-0/4) = 1 and 10000^(-2/4) = 0.01, for channel pairs (0, 2) and (1, 3).
    assert torch.allclose(cos[1], torch.tensor([math.cos(1), math.cos(0.01), math.cos(1), math.cos(0.01)]))
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rotate(x, cos, sin), torch.tensor([[1.0, 0, 0, 0], [math.cos(1), 0, math.sin(1), 0]]))


def test_rotary_attention_scores_depend_only_on_the_distance_between_frames():
    cos, sin = rotary_angles(frames=20, head_dim=8, device=torch.device("cpu"))
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    def score(query_frame, key_frame):
        return (rotate(q, cos[query_frame], sin[query_frame]) @ rotate(k, cos[key_frame], sin[key_frame])).item()
    assert score(3, 7) == pytest.approx(score(13, 17), abs=1e-5)
    assert score(3, 7) != pytest.approx(score(3, 8), abs=1e-3)


def test_a_training_step_gives_a_finite_loss_and_a_gradient_to_every_weight():
    model = small_conformer(dropout=0.1).train()
    feats, lengths = padded(torch.randn(120, N_MELS), torch.randn(75, N_MELS))
    log_probs, out_lengths = model(feats, lengths)
    loss = CTCObjective.plain(28)(log_probs, out_lengths, torch.tensor([2, 3, 4, 5, 6]),
                                  torch.tensor([3, 2])).total
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_a_conformer_checkpoint_rebuilds_and_names_what_differs():
    model = small_conformer().eval()
    tokenizer = Tokenizer("' abcdefghijklmnopqrstuvwxyz", 28, "char")
    checkpoint = {"model_config": SMALL, "tokenizer": tokenizer.to_dict(), "n_mels": N_MELS,
                  "model": model.state_dict()}
    check_compatible(checkpoint, {**SMALL, "dropout": 0.3, "hidden_size": 7}, tokenizer, N_MELS, "x")  # not shape keys
    with pytest.raises(CheckpointError, match=r"x: cannot load weights into this model \(attention_heads: 4 there, "
                                              r"2 here, conv_kernel: 5 there, 7 here\)"):
        check_compatible(checkpoint, {**SMALL, "attention_heads": 2, "conv_kernel": 7}, tokenizer, N_MELS, "x")
    rebuilt, _ = model_from_checkpoint(checkpoint)
    feats, lengths = padded(torch.randn(50, N_MELS))
    assert torch.equal(rebuilt(feats, lengths)[0], model(feats, lengths)[0])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"attention_heads": 3}, "model_dim 32 must split into 3 heads of even width"),
    ({"attention_heads": 32}, "model_dim 32 must split into 32 heads of even width"),
    ({"conv_kernel": 4}, "conv_kernel 4 must be odd"),
])
def test_sizes_the_blocks_cannot_take_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_conformer(**overrides)


def test_the_train_stage_trains_the_params_yaml_conformer_and_saves_a_checkpoint_that_rebuilds(tiny_pipeline, tmp_path):
    params = section("train", TrainParams, model={"arch": "conformer", "blocks": 1}, batch_frames=20000)
    metrics = run(params, features_dir=tiny_pipeline / "data/features", model_dir=tmp_path / "models",
                  live_dir=tmp_path / "live", resume_dir=tmp_path / "checkpoints")
    checkpoint = load_checkpoint(tmp_path / "models/best.pt")
    assert checkpoint["model_config"] == params.model.model_dump()
    model, _ = model_from_checkpoint(checkpoint)
    assert model.blocks[0].attention.qkv.weight.shape == (3 * 144, 144)  # params.yaml's model_dim
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["valid/ctc_loss"])

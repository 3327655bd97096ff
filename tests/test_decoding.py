import torch

from ctcflow.decoding import greedy_decode

B = 9  # blank index


def one_hot_log_probs(paths: list[list[int]], classes: int = 10) -> torch.Tensor:
    frames = max(len(p) for p in paths)
    out = torch.full((len(paths), frames, classes), -10.0)
    for b, path in enumerate(paths):
        for t, c in enumerate(path):
            out[b, t, c] = 0.0
    return out


def test_merges_repeats_and_drops_blanks():
    log_probs = one_hot_log_probs([[1, 1, B, 1, 2, 2, B, B, 3]])
    assert greedy_decode(log_probs, torch.tensor([9]), blank=B) == [[1, 1, 2, 3]]


def test_all_blank_gives_empty_hypothesis():
    assert greedy_decode(one_hot_log_probs([[B, B, B]]), torch.tensor([3]), blank=B) == [[]]


def test_padding_frames_are_ignored():
    # Frames past each utterance's length hold junk that must not be decoded.
    log_probs = one_hot_log_probs([[4, B, 5, 6, 6], [7, 7, 8, 1, 2]])
    assert greedy_decode(log_probs, torch.tensor([3, 3]), blank=B) == [[4, 5], [7, 8]]


def test_blank_at_index_zero():
    log_probs = one_hot_log_probs([[0, 3, 0, 3, 3, 0]])
    assert greedy_decode(log_probs, torch.tensor([6]), blank=0) == [[3, 3]]

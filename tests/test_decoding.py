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


# ---- decode-time blank penalty and word timing (real decoders, constructed log-probabilities)

from conftest import frame_log_probs, tiny_tokenizer  # noqa: E402
from ctcflow.decoding import BeamSearchDecoder, GreedyDecoder, align_words, penalize_blank  # noqa: E402

TOKENIZER = tiny_tokenizer()  # ' = 0, space = 1, a–z = 2…27, blank = 28


def frames(*columns: dict[str, float]) -> torch.Tensor:
    return frame_log_probs(TOKENIZER, *columns)


def lexicon_free_beam(tokenizer, blank_penalty: float) -> BeamSearchDecoder:
    return BeamSearchDecoder(tokenizer, beam_size=50, beam_threshold=25.0, lexicon=None, lm=None, lm_weight=0.0,
                             word_score=0.0, blank_penalty=blank_penalty)


def test_penalty_subtracts_from_blank_only():
    log_probs = torch.randn(2, 5, 29).log_softmax(-1)
    shifted = penalize_blank(log_probs, 28, 1.5)
    assert torch.allclose(shifted[..., 28], log_probs[..., 28] - 1.5)
    assert torch.equal(shifted[..., :28], log_probs[..., :28])
    assert penalize_blank(log_probs, 28, 0.0) is log_probs


def test_penalty_turns_a_narrowly_blank_frame_into_a_character():
    # "a", then a frame where blank beats "b" by 0.2 nats, then "c".
    log_probs = frames({"a": 0.9}, {"blank": 0.55, "b": 0.45}, {"c": 0.9})
    length = torch.tensor([3])
    for decoder in (GreedyDecoder, lexicon_free_beam):
        assert decoder(TOKENIZER, blank_penalty=0.0)(log_probs, length) == ["ac"]
        assert decoder(TOKENIZER, blank_penalty=0.5)(log_probs, length) == ["abc"]
        # A negative penalty favours blank: the confident characters stay, nothing is added.
        assert decoder(TOKENIZER, blank_penalty=-0.5)(log_probs, length) == ["ac"]


def test_penalty_moves_the_blank_share_the_expected_way():
    torch.manual_seed(0)
    log_probs = (torch.randn(4, 200, 29) * 2).log_softmax(-1)
    log_probs[..., 28] += 2.0  # blank-heavy, like a trained CTC model
    lengths = torch.tensor([200, 150, 100, 50])
    ratios, chars = [], []
    for penalty in (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0):
        greedy = GreedyDecoder(TOKENIZER, blank_penalty=penalty)
        texts = greedy(log_probs, lengths)
        ratios.append(greedy.blank_ratio)
        chars.append(sum(len(t.replace(" ", "")) for t in texts))
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1]
    assert chars[-1] > chars[2] > chars[0]


def test_words_are_timed_from_the_ctc_alignment():
    # "hi yo" at frames: h=0, blank, i=2-3, blank, space=5, y=6, blank, o=8, blank.
    log_probs = frames({"h": 0.9}, {"blank": 0.9}, {"i": 0.9}, {"i": 0.9}, {"blank": 0.9}, {" ": 0.9},
                       {"y": 0.9}, {"blank": 0.9}, {"o": 0.9}, {"blank": 0.9})[0]
    words = align_words(log_probs, "hi yo", TOKENIZER, frame_seconds=0.03, blank_penalty=0.0)
    assert [w.word for w in words] == ["hi", "yo"]
    assert [(round(w.start, 3), round(w.end, 3)) for w in words] == [(0.0, 0.12), (0.18, 0.27)]
    assert align_words(log_probs, "", TOKENIZER, 0.03, blank_penalty=0.0) == []

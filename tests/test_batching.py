import itertools

import numpy as np
import pytest
import torch

from ctcflow.data import LengthBatchSampler, collate, frame_mask


def test_batches_respect_the_frame_budget_and_cover_every_utterance_once():
    lengths = np.random.default_rng(0).integers(50, 400, size=200)
    sampler = LengthBatchSampler(lengths, max_frames=2000, shuffle=True, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(max(lengths[b]) * len(b) <= 2000 for b in batches)


def test_batches_group_similar_lengths():
    lengths = np.array([100] * 10 + [1000] * 10)
    batches = list(LengthBatchSampler(lengths, max_frames=2000, shuffle=False))
    assert all(len({lengths[i] for i in b}) == 1 for b in batches)


def test_shuffling_is_seeded_and_changes_with_the_epoch():
    lengths = np.random.default_rng(1).integers(50, 400, size=100)
    a, b = (LengthBatchSampler(lengths, 1500, shuffle=True, seed=7) for _ in range(2))
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_an_utterance_longer_than_the_budget_gets_a_batch_of_its_own():
    batches = list(LengthBatchSampler(np.array([10, 5000, 20, 30]), max_frames=1000, shuffle=False))
    assert sorted(batches) == [[0, 2, 3], [1]]


def test_an_epoch_set_to_start_at_a_batch_yields_the_batches_from_there():
    # In length order within 1,000 frames: 100, 200 and 300 (3 × 300 = 900), 400 and 500 (2 × 500),
    # then 600 alone.
    sampler = LengthBatchSampler(np.array([500, 100, 600, 300, 200, 400]), max_frames=1000, shuffle=False)
    assert list(sampler) == [[1, 4, 3], [5, 0], [2]]
    sampler.set_epoch(0, start=1)
    assert list(sampler) == [[5, 0], [2]] and len(sampler) == 2
    assert sampler.batches == [[1, 4, 3], [5, 0], [2]]  # the whole epoch
    sampler.set_epoch(0, start=3)
    assert list(sampler) == [] and len(sampler) == 0
    with pytest.raises(ValueError, match="cannot start epoch 0 at batch 4: it has 3 batches"):
        sampler.set_epoch(0, start=4)


def test_a_new_sampler_started_where_a_killed_one_stopped_neither_replays_nor_skips():
    lengths = np.random.default_rng(2).integers(50, 400, size=100)
    killed = LengthBatchSampler(lengths, 1500, shuffle=True, seed=7)
    killed.set_epoch(3)
    whole_epoch = list(killed)
    trained = list(itertools.islice(killed, 5))  # the batches trained on before the kill
    restarted = LengthBatchSampler(lengths, 1500, shuffle=True, seed=7)  # the resumed run's
    restarted.set_epoch(3, start=len(trained))
    assert trained + list(restarted) == whole_epoch and len(whole_epoch) > 5


def test_collate_pads_and_concatenates_targets():
    items = [(torch.ones(3, 2), torch.tensor([1, 2]), 0), (torch.ones(5, 2), torch.tensor([3]), 1)]
    batch = collate(items)
    assert batch.feats.shape == (2, 5, 2)
    assert batch.feats[0, 3:].abs().sum() == 0
    assert batch.lengths.tolist() == [3, 5]
    assert batch.targets.tolist() == [1, 2, 3] and batch.target_lengths.tolist() == [2, 1]
    assert batch.indices == [0, 1]


def test_frame_mask_marks_the_real_frames_of_a_padded_batch():
    assert frame_mask(torch.tensor([5, 3, 0]), 5).tolist() == [[True] * 5, [True, True, True, False, False],
                                                               [False] * 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_batch_is_pinned_and_copied_to_the_gpu_without_blocking():
    batch = collate([(torch.ones(3, 2), torch.tensor([1, 2]), 0), (torch.ones(5, 2), torch.tensor([3]), 1)])
    pinned = batch.pin_memory()  # what DataLoader(pin_memory=True) calls
    assert all(t.is_pinned() for t in pinned.tensors()) and pinned.indices == [0, 1]
    on_gpu = pinned.to(torch.device("cuda"), non_blocking=True)
    torch.cuda.synchronize()
    assert all(t.is_cuda and torch.equal(t.cpu(), u) for t, u in zip(on_gpu.tensors(), batch.tensors()))

"""The ordered map over worker processes that manifest and featurize share."""

import math
import os

import pytest

from ctcflow.workers import WorkerError, ordered_map


@pytest.mark.parametrize("workers", [1, 2])
def test_results_keep_the_order_of_the_items_across_calls(workers):
    with ordered_map(workers, "x.num_workers", "math", max_chunk=4) as map_files:
        assert list(map_files(math.isqrt, [n * n for n in range(50)])) == list(range(50))
        assert list(map_files(math.floor, [2.5, 0.5])) == [2, 0]  # the same pool serves a second call


def test_a_worker_that_dies_is_a_clear_error_not_a_hang():
    with pytest.raises(WorkerError, match=r"worker process of manifest.num_workers = 2 died .*manifest.num_workers: 1 "):
        with ordered_map(2, "manifest.num_workers", "os", max_chunk=1) as map_files:
            list(map_files(os._exit, [1, 1, 1, 1]))  # each call ends its process

"""An ordered map over files in worker processes, for the stages that read a whole corpus.

Processes, not threads: soundfile's header parsing and the Python around each file hold the GIL
for much of their work (two threads ran the manifest stage at 0.86× a plain loop,
benchmarks/manifest.py). The workers fork from a clean forkserver, never from the calling
process: forking a process that runs threads (torch's, a progress bar's, a test runner's) can
leave the child deadlocked on a lock one of them held. A ProcessPoolExecutor, not a
multiprocessing.Pool: when a worker dies (killed for memory, or failing to start), it raises
instead of waiting forever for the files that worker held.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ctcflow.errors import CtcflowError


class WorkerError(CtcflowError):
    """A worker process died."""


@contextlib.contextmanager
def ordered_map(num_workers: int, setting: str, preload: str, max_chunk: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()
                ) -> Iterator[Callable[[Callable, list], Iterable]]:
    """Yields `map(fn, items)`: the results in the order of `items`, from one pool of `num_workers`
    processes kept for every call, or a plain loop in this process for 1 worker.

    setting: the params key that set num_workers, named in the error when a worker dies.
    preload: the module that holds the mapped functions, imported once in the forkserver.
    max_chunk: the most items handed to a worker at once (fewer for heavy items, as each
    chunk's results are held until it is done).
    """
    if num_workers == 1:
        yield map
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([preload])
    pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=initializer, initargs=initargs)

    def ordered(fn: Callable, items: list) -> Iterator:
        try:
            yield from pool.map(fn, items, chunksize=max(1, min(max_chunk, len(items) // (4 * num_workers))))
        except BrokenProcessPool as err:
            raise WorkerError(f"a worker process of {setting} = {num_workers} died ({err}); {setting}: 1 runs "
                              "every file in the stage's own process and shows the error, and fewer workers "
                              "need less memory") from err

    try:
        yield ordered
    finally:
        pool.shutdown(cancel_futures=True)

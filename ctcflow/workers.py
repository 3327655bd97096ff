"""An ordered map over files in worker processes, for the stages that read a whole corpus.

Processes, not threads: soundfile's header parsing and the Python around each file hold the GIL
for much of their work (two threads ran the manifest stage at 0.86× a plain loop,
benchmarks/manifest.py). The workers fork from a clean forkserver, never from the calling
process: forking a process that runs threads (torch's, a progress bar's, a test runner's) can
leave the child deadlocked on a lock one of them held. A ProcessPoolExecutor, not a
multiprocessing.Pool: when a worker dies (killed for memory, or failing to start), it raises
instead of waiting forever for the files that worker held.

`dask_map` is the same map on a Dask cluster (several machines, or a local cluster). Its workers
run the project's own code: each must import it (the same checkout and environment on every
machine), and must run in the directory the stage runs in, since the manifests' paths are
relative to it.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

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
    # A module run with `python -m` is run again in each worker by multiprocessing itself (as
    # __mp_main__): preloading it as well would run it twice, and runpy warns.
    if preload != getattr(sys.modules["__main__"].__spec__, "name", None):
        context.set_forkserver_preload([preload])
    pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_ignore_sigint_then,
                               initargs=(initializer, *initargs))

    def ordered(fn: Callable, items: list) -> Iterator:
        # Not pool.map: it submits every chunk up front, a future each, and holds every result
        # the caller has not taken yet; a few chunks per worker in flight keep memory flat.
        size = max(1, min(max_chunk, len(items) // (4 * num_workers)))
        chunks = (items[start:start + size] for start in range(0, len(items), size))
        try:
            # submit() raises too once the pool is broken: a worker can die before the first chunks are all in.
            pending = deque(pool.submit(_apply, fn, chunk) for chunk in itertools.islice(chunks, 4 * num_workers))
            while pending:
                results = pending.popleft().result()
                pending.extend(pool.submit(_apply, fn, chunk) for chunk in itertools.islice(chunks, 1))
                yield from results
        except BrokenProcessPool as err:
            raise WorkerError(f"a worker process of {setting} = {num_workers} died ({err}); {setting}: 1 runs "
                              "every file in the stage's own process and shows the error, and fewer workers "
                              "need less memory") from err

    try:
        yield ordered
    except KeyboardInterrupt:
        # The workers ignore Ctrl-C (_ignore_sigint_then): end them rather than wait for the chunks
        # they run, so that the stage stops at once. The shutdown below then returns as soon as the
        # pool sees them gone; not shutdown(wait=False), whose pool thread races Python's exit
        # (an "Exception ignored ... OSError: handle is closed" traceback). _processes: Python 3.11
        # has no public terminate_workers (3.14 does).
        for worker in list(pool._processes.values()):
            worker.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


# A runtime knob from the environment, set by the flows' --dask-address: the scheduler featurize
# runs on, overriding featurize.executor and featurize.scheduler_address. Kept out of params.yaml,
# so it never lands in an experiment, a kept branch or the workspace (docs/orchestration.md).
DASK_SCHEDULER_ENV = "CTCFLOW_DASK_SCHEDULER"


@contextlib.contextmanager
def dask_map(address: str | None, num_workers: int, section: str, preload: str, max_chunk: int,
             initializer: Callable[..., None] | None = None, initargs: tuple = (),
             address_from: str | None = None) -> Iterator[Callable[[Callable, list], Iterable]]:
    """Yields `map(fn, items)` as ordered_map does, run on a Dask cluster: the scheduler at
    `address`, or with None a local cluster of `num_workers` processes on 127.0.0.1.

    section: the params section whose `executor`, `scheduler_address` and `num_workers` the errors
    name. preload: the module that holds the mapped functions; each worker imports it, checked up
    front. max_chunk: the most items in one Dask task (Dask's docs put a task's overhead near a
    millisecond, so each carries several files). initializer(*initargs) runs in the worker thread
    before each task. address_from: the environment variable the address came from, which the
    errors then name instead of the params.
    """
    # Imported here: the local executor never pays for loading Dask.
    from distributed import Client

    where = (f"{address_from} = {address}" if address_from else f"{section}.scheduler_address = {address}" if address
             else f"{section}.scheduler_address = null (a local Dask cluster of {section}.num_workers = {num_workers})")
    with contextlib.ExitStack() as stack:
        if address:
            try:
                # The wait is Dask's connect timeout (distributed.comm.timeouts.connect, 30 s; the
                # DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT environment variable sets it).
                client = stack.enter_context(Client(address))
            except OSError as err:
                instead = f"unset {address_from}" if address_from else f"set {section}.executor: local"
                raise WorkerError(f"{where}: no Dask scheduler answered ({err}); start one (`dask scheduler`) "
                                  f"or {instead}") from err
            if not client.nthreads():
                print(f"waiting for a Dask worker to join the scheduler at {address}", file=sys.stderr)
                client.wait_for_workers(1)
        else:
            cluster = local_cluster(num_workers)
            stack.callback(close_quietly, cluster)
            client = stack.enter_context(Client(cluster))
        check_same_code(client, preload, where)
        print(f"{section}: on the Dask cluster at {client.scheduler.address} ({len(client.nthreads())} workers)",
              file=sys.stderr)
        yield partial(_ordered_on_cluster, client, where, max_chunk, initializer, initargs)


def local_cluster(num_workers: int):
    """The Dask cluster that scheduler_address null starts: num_workers processes on 127.0.0.1."""
    import dask
    from distributed import LocalCluster

    # Dask's workers hand freed memory back to the system at once (MALLOC_TRIM_THRESHOLD_=65536),
    # so each array is mapped afresh: a worker's featurize compute took 1.7x as long. These keep
    # glibc's default, as the local executor's processes do.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        # One thread per process, like the local executor; the web page on a free port, so that
        # two runs at once do not compete for Dask's 8787.
        return LocalCluster(n_workers=num_workers, threads_per_worker=1, host="127.0.0.1",
                            dashboard_address="127.0.0.1:0")


def close_quietly(cluster) -> None:
    """Closes a local cluster. After workers died, the nanny may still be restarting one, and the
    close can fail on that process (AssertionError: can only join a started process); the error
    that ended the work is the one to show."""
    try:
        cluster.close()
    except Exception as err:  # noqa: BLE001 - any failure to close must not hide the stage's own error
        print(f"closing the local Dask cluster: {err!r}", file=sys.stderr)


def check_same_code(client, preload: str, where: str) -> None:
    """The scheduler unpickles the tasks and the workers run them: both must import the project's
    code from the same files as this process (the same checkout, at the same path), or a task fails
    on a function one of them lacks or, worse, runs other code."""
    def module_file() -> str:  # nested, so pickled by value: it runs even where the project differs
        return importlib.import_module(preload).__file__

    try:
        found = {"the Dask scheduler": client.run_on_scheduler(module_file),
                 **{f"the Dask worker at {worker}": file for worker, file in client.run(module_file).items()}}
    except ImportError as err:
        raise WorkerError(f"{where}: the Dask scheduler or a worker cannot import {preload} ({err}); run them in "
                          "the project's environment (the same checkout and virtualenv on every machine)") from err
    for name, file in found.items():
        if file != module_file():
            raise WorkerError(f"{where}: {name} imports {preload} from {file}, this process from {module_file()}; "
                              "run the scheduler and the workers from the same checkout")


def _ordered_on_cluster(client, where: str, max_chunk: int, initializer: Callable[..., None] | None,
                        initargs: tuple, fn: Callable, items: list) -> Iterator:
    """The results of fn over items in their order: chunks of items are Dask tasks, and only a few
    per worker thread are in flight at once, so the cluster never holds a whole split's results."""
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    threads = max(1, sum(client.nthreads().values()))
    size = max(1, min(max_chunk, len(items) // (4 * threads)))
    chunks = (items[start:start + size] for start in range(0, len(items), size))
    # fn goes to the cluster once (an augmented copy's function carries every training path), as a
    # task rather than scattered data: Dask recomputes a task whose worker died, not scattered data.
    shared_fn = client.submit(_same, fn, pure=False)
    submit = partial(client.submit, _run_chunk, shared_fn, where=where, directory=os.getcwd(),
                     initializer=initializer, initargs=initargs, pure=False)
    # A few chunks per worker thread: each worker has its next chunk at hand while this process
    # takes a result and sends another, and the workers hold few results.
    pending = deque(submit(chunk) for chunk in itertools.islice(chunks, 4 * threads))
    while pending:
        try:
            results = pending.popleft().result()
        except KilledWorker as err:
            raise WorkerError(f"{where}: Dask workers died running these tasks ({err}); the workers' logs say "
                              "why (too little memory is the usual cause)") from err
        except FutureCancelledError as err:  # the scheduler went away, or cancelled the tasks
            raise WorkerError(f"{where}: {err}") from err
        pending.extend(submit(chunk) for chunk in itertools.islice(chunks, 1))
        yield from results


def _same(value):
    return value


def _ignore_sigint_then(initializer: Callable[..., None] | None, *initargs) -> None:
    """A pool worker's start: Ctrl-C sends SIGINT to the whole foreground process group, and the
    stage's own process reports it in one line (stages/runner.py); a worker would add a
    KeyboardInterrupt traceback of its own (from waiting for a chunk). The stage ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def _apply(fn: Callable, items: list) -> list:
    return [fn(item) for item in items]


def _run_chunk(fn: Callable, items: list, where: str, directory: str, initializer: Callable[..., None] | None,
               initargs: tuple) -> list:
    if os.getcwd() != directory:
        raise WorkerError(f"{where}: a Dask worker runs in {os.getcwd()}, the stage in {directory}; the files' "
                          "paths are relative to the stage's directory: start the workers there")
    if initializer is not None:
        initializer(*initargs)
    return _apply(fn, items)

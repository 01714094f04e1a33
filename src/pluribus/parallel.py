"""Independent jobs at once, each in a spawned process with its share of the cores.

Tiny models use two cores poorly inside one process (one matmul is too small to split well), so
two jobs side by side, one core each, finish sooner than the same jobs one after the other. The
jobs are independent (each seeds itself), so results do not depend on `workers`.

A worker dies with its parent: a `kill -9` of the run must not leave orphans that go on writing
into stage folders a restarted run is about to resume.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Iterable


def run_all(fn: Callable[..., Any], jobs: Iterable[tuple], workers: int) -> list[Any]:
    """`[fn(*job) for job in jobs]`, `workers` at a time; in order of `jobs`, which is also the order
    they start in (put the longest first). A failed job fails the whole call once the others end."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(workers, len(jobs))
    cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1  # what the parent may use
    threads = max(1, cores // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`: `run_all(call, [(fn, *args), (other_fn, *other_args), ...])` runs jobs of different kinds in one
    pool (module-level functions: a spawned worker unpickles them by name)."""
    return fn(*args)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    keep_freed_memory()
    _die_with_parent()


def keep_freed_memory() -> None:
    """glibc: keep memory the process frees for its next allocations instead of handing it back to the kernel.

    A training step allocates and frees the same large activations step after step. By default glibc serves blocks
    above a (moving) threshold from fresh pages and returns freed ones, so each step pays page faults for the
    kernel to zero them again: up to ~5,000 faults and 10 ms of system time in a 50 ms teacher forward on the
    world's model, none once this is set. The heap stays at its high-water mark instead (as PyTorch's GPU
    caching allocator keeps its pool). Called by the CLI and every worker process; PLURIBUS_MALLOC=default
    leaves glibc as it is. Where there is no glibc, nothing."""
    if os.environ.get("PLURIBUS_MALLOC") == "default":
        return
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # free space at the heap's top kept up to 1 GiB
    # Blocks under 32 MiB (activations of small models) come from the heap and stay; larger ones are mapped and
    # unmapped as glibc does by default: served from the heap they fragment it, and the chunked KL of the bench
    # (512 MiB chunks) peaked at 2.0 GiB instead of 1.15 above its inputs.
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    libc = _libc()
    if libc is None:
        return
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)

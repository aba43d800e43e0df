"""Busy background processes for a while: the artificial load `hybridnas bench latency --load N`
and the tests calibrate under.

Two kinds. ``cpu``: a pure-Python loop, one core each and a tiny working set, so what it takes
from a timed process is the core (waiting for it; the wall clock counts that, the CPU clock does
not). ``memory``: each process copies a buffer far larger than the caches back and forth, as a
training job streaming its activations does, so it also takes the shared last-level cache and
memory bandwidth, which slows every instruction of a timed process on either clock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from collections.abc import Iterator

KINDS = ("cpu", "memory")
MEMORY_BUFFER = 64 << 20  # bytes per process: beyond any last-level cache share on the machines we run on


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):  # die with the parent, however it dies (PR_SET_PDEATHSIG)
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _spin(deadline: float) -> None:
    _die_with_parent()
    while time.monotonic() < deadline:  # pure Python: one core, a tiny working set
        pass


def _stream(deadline: float) -> None:
    _die_with_parent()
    a, b = bytearray(MEMORY_BUFFER), bytearray(MEMORY_BUFFER)
    va, vb = memoryview(a), memoryview(b)
    while time.monotonic() < deadline:  # slice assignment is one memcpy: memory bound
        vb[:] = va
        va[:] = vb


@contextlib.contextmanager
def busy_load(n: int, seconds: float, kind: str = "cpu") -> Iterator[list]:
    """``n`` processes that each keep one core busy, for the duration of the block; ``kind``
    ``memory`` makes each also stream through memory (see the module docstring).

    Bounded three times: the block ends them all (terminate, then kill) when it exits, however it
    exits; on Linux each is killed when this process dies; and each ends by itself after ``seconds``.
    """
    if n < 0:
        raise ValueError(f"load must be >= 0 processes, got {n}")
    if kind not in KINDS:
        raise ValueError(f"load kind must be one of {', '.join(KINDS)}, got {kind!r}")
    target = _spin if kind == "cpu" else _stream
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    deadline = time.monotonic() + seconds  # CLOCK_MONOTONIC is system-wide: the children share it
    procs = [
        ctx.Process(target=target, args=(deadline,), daemon=True, name=f"hybridnas-load-{i}")
        for i in range(n)
    ]
    try:
        for p in procs:
            p.start()
        time.sleep(0.2 if n else 0.0)  # let the scheduler see them before anything is timed
        yield procs
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)

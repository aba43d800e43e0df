"""Busy background processes for a while: the artificial load `hybridnas bench latency --load N`
and the tests calibrate under."""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from collections.abc import Iterator


def _spin(deadline: float) -> None:
    if sys.platform.startswith("linux"):  # die with the parent, however it dies (PR_SET_PDEATHSIG)
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    while time.monotonic() < deadline:  # pure Python: one core, a tiny working set
        pass


@contextlib.contextmanager
def busy_load(n: int, seconds: float) -> Iterator[list]:
    """``n`` processes that each keep one core busy, for the duration of the block.

    Bounded three times: the block ends them all (terminate, then kill) when it exits, however it
    exits; on Linux each is killed when this process dies; and each ends by itself after ``seconds``.
    """
    if n < 0:
        raise ValueError(f"load must be >= 0 processes, got {n}")
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    deadline = time.monotonic() + seconds  # CLOCK_MONOTONIC is system-wide: the children share it
    procs = [
        ctx.Process(target=_spin, args=(deadline,), daemon=True, name=f"hybridnas-load-{i}") for i in range(n)
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

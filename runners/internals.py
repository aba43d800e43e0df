"""Every use of a Ray or Optuna internal, in one place, checked against the installed version.

Each function here works around something the public APIs do not offer. Each one checks that the
internal is still there and, when it is not, logs one line and falls back to the public behaviour
(slower, never wrong). The tests in tests/test_internals.py fail on an upgrade that moves them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("hybridnas")

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_LOCKS_ATTR = "_hybridnas_stripped_locks"


# -- Optuna: samplers that hold a thread lock ------------------------------------------------------


def _samplers(sampler: Any) -> list[Any]:
    """The sampler and the samplers it delegates to (NSGA-II's random/independent samplers)."""
    out, todo = [], [sampler]
    while todo:
        s = todo.pop()
        if s is None or any(s is o for o in out) or not hasattr(s, "__dict__"):
            continue
        out.append(s)
        todo += [v for k, v in vars(s).items() if k.endswith("sampler") and hasattr(v, "sample_relative")]
    return out


@contextlib.contextmanager
def sampler_without_locks(sampler: Any) -> Iterator[None]:
    """Optuna 5.1's NSGA-II sampler keeps a ``threading.Lock`` in its state, so it (and a study
    that uses it) no longer pickles, which Ray Tune must do to save and restore a search. While
    this context is open the locks are taken out (their attribute names noted on the sampler);
    `restore_sampler_locks` puts fresh ones back after unpickling."""
    taken: list[tuple[Any, str, Any]] = []
    for s in _samplers(sampler):
        names = [k for k, v in vars(s).items() if isinstance(v, _LOCK_TYPES)]
        for k in names:
            taken.append((s, k, vars(s)[k]))
            setattr(s, k, None)
        if names:
            setattr(s, _LOCKS_ATTR, names)
            log.debug("optuna: %s holds locks %s; pickled without them", type(s).__name__, names)
    try:
        yield
    finally:
        for s, k, lock in taken:
            setattr(s, k, lock)
            vars(s).pop(_LOCKS_ATTR, None)


class _PicklableLock:
    """A lock for ``with`` blocks that pickles as a new, unlocked lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def __reduce__(self) -> tuple:
        return (_PicklableLock, ())


def picklable_sampler(sampler: Any) -> Any:
    """``sampler`` with every thread lock it holds (Optuna 5.1's NSGA-II/III keep one, used only in
    ``with`` blocks) replaced by one that pickles, so the sampler pickles wherever Ray Tune needs it."""
    for s in _samplers(sampler):
        for k, v in list(vars(s).items()):
            if isinstance(v, _LOCK_TYPES):
                setattr(s, k, _PicklableLock())
                log.debug("optuna: %s.%s made picklable", type(s).__name__, k)
    return sampler


def restore_sampler_locks(sampler: Any) -> None:
    """Fresh locks where `sampler_without_locks` took them out before pickling."""
    for s in _samplers(sampler):
        for k in vars(s).pop(_LOCKS_ATTR, []):
            setattr(s, k, threading.Lock())


# -- Ray: trial actors on the workers a local Ray prestarted ----------------------------------------

# Ray versions these internals were checked against (tests/test_internals.py checks them again).
RAY_CHECKED = ("2.60",)


def worker_system_config(preload: tuple[str, ...], slots: int | None) -> dict[str, Any]:
    """``ray.init(_system_config=...)`` for a local Ray: every worker imports ``preload`` before it
    takes work, and at most ``slots`` idle workers are prestarted (one per CPU otherwise, each
    importing torch). Both are Ray system-config keys, which Ray validates at ``ray.init``: a Ray
    that dropped one would refuse to start, so unknown versions get the plain config and a log line.
    """
    import ray

    if not ray.__version__.startswith(RAY_CHECKED):
        log.info("ray %s: not checked with its system config; trial workers start cold", ray.__version__)
        return {}
    config: dict[str, Any] = {"preload_python_modules": list(preload)}
    if slots:
        config["num_workers_soft_limit"] = slots
    return config


@contextlib.contextmanager
def tune_actors_without_env_vars() -> Iterator[None]:
    """Tune gives each trial actor a runtime environment of a few variables
    (``ray.tune.execution.class_cache``); Ray hands an actor only an idle worker of the same
    runtime environment, so without this every trial actor got a fresh process. In a Ray started
    by this process the workers inherited those variables anyway: the lists are emptied while
    Tune runs. If the module or its attributes moved, Tune keeps its behaviour (logged)."""
    try:
        from ray.tune.execution import class_cache as cache
    except ImportError:
        cache = None
    if cache is None or not hasattr(cache, "DEFAULT_ENV_VARS") or not hasattr(cache, "ENV_VARS_TO_PROPAGATE"):
        log.info("ray: tune's class_cache moved; trial actors start in fresh processes")
        yield
        return
    saved = cache.DEFAULT_ENV_VARS, cache.ENV_VARS_TO_PROPAGATE
    cache.DEFAULT_ENV_VARS, cache.ENV_VARS_TO_PROPAGATE = {}, set()
    try:
        yield
    finally:
        cache.DEFAULT_ENV_VARS, cache.ENV_VARS_TO_PROPAGATE = saved


# -- Ray Tune: a ConcurrencyLimiter restored with ids of trials that no longer exist ----------------


def concurrency_limiter(searcher: Any, max_concurrent: int) -> Any:
    """Ray Tune's `ConcurrencyLimiter` around ``searcher``, made safe to restore (issue 18).

    The limiter saves the ids of the trials live at each snapshot (its ``live_trials``), and a
    restored search holds a slot for each until that trial completes. Ray snapshots the searcher and
    the trial list separately, every few seconds, so a driver stopped between the two leaves an id no
    restored trial carries: it never completes, and the resumed search runs one trial fewer at a time
    for good (seen: concurrency 2 resumed as 1). `ResumableConcurrencyLimiter` gives the ids it
    restores no slot; a restored trial that completes is still told to the searcher. When the
    installed Ray's limiter keeps no ``live_trials``, Ray's own limiter is used, with a logged line.
    """
    from ray.tune.search import ConcurrencyLimiter

    plain = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    if not isinstance(getattr(plain, "live_trials", None), set):
        import ray

        log.info(
            "ray %s: ConcurrencyLimiter keeps no live_trials; a resumed search may run fewer trials at once",
            ray.__version__,
        )
        return plain
    return __getattr__("ResumableConcurrencyLimiter")(searcher, max_concurrent=max_concurrent)


def _resumable_limiter_class() -> type:
    from ray.tune.search import ConcurrencyLimiter

    class ResumableConcurrencyLimiter(ConcurrencyLimiter):
        """See `concurrency_limiter`."""

        def set_state(self, state: dict) -> None:
            super().set_state(state)
            self.restored = set(self.live_trials)
            self.live_trials = set()
            self.num_unfinished_live_trials = 0

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            restored = self.__dict__.setdefault("restored", set())
            if trial_id in restored and trial_id not in self.live_trials:
                restored.discard(trial_id)
                return self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return super().on_trial_complete(trial_id, result=result, error=error)

    ResumableConcurrencyLimiter.__module__ = __name__
    ResumableConcurrencyLimiter.__qualname__ = ResumableConcurrencyLimiter.__name__
    return ResumableConcurrencyLimiter


def __getattr__(name: str) -> Any:
    # The limiter subclass is made on first use (importing Ray Tune costs half a second) and kept
    # under its module-level name, so that pickle finds it.
    if name == "ResumableConcurrencyLimiter":
        cls = globals()[name] = _resumable_limiter_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

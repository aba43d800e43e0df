"""What a search or an ablation keeps in its output folder to be resumed, and the parts of the
driver's life both share: the checks before the tracking store is touched, the state file and its
fingerprint, the stop signals, the parent-run
guard, replaying results a killed driver lost, the latency table a search started with, the one-line summary of a run that trained nothing.

How a driver ends, whatever ends it:

- finished: the parent run FINISHED, every trial run finished;
- Ctrl-C (SIGINT) or SIGTERM (``timeout``, systemd, Docker, Kubernetes, Slurm), or the tracking
  store away for longer than ``--store-timeout``: no new trial starts, Tune saves its state, the
  runs of unfinished trials and the parent end KILLED, and the driver raises `Interrupted` (or
  returns ``interrupted``); the CLI prints the command that continues it and exits 130, 143 or 75;
- an error: the trial runs KILLED, the parent FAILED with the error;
- ``kill -9``: nothing can run; the state file, written as soon as the parent run exists, lets
  ``--resume`` (or a rerun of the same command) find that parent and close what was left RUNNING.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybridnas.runners.trial import STATUS_FAILED, STATUS_INFEASIBLE, STATUS_OK
from hybridnas.search_space.errors import SpecError, UserError


class SearchError(UserError):
    """A search or ablation that cannot start or continue as asked (existing output, nothing to
    resume, the experiment changed since)."""


STATE_FILE = "state.json"

# Exit codes of an interrupted driver: 128 + the signal, and EX_TEMPFAIL (sysexits.h) for a
# tracking store that stayed away: "try again later" (with --resume).
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "store": 75}


class Interrupted(KeyboardInterrupt):
    """A search or an ablation stopped before its end by ``reason`` (SIGINT, SIGTERM, or "store":
    the tracking store away for too long). ``resumable``: its state is saved in its folder."""

    def __init__(self, reason: str, message: str, resumable: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.resumable = resumable

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.reason, 130)


class Stop:
    """SIGINT and SIGTERM as one clean stop, while a search or an ablation runs (a context manager
    that puts back the handlers it found).

    While Tune runs (`tune`), the first SIGTERM becomes Tune's own graceful stop, the one Ctrl-C
    gets: Ray Tune stops on SIGUSR1 like on SIGINT (``ray.tune.tune._setup_signal_catching``), so
    the handler raises SIGUSR1; no new trial starts, Tune saves the experiment and ``fit`` returns.
    Outside Tune, or at a second signal, it raises KeyboardInterrupt at once. ``reason`` records
    what stopped the run ("SIGINT" when Tune took a Ctrl-C itself and nothing else was recorded).
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.reason: str | None = None
        self._saved: dict[int, Any] = {}
        self._in_tune = False

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._saved[sig] = signal.getsignal(sig)
            signal.signal(signal.SIGINT, self._on_signal)
            self.rearm()
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise Interrupted(self.reason or "SIGINT", "interrupted before anything started", False) from None

    def rearm(self) -> None:
        """Put the SIGTERM handler back (``ray.init`` installs its own, which exits at once)."""
        if self._saved and signal.getsignal(signal.SIGTERM) is not self._on_signal:
            signal.signal(signal.SIGTERM, self._on_signal)

    @contextlib.contextmanager
    def tune(self) -> Iterator[None]:
        """Around ``Tuner.fit``; Tune's signal handlers stay installed after it, so ours come back."""
        self.rearm()
        self._in_tune = True
        try:
            yield
        finally:
            self._in_tune = False
            if self._saved:
                signal.signal(signal.SIGINT, self._on_signal)
                usr1 = getattr(signal, "SIGUSR1", None)
                if usr1 in self._saved:
                    signal.signal(
                        usr1, self._saved[usr1] if self._saved[usr1] is not None else signal.SIG_DFL
                    )

    def request(self, reason: str) -> None:
        """Stop gracefully for ``reason`` (called in the driver's main thread, inside Tune's loop)."""
        if self.reason is None:
            self.reason = reason
            self._tune_stop()

    def _tune_stop(self) -> bool:
        usr1 = getattr(signal, "SIGUSR1", None)
        if not self._in_tune or usr1 is None:
            return False
        handler = signal.getsignal(usr1)
        if not callable(handler) or handler is self._saved.get(usr1):
            return False  # Tune has not installed its handlers yet
        if signal.getsignal(signal.SIGINT) is self._on_signal:
            return False  # Tune already took a Ctrl-C (and gave SIGINT back): this one is the second
        signal.raise_signal(usr1)
        return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        first = self.reason is None
        self.reason = self.reason or signal.Signals(signum).name
        if first and signum != signal.SIGINT and self._tune_stop():
            return
        raise KeyboardInterrupt


def read_state(out: Path, name: str = STATE_FILE) -> dict | None:
    path = out / name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SearchError(f"{path} is unreadable ({e}); remove it or use another --out") from None


def write_state(out: Path, state: dict, name: str = STATE_FILE) -> None:
    from hybridnas.runners.files import atomic_write

    atomic_write(out / name, json.dumps(state, indent=2, sort_keys=True) + "\n")


def check_state(
    out: Path, fp: str, resume: bool, what: str = "search", name: str = STATE_FILE
) -> dict | None:
    """The state a search or an ablation left in ``out``, checked against this run of it.

    Without ``resume`` the folder must not hold one; with it, it must, and the file's fingerprint
    (``fp``: what the results depend on) must not have changed since.
    """
    state = read_state(out, name)
    if state and state.get("provisional") and state.get("fingerprint") == fp:
        return state  # its driver stopped before any trial ran: a rerun continues it like --resume
    if state and state.get("provisional") and not resume:
        return None  # a different search, never begun: replaced (`close_orphans` ends its parent)
    if state and not resume:
        raise SearchError(
            f"{out} already holds a {what} (MLflow run {state.get('parent_run_id')}); continue it with "
            "--resume, or start a fresh one with --out DIR"
        )
    if resume and not state:
        raise SearchError(f"nothing to resume in {out} (no {name}); start the {what} without --resume")
    if state and state.get("fingerprint") != fp:
        raise SearchError(
            f"the {what} file changed since the {what} in {out} started; resume it with the same file and "
            "flags, or start a fresh one with --out DIR"
        )
    return state


def check_can_start(
    out: Path,
    out_what: str,
    resources: Any,
    train: Any,
    latency: Any,
    address: str | None = None,
    connect_timeout: float | None = None,
) -> None:
    """What would make a search or an ablation fail after its MLflow run exists, checked before the
    tracking store is touched (so a failure leaves no ``mlflow.db``, no run, no folder): the output
    folder can be written, the cluster at ``address`` answers (joined here, within
    ``connect_timeout`` seconds), a trial's resources fit what the cluster or this machine has, and
    the devices asked for exist."""
    from hybridnas.runners.files import check_writable_dir
    from hybridnas.runners.ray_runtime import DEFAULT_CONNECT_TIMEOUT_S, available_resources, init_ray

    check_writable_dir(out, out_what)
    if address:
        init_ray(
            address, connect_timeout=DEFAULT_CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout
        )
    have = available_resources()
    where = "the cluster has" if address else "this machine has"
    for what, need in (("cpu", resources.cpu), ("gpu", resources.gpu)):
        if need > have[what]:  # Tune would wait forever for a slot that cannot exist
            raise SpecError(f"resources.{what}", f"a trial asks for {need:g}, {where} {have[what]:g}")
    if train.device == "cuda" and have["gpu"] == 0:
        raise SpecError("train.device", f"'cuda', but {where} no GPU for the trials; use auto or cpu")
    if latency.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SpecError("latency.device", "'cuda', but PyTorch sees no CUDA GPU on this machine; use cpu")


def nothing_trained(client: Any, exp_id: str, parent: str) -> str | None:
    """None when at least one trial of the run trained; else one line saying why none did: how many
    failed and their most common error, or that every architecture was infeasible."""
    from hybridnas.runners.store import child_runs, headline

    runs = child_runs(client, exp_id, parent)
    status = collections.Counter(r.data.tags.get("hybridnas.status") for r in runs)
    if status[STATUS_OK]:
        return None
    failed, infeasible = status[STATUS_FAILED], status[STATUS_INFEASIBLE]
    if failed:
        # Errors that differ only in their numbers (a trial's number, a port, a size) count as one.
        lines = [headline(r.data.tags.get("hybridnas.error") or "") for r in runs]
        lines = [line for line, r in zip(lines, runs) if r.data.tags.get("hybridnas.status") == STATUS_FAILED]
        kinds = collections.Counter(re.sub(r"\d+", "#", line) for line in lines)
        kind, n = kinds.most_common(1)[0]
        error = next(line for line in lines if re.sub(r"\d+", "#", line) == kind)
        also = f" ({infeasible} more infeasible)" if infeasible else ""
        return f"no trial trained: {failed} of {len(runs)} failed{also}; the most common error ({n} of {failed}): {error}"
    if infeasible:
        why = collections.Counter(r.data.tags.get("hybridnas.violations", "") for r in runs).most_common(1)[
            0
        ][0]
        return (
            f"no trial trained: all {infeasible} architectures were infeasible"
            + (f" (e.g. {why})" if why else "")
            + "; loosen the constraints or change the space"
        )
    return "no trial trained: no trial finished"


def fingerprint(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolved_for_fingerprint(exp: Any) -> dict:
    d = exp.to_resolved_dict()
    d.pop("out_dir", None)  # --out may move; the search is the same
    d.pop("tracking", None)
    return d


class Replays:
    """A Ray actor, alive during a resumed search, holding the trials MLflow says finished.

    Ray snapshots a search every couple of seconds, so a driver killed right after a trial
    finished may come back with that trial marked running, or not knowing it at all. Keyed by
    architecture hash (unique within a search): `hybridnas_trial` reports the stored result
    instead of training again, and the searcher asks Optuna for the lost trials' parameters first.
    """

    def __init__(self, results: dict[str, dict], params: dict[str, dict]) -> None:
        self.results = results
        self.params = params

    def get(self, arch_hash: str) -> dict | None:
        return self.results.get(arch_hash)

    def lost_params(self) -> dict[str, dict]:
        return self.params


@contextlib.contextmanager
def parent_guard(
    client: Any, run_id: str, stop: Stop | None = None, what: str = "search", out: Path | None = None
) -> Iterator[None]:
    """No run of a search is left RUNNING by what ends its driver. Interrupted (a signal outside
    Tune's loop, or a second one): the trial runs still RUNNING and the parent end KILLED, and
    `Interrupted` is raised. Anything else: the trial runs KILLED, the parent FAILED with the
    error."""
    from hybridnas.runners.store import close_unfinished, set_tags

    def close(status: str) -> None:
        with contextlib.suppress(Exception):
            close_unfinished(client, client.get_run(run_id).info.experiment_id, run_id)
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status)

    try:
        yield
    except KeyboardInterrupt as e:
        close("KILLED")
        if isinstance(e, Interrupted):
            raise
        reason = (stop.reason if stop is not None else None) or "SIGINT"
        where = f"; its state is in {out}" if out is not None else ""
        raise Interrupted(reason, f"the {what} was interrupted ({reason}){where}") from None
    except Exception as e:
        with contextlib.suppress(Exception):
            set_tags(client, run_id, {"hybridnas.error": f"{type(e).__name__}: {e}"[:5000]})
        close("FAILED")
        raise


def close_orphans(client: Any, exp_id: str, kind: str, out: Path, keep: str) -> list[str]:
    """Parent runs of this output folder still RUNNING other than ``keep``: what a driver killed
    before its state file held them left behind. They end KILLED, with their trial runs."""
    from hybridnas.runners.store import close_unfinished, search_all

    found = search_all(
        client,
        [exp_id],
        f"tags.`hybridnas.kind` = '{kind}' and tags.`hybridnas.out_dir` = '{out}' and attributes.status = 'RUNNING'",
    )
    closed = []
    for run in found:
        if run.info.run_id != keep:
            close_unfinished(client, exp_id, run.info.run_id)
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def replays_from_mlflow(client: Any, exp_id: str, parent: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Results and Optuna parameters of the finished trials of a search, by architecture hash."""
    from hybridnas.runners.store import FINAL_METRICS, FINISHED, child_runs

    results, params = {}, {}
    for run in child_runs(client, exp_id, parent):
        tags = run.data.tags
        h, status = tags.get("hybridnas.arch_hash"), tags.get("hybridnas.status")
        if tags.get("hybridnas.kind") == "repeat":
            continue  # a front member's extra seed: not a trial of the search
        if h and status in FINISHED:
            r = {k: run.data.metrics[k] for k in FINAL_METRICS if k in run.data.metrics}
            r.update(status=status, trial_number=tags.get("hybridnas.trial"), arch_hash=h)
            if "epochs_trained" in r:
                r["epoch"] = int(r["epochs_trained"])
            if status == STATUS_FAILED:
                r["error"] = tags.get("hybridnas.error", "")
            if status == STATUS_INFEASIBLE:
                r["violations"] = tags.get("hybridnas.violations", "")
            results[h] = r
            params[h] = json.loads(tags.get("hybridnas.optuna_params") or "{}")
    return results, params

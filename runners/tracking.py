"""MLflow tracking of a search: one writer, the Ray Tune driver, through a Tune `Callback`.

Trials never talk to MLflow: they report to Tune (`tune.report`), and `MlflowSearchCallback`, which
runs in the driver's event loop, turns trial events into MLflow calls through one `MlflowClient`.
So a SQLite store has exactly one writer (no "database is locked" between trial processes), a
trial on another node needs no route to the tracking server, and a nested child run really is
nested: it is created with the ``mlflow.parentRunId`` tag instead of relying on the active-run stack
of whichever process happens to log.

Layout (read back by `runners.export` and `runners.pareto`):

- parent run (one per search): tags ``hybridnas.kind=search``, ``hybridnas.objectives`` (JSON
  ``[[metric, mode], ...]``); params sampler, seed, trials, ...; metric ``hypervolume`` with
  step = number of finished trials; artifacts experiment.yaml, resolved_config.json and, at the
  end, pareto.csv, pareto_<a>_vs_<b>.png/html and exported/*.yaml.
- child run (one per trial): tags ``mlflow.parentRunId``, ``hybridnas.kind=trial``,
  ``hybridnas.trial`` (the Optuna trial number), ``hybridnas.status`` (running | ok | failed |
  infeasible), ``hybridnas.arch_hash``, ``hybridnas.error`` (failed), ``pareto=true`` (front members);
  params = the flattened architecture; metrics train_loss and val_acc per epoch (step = epoch) and
  the finals; artifact arch.yaml.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ray.tune import Callback

from hybridnas.search_space.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Metrics a trial reports once, at its end (val_acc also per epoch).
FINAL_METRICS = (
    "val_acc",
    "train_loss",
    "macs",
    "flops",
    "params",
    "latency_ms",
    "train_time_s",
    "imgs_per_s",
)
EPOCH_METRICS = ("train_loss", "val_acc")
FINISHED = ("ok", "failed", "infeasible")
_TAG_MAX = 5000  # MLflow caps tag values at 8000 characters; an error's tail is what matters
_BATCH = 100  # MLflow accepts at most 100 params/tags per log_batch call


class TrackingError(UserError):
    """The tracking store cannot be used (unreachable server, missing directory, bad URI)."""


# ---------------------------------------------------------------------------------------------
# URIs


def resolve_tracking_uri(uri: str | None) -> str:
    """The URI every process will use: the default is ``sqlite:///mlflow.db`` in the working
    directory; relative SQLite and file paths become absolute, so the driver, a restarted driver
    and the ``mlflow ui`` command printed at the end all mean the same store."""
    uri = uri or DEFAULT_TRACKING_URI
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path and path != ":memory:" and not os.path.isabs(path):
            return "sqlite:///" + str(Path(path).resolve())
        return uri
    if parts.scheme == "file":
        return Path(parts.path).resolve().as_uri()
    if parts.scheme == "" or (len(parts.scheme) == 1 and os.name == "nt"):
        return Path(uri).resolve().as_uri()  # a plain directory: MLflow's file store
    return uri


def redact(uri: str) -> str:
    """The URI without its password, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return uri.replace(f":{parts.password}@", ":***@", 1)


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any trial runs, when the tracking store cannot be used.

    MLflow's HTTP client retries a dead server with exponential back-off for minutes; one probe of
    ``/health`` with a short timeout says it at once. A SQLite file needs an existing, writable
    directory.
    """
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # something answered (a proxy, an old server without /health): MLflow will tell
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {redact(uri)}: {reason} "
                "(start it, or pass another --tracking-uri)"
            ) from None
    elif parts.scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path and path != ":memory:":
            folder = Path(path).parent
            if not folder.is_dir():
                raise TrackingError(f"tracking URI {uri}: directory {folder} does not exist")
            if not os.access(folder, os.W_OK):
                raise TrackingError(f"tracking URI {uri}: directory {folder} is not writable")
    elif parts.scheme == "file":
        folder = Path(parts.path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking URI {uri}: {folder} is not writable")


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (a server is its own UI)."""
    if urlsplit(uri).scheme in ("http", "https"):
        return f"open {redact(uri)} in a browser (the tracking server serves the UI)"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def make_client(uri: str):
    """An `MlflowClient` with bounded HTTP retries (the default retries for minutes)."""
    # Set before the first request: MLflow reads these when it builds its HTTP session.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    from mlflow import MlflowClient

    # "Creating initial MLflow database tables..." and friends are not the user's business.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str) -> str:
    """The id of MLflow experiment ``name``, created when missing (restored when deleted)."""
    from mlflow.entities import ViewType

    found = [e for e in client.search_experiments(view_type=ViewType.ALL) if e.name == name]
    if found:
        exp = found[0]
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(
        name, artifact_location=_artifact_root(getattr(client, "tracking_uri", ""))
    )


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store: ``mlruns/`` next to the database file.

    MLflow's default is ``./mlruns`` under the *current* directory, so one database used from two
    directories would scatter its artifacts; next to the file, the store is one self-contained
    folder. Servers and file stores keep their own default (None).
    """
    if urlsplit(uri).scheme != "sqlite" or ":///" not in uri:
        return None
    path = uri.split(":///", 1)[1]
    if not path or path == ":memory:":
        return None
    return (Path(path).resolve().parent / "mlruns").as_uri()


def search_all(client: Any, experiment_ids: Sequence[str], filter_string: str) -> list:
    """Every run matching ``filter_string`` (search_runs pages at 1000)."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            list(experiment_ids), filter_string=filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(client: Any, exp_id: str, parent_run_id: str) -> list:
    """The trial runs of one search, oldest first."""
    runs = search_all(client, [exp_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(str(k), str(v)) for k, v in params.items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i : i + _BATCH])


def set_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(str(k), str(v)) for k, v in tags.items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, tags=items[i : i + _BATCH])


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Finite numeric values only (a NaN would poison every plot and sort)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _finite(v)]
    if items:
        client.log_batch(run_id, metrics=items)


def _finite(v: Any) -> bool:
    try:
        return not isinstance(v, bool) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _clip(text: str, n: int = _TAG_MAX) -> str:
    text = str(text)
    return text if len(text) <= n else "..." + text[-(n - 3) :]


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Diverged|Interrupt)\b.*:")


def headline(error: str) -> str:
    """The one line of an error text worth printing: the last ``SomeError: message`` line (Ray's
    worker-failure texts carry a traceback and a page of advice), else the first line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXC_LINE.match(line):
            return line
    return lines[0] if lines else "unknown error"


def _human(value: Any, metric: str) -> str:
    from hybridnas.runners.pareto import human

    return human(value, metric)


# ---------------------------------------------------------------------------------------------
# The callback


def trial_config(trial: Any) -> dict:
    """A trial's hybridnas config: the whole Tune config in a search, ``config["trial"]`` in an
    ablation (whose trials are a grid over complete configs)."""
    cfg = trial.config
    return cfg["trial"] if isinstance(cfg.get("trial"), dict) else cfg


class MlflowSearchCallback(Callback):
    """Every MLflow write of a search, done in the Tune driver.

    Child runs are found again by their Ray trial id (tag ``hybridnas.ray_trial_id``) when a search
    is resumed, so a trial that finished before the interruption keeps its run, and a trial that was
    cut short gets a fresh run (its old, unfinished one is deleted, so no half curve stays behind).
    The hypervolume reference is fixed at the first finished trial and stored on the parent run
    (tag ``hybridnas.hv_reference``) so that a resumed search continues the same curve.

    It also prints the progress line of each finished trial (``progress=True``).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        objectives: Sequence[tuple[str, str]],
        constraints: Mapping[str, Any] | None = None,
        total_trials: int = 0,
        progress: bool = True,
        stream: Any = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.objectives = [(str(m), str(mode)) for m, mode in objectives]
        self.constraints = {
            k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) for k, v in (constraints or {}).items()
        }
        self.total_trials = total_trials
        self.progress = progress
        self._stream = stream
        self._reset()

    def _reset(self) -> None:
        self._client = None
        self._runs: dict[str, str] = {}  # Ray trial id -> child run id
        # run key -> finished child run id (resume). The key is the arch hash in a search (one trial
        # per architecture) and "[variant, seed]" in an ablation (one architecture, several seeds).
        self._by_hash: dict[str, str] = {}
        self._done: set[str] = set()  # Ray trial ids whose child run is finished
        self._epochs_logged: dict[str, int] = {}
        self._counts = {"ok": 0, "failed": 0, "infeasible": 0}
        self._hv = None
        self._best: tuple[float, str] | None = None
        self._t0 = time.monotonic()

    # The client and bookkeeping are rebuilt from MLflow in setup(): never pickled with the Tuner.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in (
            "_client",
            "_runs",
            "_by_hash",
            "_done",
            "_epochs_logged",
            "_counts",
            "_hv",
            "_best",
            "_stream",
        ):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()
        self._stream = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    def _print(self, line: str) -> None:
        if self.progress:
            print(line, file=self._stream or sys.stdout, flush=True)

    # ---- Tune hooks ------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """Rebuild the bookkeeping of a resumed search from MLflow (the source of truth)."""
        from hybridnas.runners.pareto import HypervolumeTracker

        self._t0 = time.monotonic()
        client = self.client
        parent = client.get_run(self.parent_run_id)
        ref = parent.data.tags.get("hybridnas.hv_reference")
        self._hv = HypervolumeTracker(
            self.objectives, self.constraints, reference=json.loads(ref) if ref else None
        )
        for run in child_runs(client, self.experiment_id, self.parent_run_id):
            tid = run.data.tags.get("hybridnas.ray_trial_id")
            status = run.data.tags.get("hybridnas.status")
            if not tid:
                continue
            if status in FINISHED:
                self._runs[tid] = run.info.run_id
                key = run.data.tags.get("hybridnas.run_key") or run.data.tags.get("hybridnas.arch_hash", "")
                self._by_hash[key] = run.info.run_id
                self._done.add(tid)
                self._counts[status] += 1
                if status == "ok":
                    self._add_to_front(run.data.metrics, run.data.tags.get("hybridnas.trial", "?"))
            else:
                # Cut short by the interruption: the trial restarts from scratch, with a new run.
                client.delete_run(run.info.run_id)
        if self._done:
            self._print(f"resumed: {self._summary()}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.trial_id
        if tid in self._done or tid in self._runs:
            return  # finished before a resume (Tune replays it), or a retry after a worker failure
        from hybridnas.search_space.spec import ArchSpec

        cfg = trial_config(trial)
        adopted = self._by_hash.get(cfg.get("run_key") or cfg.get("arch_hash", ""))
        if adopted:
            # Finished after Ray's last snapshot of a killed driver: the resumed search replays it
            # under a new Ray trial id; the run it already has is the one that counts.
            self._runs[tid] = adopted
            self._done.add(tid)
            self.client.set_tag(adopted, "hybridnas.ray_trial_id", tid)
            return
        spec = ArchSpec.from_dict(cfg["arch"], warn=False)
        number = str(cfg.get("trial_number", tid))
        client = self.client
        run = client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "hybridnas.kind": "trial",
                "hybridnas.trial": number,
                "hybridnas.ray_trial_id": tid,
                "hybridnas.arch_hash": spec.arch_hash(),
                "hybridnas.status": "running",
                "hybridnas.optuna_params": json.dumps(cfg.get("optuna_params") or {}, sort_keys=True),
                # An ablation's trials carry their key and factor/value/seed/variant tags.
                **({"hybridnas.run_key": cfg["run_key"]} if cfg.get("run_key") else {}),
                **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()},
            },
        )
        run_id = run.info.run_id
        self._runs[tid] = run_id
        log_params(client, run_id, spec.flat_params())
        client.log_text(run_id, spec.to_yaml(), "arch.yaml")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tid = trial.trial_id
        run_id = self._runs.get(tid)
        if run_id is None or tid in self._done or result.get("status") != "running":
            return
        epoch = int(result.get("epoch", 0))
        log_metrics(self.client, run_id, {k: result.get(k) for k in EPOCH_METRICS}, step=epoch)
        self._epochs_logged[tid] = epoch

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = dict(trial.last_result or {})
        status = result.get("status")
        if status not in FINISHED:  # returned without a final report: a bug, not a result
            status, result["error"] = "failed", "the trial ended without reporting a result"
        self._finish(trial, status, result, trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Only worker failures get here (the trainable records its own exceptions), after the
        # retries of search.max_failures are spent.
        error = None
        try:
            error = trial.get_error()
        except Exception:  # noqa: BLE001 - the error file may live on a lost node
            pass
        result = dict(trial.last_result or {})
        result["error"] = str(error or "the trial's worker died or failed (Ray recorded no error)")
        self._finish(trial, "failed", result, trials)

    # ---- helpers ---------------------------------------------------------------------------

    def _finish(self, trial: Any, status: str, result: dict, trials: list) -> None:
        tid = trial.trial_id
        if tid in self._done:
            return
        if tid not in self._runs:
            self.on_trial_start(0, trials, trial)
        run_id = self._runs[tid]
        client = self.client
        number = str(trial_config(trial).get("trial_number", tid))
        finals = {k: result.get(k) for k in FINAL_METRICS}
        if status != "ok":
            finals.pop("val_acc")  # an untrained or broken model has no accuracy to compare
            finals.pop("train_loss")
        epochs = self._epochs_logged.get(tid, 0)
        if status == "ok" and epochs and int(result.get("epoch", 0)) == epochs:
            # The last epoch already logged val_acc/train_loss at this step; do not add a twin point.
            finals.pop("val_acc")
            finals.pop("train_loss")
        log_metrics(client, run_id, finals, step=int(result.get("epoch", 0) or 0))
        tags = {"hybridnas.status": status}
        for key, tag in (
            ("hostname", "hybridnas.host"),
            ("node_id", "hybridnas.node_id"),
            ("precision", "hybridnas.precision"),
        ):
            if result.get(key):
                tags[tag] = result[key]
        if status == "failed":
            tags["hybridnas.error"] = _clip(result.get("error") or "unknown error")
        if status == "infeasible":
            tags["hybridnas.violations"] = _clip(result.get("violations") or "")
        set_tags(client, run_id, tags)
        if status == "failed" and result.get("traceback"):
            client.log_text(run_id, str(result["traceback"]), "error.txt")
        client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
        self._done.add(tid)
        self._counts[status] += 1
        if status == "ok":
            self._add_to_front({**finals, "val_acc": result.get("val_acc")}, number)
        n_done = sum(self._counts.values())
        if self._hv is not None and self._hv.reference is not None:
            log_metrics(client, self.parent_run_id, {"hypervolume": self._hv.value}, step=n_done)
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id != tid)
        self._print(self._line(number, status, result, running))

    def _add_to_front(self, metrics: Mapping[str, Any], number: str) -> None:
        if self._hv is None:
            return
        values = {m: metrics.get(m) for m, _ in self.objectives}
        if not all(_finite(v) for v in values.values()):
            return
        first = self._hv.reference is None
        self._hv.add({m: float(v) for m, v in values.items()})
        if first:
            set_tags(
                self.client,
                self.parent_run_id,
                {"hybridnas.hv_reference": json.dumps(list(map(float, self._hv.reference)))},
            )
        metric, mode = self.objectives[0]
        v = float(values[metric])
        if self._best is None or (v > self._best[0] if mode == "max" else v < self._best[0]):
            self._best = (v, number)

    def _summary(self) -> str:
        c = self._counts
        total = f"/{self.total_trials}" if self.total_trials else ""
        text = f"{sum(c.values())}{total} done ({c['ok']} ok, {c['failed']} failed, {c['infeasible']} infeasible)"
        if self._best is not None:
            metric = self.objectives[0][0]
            text += f"; best {metric} {_human(self._best[0], metric)} (trial {self._best[1]})"
        if len(self.objectives) > 1 and self._hv is not None and self._hv.points:
            text += f", hypervolume {self._hv.value:.4g}"
        return text

    def _line(self, number: str, status: str, result: Mapping[str, Any], running: int) -> str:
        shown = [m for m, _ in self.objectives] + [
            m for m in ("val_acc", "macs", "params") if m not in dict(self.objectives)
        ]
        if status == "ok":
            what = "  ".join(f"{m} {_human(result.get(m), m)}" for m in shown if _finite(result.get(m)))
            what += f"  {float(result.get('train_time_s', 0.0)):.1f}s"
        elif status == "infeasible":
            what = f"not trained: {result.get('violations', '')}"
        else:
            what = _clip(headline(str(result.get("error") or "")), 140)
        elapsed = time.monotonic() - self._t0
        return (
            f"[{elapsed:6.0f}s] trial {number:>3} {status:<10} {what}\n"
            f"          {self._summary()}; {running} running"
        )


def front_tags(client: Any, run_ids: Iterable[str], all_runs: Iterable[str]) -> None:
    """``pareto=true`` on the front's child runs, ``pareto=false`` on the other finished ones."""
    front = set(run_ids)
    for run_id in all_runs:
        client.set_tag(run_id, "pareto", "true" if run_id in front else "false")

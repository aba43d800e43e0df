"""The MLflow store, without Ray: one client, the tracking URI rules and the few write helpers that
search, ablate, export and pareto share.

The layout a search leaves in MLflow is described in the README ("Browse in MLflow"); the Tune
callback that writes it during a search is `runners.tracking`.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
    "epochs_trained",
)


EPOCH_METRICS = ("train_loss", "val_acc")


@dataclass(frozen=True)
class SearchRecord:
    """Where one search is recorded: the MLflow client (the driver's buffered one), the tracking URI,
    the MLflow experiment id, the search's parent run id and its output folder (state.json, tune/)."""

    client: Any
    uri: str
    exp_id: str
    parent: str
    out: Path


FINISHED = ("ok", "failed", "infeasible", "stopped")  # stopped: at a rung, by the scheduler


# MLflow has five run statuses (RUNNING, SCHEDULED, FINISHED, FAILED, KILLED). A run that never
# trained (infeasible) or was cut short (stopped) did not finish and did not fail: KILLED, MLflow's
# "ended before completing", so only trained runs read as a success; hybridnas.status says which.
RUN_STATUS = {"ok": "FINISHED", "failed": "FAILED", "infeasible": "KILLED", "stopped": "KILLED"}

# Where `mlflow ui` serves a local store (its --host and --port defaults in MLflow 3).
UI_DEFAULT_URL = "http://127.0.0.1:5000"

# The tags that tie the runs of one search (or ablation) together and say what produced them: set
# on the parent, copied onto every child run.
SHARED_TAGS = (
    "hybridnas.search_id",
    "hybridnas.version",
    "hybridnas.git_commit",
    "mlflow.source.name",
    "mlflow.source.type",
    "mlflow.source.git.commit",
)


_TAG_MAX = 5000  # MLflow caps tag values at 8000 characters; an error's tail is what matters


_BATCH = 100  # MLflow accepts at most 100 params/tags per log_batch call


class TrackingError(UserError):
    """The tracking store cannot be used (unreachable server, missing directory, bad URI)."""


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
    """The URI without its password (``http://user:***@host``), safe for messages and files."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


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
    else:  # a database or a plugin's scheme: MLflow says whether it has a store for it
        make_client(uri)


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (a server is its own UI)."""
    if urlsplit(uri).scheme in ("http", "https"):
        return f"open {redact(uri)} in a browser (the tracking server serves the UI)"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def ui_base_url(uri: str) -> str:
    """The address of the MLflow UI for this store: a tracking server serves its own UI (without
    the credentials in its URI); a SQLite or file store is served by `mlflow ui` at its default."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return UI_DEFAULT_URL
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def runs_url(uri: str, exp_id: str) -> str:
    """The experiment's runs table. MLflow 3's UI opens an experiment on its GenAI overview; the
    ``workflowType=machine_learning`` query (read by the UI's workflow switch) opens the runs."""
    return f"{ui_base_url(uri)}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def run_route(exp_id: str, run_id: str) -> str:
    """The UI's own link to a run (``#/experiments/<id>/runs/<run id>``): relative, so it works in a
    page the UI shows (a markdown artifact, a run's description), whatever the UI's address."""
    return f"#/experiments/{exp_id}/runs/{run_id}"


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    """The page of one run."""
    return f"{ui_base_url(uri)}/{run_route(exp_id, run_id)}"


def open_existing(tracking_uri: str | None) -> tuple[Any, str]:
    """``(client, uri)`` for a store that already exists (export, pareto): never creates an empty
    database by accident. Relative SQLite paths become absolute, so provenance names the store.
    Raises `TrackingError` for a missing database or directory and an unreachable server."""
    uri = tracking_uri or DEFAULT_TRACKING_URI
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        db = uri.split(":///", 1)[1] if ":///" in uri else ""
        if db and db != ":memory:":
            if not Path(db).exists():
                hint = " (the default; pass --tracking-uri)" if tracking_uri is None else ""
                raise TrackingError(f"no MLflow database at {Path(db).resolve()}{hint}")
            uri = "sqlite:///" + str(Path(db).resolve())
    elif scheme in ("", "file"):
        root = urlsplit(uri).path if scheme == "file" else uri
        if not Path(root).exists():
            raise TrackingError(f"no MLflow store at {root}")
    elif scheme in ("http", "https"):
        check_tracking_uri(uri)
    return make_client(uri), uri


def make_client(uri: str):
    """An `MlflowClient` with bounded HTTP retries (the default retries for minutes).

    A new SQLite file gets MLflow's schema when its first client is made; two processes doing that
    at once break it (``table ... already exists``), so for SQLite the client is made under a file
    lock next to the database (``<db>.lock``)."""
    # Set before the first request: MLflow reads these when it builds its HTTP session.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    from mlflow.exceptions import MlflowException

    # "Creating initial MLflow database tables..." and friends are not the user's business.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return _client_under_lock(uri)
    except MlflowException as e:
        # An unknown scheme: MLflow's text blames the model registry and runs on; say it in one line.
        known = re.search(r"Supported URI schemes are: \[([^\]]*)\]", e.message)
        allowed = f" (MLflow knows: {known.group(1)}, or a directory)" if known else ""
        first = " ".join(e.message.split()).split(". ")[0]
        raise TrackingError(
            f"tracking URI {redact(uri)}: no MLflow store for it{allowed}"
            if known
            else f"tracking URI {redact(uri)}: {first}"
        ) from None


def _client_under_lock(uri: str) -> Any:
    from mlflow import MlflowClient

    db = _sqlite_file(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    with FileLock(str(db) + ".lock", timeout=300):
        return MlflowClient(tracking_uri=uri)


def _sqlite_file(uri: str) -> Path | None:
    if urlsplit(uri).scheme != "sqlite" or ":///" not in uri:
        return None
    path = uri.split(":///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def experiment_id(client: Any, name: str) -> str:
    """The id of MLflow experiment ``name``, created when missing (restored when deleted)."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    attempts = 3
    while True:
        found = [e for e in client.search_experiments(view_type=ViewType.ALL) if e.name == name]
        if found:
            exp = found[0]
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return client.create_experiment(
                name, artifact_location=_artifact_root(getattr(client, "tracking_uri", ""))
            )
        except MlflowException:
            attempts -= 1
            if not attempts:
                raise
            time.sleep(0.2)  # another search created it a moment ago: look again


def describe_experiment(client: Any, exp_id: str, text: str) -> None:
    """Give the experiment a description (the ``mlflow.note.content`` tag the UI shows), unless it
    has one: a description someone wrote stays."""
    exp = client.get_experiment(exp_id)
    if not (exp.tags or {}).get("mlflow.note.content"):
        client.set_experiment_tag(exp_id, "mlflow.note.content", text)


def provenance_tags(source: str | os.PathLike | None, search_id: str) -> dict[str, str]:
    """The `SHARED_TAGS` of a search or ablation: its id, the hybridnas version and commit, and the
    experiment file as the MLflow source, with the commit of the git checkout that holds it."""
    from hybridnas import __version__

    tags = {"hybridnas.search_id": search_id, "hybridnas.version": __version__}
    own = _git_commit(Path(__file__).resolve().parent)
    if own:
        tags["hybridnas.git_commit"] = own
    if source:
        path = Path(source).expanduser().resolve()
        tags.update({"mlflow.source.name": str(path), "mlflow.source.type": "LOCAL"})
        commit = _git_commit(path.parent)
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(folder: Path) -> str | None:
    """HEAD of the git checkout holding ``folder``; None outside one (or without git)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def search_id(name: str, parent_run_id: str) -> str:
    """The value of ``hybridnas.search_id``: readable, and unique as its parent run is."""
    return f"{name}-{parent_run_id[:8]}"


def log_dataset(client: Any, run_id: str, info: Mapping[str, Any]) -> None:
    """Log the data a run trained on as MLflow dataset inputs: the training and the validation split,
    each with its name, digest and size (`runners.data.dataset_info` describes them).

    Built from `mlflow.entities` and logged with `MlflowClient.log_inputs`, without the arrays:
    the driver never loads the data, the trial that did reports what it trained on.
    """
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    if info.get("root"):
        source_type, source = "local", {"uri": str(info["root"])}
    else:
        source_type, source = "code", {"tags": {"hybridnas.dataset": str(info["name"])}}
    inputs = []
    for context, split in (("training", "train"), ("validation", "val")):
        part = info.get(split)
        if not part:
            continue
        profile = {"num_rows": part["rows"], "shape": part["shape"], "classes": info.get("classes")}
        dataset = Dataset(
            name=str(info["name"]),
            digest=str(part["digest"]),
            source_type=source_type,
            source=json.dumps(source),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store: ``mlruns/`` next to the database file.

    MLflow's default is ``./mlruns`` under the *current* directory, so one database used from two
    directories would scatter its artifacts; next to the file, the store is one self-contained
    folder. Servers and file stores keep their own default (None).
    """
    db = _sqlite_file(uri)
    return None if db is None else (db.resolve().parent / "mlruns").as_uri()


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


def close_unfinished_run(client: Any, run: Any, status: str = "KILLED") -> None:
    """End a trial run that is still RUNNING (cut short by an interruption, or left by a killed
    driver): tag ``hybridnas.status=killed`` and MLflow status ``status``."""
    if run.info.status == "RUNNING":
        set_tags(client, run.info.run_id, {"hybridnas.status": "killed"})
        client.set_terminated(run.info.run_id, status)


def close_unfinished(client: Any, exp_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """`close_unfinished_run` on every trial run of a search or an ablation; returns how many."""
    runs = [r for r in child_runs(client, exp_id, parent_run_id) if r.info.status == "RUNNING"]
    for run in runs:
        close_unfinished_run(client, run, status)
    return len(runs)


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


def rename(client: Any, run_id: str, name: str, current: str | None = None) -> None:
    """Set a run's name (`MlflowClient.update_run`); nothing to do when it has it already."""
    if name != current:
        client.update_run(run_id, name=name)


def front_tags(client: Any, run_ids: Iterable[str], all_runs: Iterable[str]) -> None:
    """``pareto=true`` on the front's child runs, ``pareto=false`` on the other finished ones."""
    front = set(run_ids)
    for run_id in all_runs:
        client.set_tag(run_id, "pareto", "true" if run_id in front else "false")

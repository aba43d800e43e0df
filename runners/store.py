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
)


EPOCH_METRICS = ("train_loss", "val_acc")


FINISHED = ("ok", "failed", "infeasible")


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
    """An `MlflowClient` with bounded HTTP retries (the default retries for minutes)."""
    # Set before the first request: MLflow reads these when it builds its HTTP session.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    # "Creating initial MLflow database tables..." and friends are not the user's business.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return MlflowClient(tracking_uri=uri)
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


def front_tags(client: Any, run_ids: Iterable[str], all_runs: Iterable[str]) -> None:
    """``pareto=true`` on the front's child runs, ``pareto=false`` on the other finished ones."""
    front = set(run_ids)
    for run_id in all_runs:
        client.set_tag(run_id, "pareto", "true" if run_id in front else "false")

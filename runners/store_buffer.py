"""The driver's MLflow writes when the tracking store goes away: retried with back-off, kept on disk
meanwhile, delivered in order when the store answers again (or by the next ``--resume``).

`BufferedClient` wraps the one `MlflowClient` of a search or an ablation. A write is sent at once
while the store answers and nothing is waiting; when it fails and the store does not answer a
probe (a ``/health`` request to a server, a cheap read otherwise), the write and every later one go
to ``<out>/mlflow_buffer.jsonl`` (one JSON object per line, flushed and fsynced), training goes
on, and the store is probed again after 1, 2, 4, ... 30 s. When it answers, the buffer is replayed
in order and removed. A write the store rejects while it answers is an error of the write, not
of the store: it is raised (or, from the buffer, skipped and counted).

A run created while the store is away gets a placeholder id (``pending-<hex>``) that later writes
use; the replay maps it to the real id. Replay is idempotent, so a driver killed during one can
replay the whole file again: a created run carries a ``hybridnas.write_id`` tag and is found again
by it instead of being created twice; tags, params and terminations are the same when repeated,
and MLflow keeps one point for a metric logged twice with the same timestamp.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

BUFFER_FILE = "mlflow_buffer.jsonl"
WRITE_TAG = "hybridnas.write_id"
PENDING = "pending-"
MAX_BACKOFF_S = 30.0

log = logging.getLogger("hybridnas")


def _now_ms() -> int:
    return int(time.time() * 1000)


class BufferedClient:
    """An `MlflowClient` whose writes survive the store going away (see the module docstring).

    Reads go straight to the client. ``timeout_s``: how long the store may stay away before
    ``on_expired`` is called (once; the search then stops cleanly). ``say`` gets a line when the
    store goes away and when it is back.
    """

    def __init__(
        self,
        client: Any,
        uri: str,
        path: str | os.PathLike,
        timeout_s: float = 600.0,
        say: Callable[[str], None] | None = None,
        on_expired: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self.uri = uri
        self.path = Path(path)
        self.timeout_s = float(timeout_s)
        self.say = say
        self.on_expired = on_expired
        self._ids: dict[str, str] = {}  # placeholder -> real run id
        self._queue: list[dict] = self._load()
        self.down_since: float | None = None
        self._backoff = 1.0
        self._next_try = 0.0
        self._expired_called = False
        self.skipped = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Writes waiting in the buffer."""
        return len(self._queue)

    @property
    def unreachable_s(self) -> float | None:
        return None if self.down_since is None else time.monotonic() - self.down_since

    @property
    def expired(self) -> bool:
        s = self.unreachable_s
        return s is not None and s > self.timeout_s

    def status(self) -> str:
        """A few words for the progress line while the store is away ('' while it answers)."""
        s = self.unreachable_s
        if s is None:
            return ""
        return f"mlflow unreachable for {s:.0f}s, {self.pending} writes kept in {self.path.name}"

    def __getattr__(self, name: str) -> Any:  # reads (get_run, search_runs, ...) and artifacts
        return getattr(self._client, name)

    # -- the writes the drivers make -------------------------------------------------------------

    def create_run(self, experiment_id: str, run_name: str | None = None, tags: dict | None = None, **_: Any):
        ref = PENDING + uuid.uuid4().hex
        op = {
            "op": "create_run",
            "ref": ref,
            "experiment_id": experiment_id,
            "run_name": run_name,
            "tags": {**(tags or {}), WRITE_TAG: ref},
            "start_time": _now_ms(),
        }
        run = self._write(op)
        return (
            run if run is not None else SimpleNamespace(info=SimpleNamespace(run_id=ref, run_name=run_name))
        )

    def log_batch(
        self, run_id: str, metrics: Iterable = (), params: Iterable = (), tags: Iterable = (), **_: Any
    ) -> None:
        self._write(
            {
                "op": "log_batch",
                "run_id": run_id,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                "params": [[p.key, p.value] for p in params],
                "tags": [[t.key, t.value] for t in tags],
            }
        )

    def set_tag(self, run_id: str, key: str, value: Any, **_: Any) -> None:
        self._write({"op": "set_tag", "run_id": run_id, "key": key, "value": str(value)})

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._write(
            {"op": "set_terminated", "run_id": run_id, "status": status, "end_time": end_time or _now_ms()}
        )

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        self._write({"op": "update_run", "run_id": run_id, "status": status, "name": name})

    def delete_run(self, run_id: str) -> None:
        self._write({"op": "delete_run", "run_id": run_id})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._write({"op": "log_text", "run_id": run_id, "text": text, "artifact_file": artifact_file})

    def log_inputs(self, run_id: str, datasets: Iterable = (), **_: Any) -> None:
        """Dataset inputs (`store.log_dataset`), kept as their fields: no arrays are ever logged."""
        self._write(
            {
                "op": "log_inputs",
                "run_id": run_id,
                "datasets": [
                    {
                        "dataset": {
                            k: getattr(d.dataset, k)
                            for k in ("name", "digest", "source_type", "source", "schema", "profile")
                        },
                        "tags": [[t.key, t.value] for t in d.tags],
                    }
                    for d in datasets
                ],
            }
        )

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        """A file of the output folder (it stays there, so a buffered upload can be replayed)."""
        self._write(
            {
                "op": "log_artifact",
                "run_id": run_id,
                "local_path": str(local_path),
                "artifact_path": artifact_path,
            }
        )

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self._write(
            {
                "op": "log_artifacts",
                "run_id": run_id,
                "local_dir": str(local_dir),
                "artifact_path": artifact_path,
            }
        )

    # -- delivery ------------------------------------------------------------------------------

    def _write(self, op: dict) -> Any:
        if not self._queue:
            try:
                return self._apply(op, replay=False)
            except Exception as e:  # noqa: BLE001 - sorted out by the probe below
                if self.reachable():
                    raise
                self._went_away(e)
        self._queue.append(op)
        self._append(op)
        self.poll()
        return None

    def poll(self, force: bool = False) -> bool:
        """Deliver the buffer if the store answers again (no more often than the back-off allows,
        unless ``force``). Calls ``on_expired`` once when the store stayed away too long.
        Returns True when nothing waits."""
        if not self._queue:
            return True
        now = time.monotonic()
        if force or now >= self._next_try:
            if self.reachable() and self._drain():
                return True
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            self._next_try = time.monotonic() + self._backoff
        if self.expired and not self._expired_called and self.on_expired is not None:
            self._expired_called = True
            self.on_expired()
        return False

    def flush(self, wait_s: float = 0.0) -> bool:
        """Deliver the buffer, waiting up to ``wait_s`` for the store; True when nothing waits."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while not self.poll(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self._backoff, left))
        return True

    def reachable(self) -> bool:
        """Whether the store answers now: a server's ``/health`` (2 s, no retries), else a read."""
        if urlsplit(self.uri).scheme in ("http", "https"):
            import urllib.error
            import urllib.request

            try:
                urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=2).close()
                return True
            except urllib.error.HTTPError:
                return True  # something answered
            except OSError:
                return False
        try:
            self._client.search_experiments(max_results=1)
            return True
        except Exception:  # noqa: BLE001 - any failure means: not now
            return False

    def _went_away(self, error: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self._backoff = 1.0
            self._next_try = self.down_since + self._backoff
            if self.say is not None:
                from hybridnas.runners.store import headline, redact

                self.say(
                    f"mlflow: the tracking store at {redact(self.uri)} is unreachable "
                    f"({headline(str(error))[:160]}); training goes on, its writes are kept in "
                    f"{self.path} until it answers (the search stops after {self.timeout_s:.0f}s without it)"
                )

    def _drain(self) -> bool:
        """Replay the buffer in order; True when all of it was delivered (the file is removed)."""
        n = len(self._queue)
        while self._queue:
            op = self._queue[0]
            try:
                self._apply(op, replay=True)
            except Exception as e:  # noqa: BLE001 - the store went away again, or rejects the write
                if not self.reachable():
                    self._rewrite()
                    return False
                self.skipped += 1
                log.warning("mlflow: a buffered %s was rejected and skipped: %s", op["op"], e)
            self._queue.pop(0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        away = self.unreachable_s
        self.down_since = None
        self._backoff = 1.0
        self._expired_called = False
        if self.say is not None:
            self.say(
                "mlflow: the tracking store answers again"
                + (f" after {away:.0f}s" if away is not None else "")
                + f"; {n} buffered writes delivered"
                + (f" ({self.skipped} rejected, see the log)" if self.skipped else "")
            )
        return True

    def _apply(self, op: dict, replay: bool) -> Any:
        from mlflow.entities import Metric, Param, RunTag

        c = self._client
        kind = op["op"]
        run_id = self._ids.get(op.get("run_id", ""), op.get("run_id"))
        if kind == "create_run":
            found = self._created_before(op) if replay else None
            run = found or c.create_run(
                op["experiment_id"], run_name=op["run_name"], tags=op["tags"], start_time=op["start_time"]
            )
            self._ids[op["ref"]] = run.info.run_id
            return run
        if run_id is None or run_id.startswith(PENDING):
            raise ValueError(f"{kind} of a run that was never created ({run_id})")
        if kind == "log_batch":
            c.log_batch(
                run_id,
                metrics=[Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op["metrics"]],
                params=[Param(k, v) for k, v in op["params"]],
                tags=[RunTag(k, v) for k, v in op["tags"]],
            )
        elif kind == "set_tag":
            c.set_tag(run_id, op["key"], op["value"])
        elif kind == "set_terminated":
            c.set_terminated(run_id, op["status"], end_time=op["end_time"])
        elif kind == "update_run":
            c.update_run(run_id, status=op["status"], name=op["name"])
        elif kind == "delete_run":
            c.delete_run(run_id)
        elif kind == "log_text":
            c.log_text(run_id, op["text"], op["artifact_file"])
        elif kind == "log_inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            c.log_inputs(
                run_id,
                datasets=[
                    DatasetInput(Dataset(**d["dataset"]), tags=[InputTag(k, v) for k, v in d["tags"]])
                    for d in op["datasets"]
                ],
            )
        elif kind == "log_artifact":
            c.log_artifact(run_id, op["local_path"], op["artifact_path"])
        elif kind == "log_artifacts":
            c.log_artifacts(run_id, op["local_dir"], op["artifact_path"])
        else:
            raise ValueError(f"unknown buffered write {kind!r}")
        return None

    def _created_before(self, op: dict) -> Any:
        """The run an earlier replay of this create already made (found by its write tag)."""
        runs = self._client.search_runs(
            [op["experiment_id"]], filter_string=f"tags.`{WRITE_TAG}` = '{op['ref']}'", max_results=1
        )
        return runs[0] if runs else None

    # -- the file ------------------------------------------------------------------------------

    def _load(self) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        ops = []
        for line in lines:
            try:
                ops.append(json.loads(line))
            except ValueError:
                break  # a line cut short by a kill: it and what follows were never acknowledged
        return ops

    def _append(self, op: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(op, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self) -> None:
        """What is left of the buffer, with the run ids known by now filled in."""
        from hybridnas.runners.files import atomic_write

        lines = []
        for op in self._queue:
            if op.get("run_id") in self._ids:
                op = {**op, "run_id": self._ids[op["run_id"]]}
            lines.append(json.dumps(op, sort_keys=True) + "\n")
        atomic_write(self.path, "".join(lines))

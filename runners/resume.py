"""What a search or an ablation keeps in its output folder to be resumed, and the parts of the
driver's life both share: the state file and its fingerprint, the parent-run guard, replaying
results a killed driver lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybridnas.runners.trial import STATUS_FAILED, STATUS_INFEASIBLE
from hybridnas.search_space.errors import UserError


class SearchError(UserError):
    """A search or ablation that cannot start or continue as asked (existing output, nothing to
    resume, the experiment changed since)."""


STATE_FILE = "state.json"


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
def parent_guard(client: Any, run_id: str) -> Iterator[None]:
    """The parent run ends KILLED on Ctrl-C (a second one, or before Tune's loop), FAILED with the
    error on anything else, never stuck in RUNNING."""
    from hybridnas.runners.store import set_tags

    try:
        yield
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            client.update_run(run_id, status="KILLED")
        raise
    except Exception as e:
        with contextlib.suppress(Exception):
            set_tags(client, run_id, {"hybridnas.error": f"{type(e).__name__}: {e}"[:5000]})
            client.set_terminated(run_id, "FAILED")
        raise


def replays_from_mlflow(client: Any, exp_id: str, parent: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Results and Optuna parameters of the finished trials of a search, by architecture hash."""
    from hybridnas.runners.store import FINAL_METRICS, FINISHED, child_runs

    results, params = {}, {}
    for run in child_runs(client, exp_id, parent):
        tags = run.data.tags
        h, status = tags.get("hybridnas.arch_hash"), tags.get("hybridnas.status")
        if h and status in FINISHED:
            r = {k: run.data.metrics[k] for k in FINAL_METRICS if k in run.data.metrics}
            r.update(status=status, trial_number=tags.get("hybridnas.trial"), arch_hash=h)
            if status == STATUS_FAILED:
                r["error"] = tags.get("hybridnas.error", "")
            if status == STATUS_INFEASIBLE:
                r["violations"] = tags.get("hybridnas.violations", "")
            results[h] = r
            params[h] = json.loads(tags.get("hybridnas.optuna_params") or "{}")
    return results, params

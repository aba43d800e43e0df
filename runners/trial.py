"""The trainable: one architecture trained in a Ray worker, reported to Tune (never to MLflow).

`hybridnas_trial` is a plain function (Ray Tune's function API) that reads a typed `TrialConfig`,
trains through `runners.train` and reports per-epoch and final results. Everything about scheduling
and tracking stays outside it. See the README's "Browse in MLflow" for what becomes of the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any

from hybridnas.runners.ray_runtime import WORKER_PRELOAD

STATUS_OK, STATUS_FAILED, STATUS_INFEASIBLE = "ok", "failed", "infeasible"
# Stopped at a rung by the scheduler (asha, moasha): decided by Tune in the driver, never reported
# by the trainable itself (its last result there says "running").
STATUS_STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """What one trial trains and how: the only shape a trial's Tune config takes.

    A search's Tune config is the searcher's proposal (`proposal`: the architecture and what the
    driver measured of it) merged with the recipe every trial shares (`recipe`); an ablation builds
    the whole thing. `hybridnas_trial` and the MLflow callback read it back with `from_config`.
    """

    arch: dict
    arch_hash: str
    trial_number: int | str
    data: dict
    train: dict
    predicted: dict = dataclasses.field(default_factory=dict)  # macs, flops, params, latency_ms
    feasible: bool = True
    violations: str = ""
    build_error: str = ""
    optuna_params: dict = dataclasses.field(default_factory=dict)
    cpus: float = 1.0
    faults: str = ""  # HYBRIDNAS_FAULTS (tests)
    replay: str | None = None  # the name of the resumed search's replay actor
    run_key: str = ""  # an ablation's (variant, seed) key, a repeat's (arch, seed)
    tags: dict = dataclasses.field(default_factory=dict)  # extra MLflow tags of the child run
    restarts: list = dataclasses.field(default_factory=list)  # epochs where the learning rate restarts

    PROPOSAL = (
        "arch",
        "arch_hash",
        "trial_number",
        "predicted",
        "feasible",
        "violations",
        "build_error",
        "optuna_params",
    )
    RECIPE = ("data", "train", "cpus", "faults", "replay", "restarts")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrialConfig:
        """From a Tune config: the whole config in a search, ``config["trial"]`` in an ablation."""
        if isinstance(config.get("trial"), Mapping):
            config = config["trial"]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - names
        if unknown:
            raise KeyError(f"unknown trial config keys {sorted(unknown)}")
        return cls(**{k: v for k, v in config.items() if k in names})


def proposal(**fields: Any) -> dict:
    """The searcher's part of a `TrialConfig` (``TrialConfig.PROPOSAL`` keys only)."""
    bad = set(fields) - set(TrialConfig.PROPOSAL)
    if bad:
        raise KeyError(f"not proposal keys: {sorted(bad)}")
    return fields


def recipe(**fields: Any) -> dict:
    """The part of a `TrialConfig` every trial of a search shares (``TrialConfig.RECIPE`` keys)."""
    bad = set(fields) - set(TrialConfig.RECIPE)
    if bad:
        raise KeyError(f"not recipe keys: {sorted(bad)}")
    return fields


# Test hook, read by the driver: "3:raise,5:diverge,6:crash" (Optuna trial numbers). raise: the
# trainable raises; diverge: it trains with an infinite learning rate; crash: its process exits.
FAULTS_ENV = "HYBRIDNAS_FAULTS"


_DATA_CACHE: dict[str, Any] = {}  # per worker process; reuse_actors keeps the process across trials


def cached_dataset(data_cfg: Mapping[str, Any]) -> Any:
    """The dataset of ``data_cfg``, loaded once per worker process; with it, under the same key
    plus ``"/info"``, what MLflow records of it (`runners.data.dataset_info`, as JSON)."""
    key = json.dumps(dict(data_cfg), sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        from hybridnas.runners.data import dataset_info, load_dataset
        from hybridnas.search_space.config import DataConfig

        _DATA_CACHE.clear()  # one dataset per search; do not hold two in memory
        cfg = DataConfig.from_dict(dict(data_cfg))
        _DATA_CACHE[key] = load_dataset(cfg)
        _DATA_CACHE[key + "/info"] = json.dumps(dataset_info(_DATA_CACHE[key], cfg))
    return _DATA_CACHE[key]


def _dataset_info(data_cfg: Mapping[str, Any]) -> str | None:
    """The JSON `cached_dataset` keeps of a loaded dataset; None when this process has not loaded it."""
    return _DATA_CACHE.get(json.dumps(dict(data_cfg), sort_keys=True, default=str) + "/info")


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (a direct call in a test)
        return ""


def _fault(t: TrialConfig) -> str | None:
    """The fault injected into this trial by ``HYBRIDNAS_FAULTS`` (tests only)."""
    for item in str(t.faults or "").split(","):
        number, _, kind = item.partition(":")
        if number.strip() and number.strip() in ("*", str(t.trial_number)):
            return kind.strip()
    return None


def _replayed(t: TrialConfig) -> dict | None:
    """The result this architecture already has in MLflow, when a resumed search runs it again
    (see `Replays`); None otherwise."""
    name = t.replay
    if not name:
        return None
    import ray

    try:
        actor = ray.get_actor(name)
    except ValueError:
        return None  # no resume in progress: the usual case
    return ray.get(actor.get.remote(t.arch_hash))


def hybridnas_trial(config: dict) -> None:
    """One trial: train ``t.arch`` and report per epoch, then the final metrics.

    Reports (``tune.report``) ``status: running`` once per epoch (epoch, train_loss, val_acc,
    imgs_per_s, epoch_time_s, the training time so far as train_time_s, and the driver-computed
    macs/flops/params/latency_ms, so a scheduler can rank trials by every objective at a rung),
    then one final result with ``status`` ok | failed | infeasible, train_time_s, imgs_per_s and,
    once the data is loaded, ``dataset`` (JSON of `runners.data.dataset_info`). With ``restarts``
    (the rungs of asha/moasha) the learning rate anneals at each rung
    (`runners.optim.restart_factor`). Never raises for a bad architecture or a diverging run: the
    error goes into the result.
    """
    from ray import tune

    started = time.time()
    # Whether this process had the trial's imports done before it got the trial (Ray's preloaded
    # workers, or an earlier trial on the same actor): a cold one pays ~4 s of imports in the trial.
    warm = all(m in sys.modules for m in WORKER_PRELOAD)
    t = TrialConfig.from_config(config)
    replay = _replayed(t)
    if replay is not None:
        tune.report({**replay, "replayed": True})
        return
    base = {
        **t.predicted,
        "trial_number": t.trial_number,
        "arch_hash": t.arch_hash,
        "started_at": started,
        "node_id": _node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "warm_start": warm,
    }
    if not t.feasible:
        tune.report({**base, "status": STATUS_INFEASIBLE, "violations": t.violations, "train_time_s": 0.0})
        return
    epoch, t_train = 0, None
    try:
        from hybridnas.runners.train import train_model
        from hybridnas.search_space.config import TrainConfig
        from hybridnas.search_space.spec import ArchSpec

        if t.build_error:
            raise RuntimeError(f"the driver could not build or measure this architecture: {t.build_error}")
        fault = _fault(t)
        if fault == "crash":
            os._exit(3)  # the worker process dies (as if killed by the OOM killer): Ray retries the trial
        if fault and fault.startswith("sleep"):  # a slow trial (``*:sleep3``): tests interrupt it
            time.sleep(float(fault[5:] or 1))
        if fault == "raise":
            raise RuntimeError(f"fault injected by {FAULTS_ENV} into trial {config.get('trial_number')}")
        spec = ArchSpec.from_dict(t.arch, warn=False)
        cfg = TrainConfig.from_dict(t.train)
        if fault == "diverge":
            # An infinite step size (past validation, which rejects it): the loss turns NaN at once.
            cfg = dataclasses.replace(cfg, lr=float("inf"))
        data = cached_dataset(t.data)
        threads = cfg.threads or max(1, int(t.cpus or 1))

        def on_epoch(m: dict) -> None:
            nonlocal epoch
            epoch = int(m["epoch"])
            so_far = time.perf_counter() - t_train
            tune.report({**base, **m, "train_time_s": so_far, "status": "running"})

        t_train = time.perf_counter()
        res = train_model(spec, data, cfg, callback=on_epoch, threads=threads, restarts=t.restarts)
    except Exception as e:  # noqa: BLE001 - recorded as a failed trial; SystemExit (Tune's stop) passes
        tune.report(
            {
                **base,
                "status": STATUS_FAILED,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=20),
                "epoch": getattr(e, "epoch", epoch),  # TrainingDiverged says in which epoch
                "train_time_s": 0.0 if t_train is None else time.perf_counter() - t_train,
                **({"dataset": _dataset_info(t.data)} if t_train is not None else {}),
            }
        )
        return
    tune.report(
        {
            **base,
            "status": STATUS_OK,
            "epoch": res.epochs,
            "val_acc": res.val_acc,
            "train_loss": res.train_loss,
            "train_time_s": res.train_time_s,
            "imgs_per_s": res.imgs_per_s,
            "precision": res.precision,
            "dataset": _dataset_info(t.data),
        }
    )

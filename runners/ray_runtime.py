"""The Ray runtime of a search or an ablation: start a local Ray (or join a cluster) once.

A local Ray prestarts one worker per trial slot and has it import what a trial needs before it
takes work, so the first trials start without paying torch's imports (`hybridnas bench search`
measures the start-up). Every Ray internal this relies on lives in `runners.ray_internals`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from hybridnas.runners import internals
from hybridnas.search_space.errors import UserError


class ClusterError(UserError):
    """The Ray cluster named by ``--address`` cannot be joined."""


DEFAULT_CONNECT_TIMEOUT_S = 30.0  # `--connect-timeout`: how long joining a cluster may take to fail
GCS_PORT = 6379  # what `ray start --head` listens on (HOST:PORT addresses)
CLIENT_PORT = 10001  # the Ray Client server (ray://HOST:PORT addresses)
# Both are gRPC servers, so both answer an HTTP/2 client preface with a SETTINGS frame (type 4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """The (host, port) ``--address`` names; None for ``auto`` without ``RAY_ADDRESS`` (Ray looks up
    the cluster this machine last started, and says at once when there is none)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "") or "auto"
        if address == "auto":
            return None
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://")
    try:
        parts = urlsplit("//" + rest)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or parts.path not in ("", "/"):
        raise ClusterError(
            f"cannot join the Ray cluster at {address!r}: expected HOST:PORT, ray://HOST:PORT or auto"
        )
    return host, port or (CLIENT_PORT if client else GCS_PORT)


def probe_cluster(address: str, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when nothing that speaks Ray's protocol answers at ``address``.

    Ray itself waits on an absent GCS for minutes. One TCP connection says whether anything listens
    (a closed port fails at once); an HTTP/2 preface, answered by a SETTINGS frame, says whether it
    is a gRPC server like Ray's GCS and client server, not some other service on that port.
    """
    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    where = f"cannot join the Ray cluster at {address!r}"
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(_HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        raise ClusterError(
            f"{where}: no answer from {host}:{port} within {timeout:g} s (--connect-timeout)"
        ) from None
    except OSError as e:
        raise ClusterError(
            f"{where}: {host}:{port}: {e.strerror or e} (is `ray start --head` running there?)"
        ) from None
    if len(head) < 9 or head[3] != 0x04:
        raise ClusterError(f"{where}: {host}:{port} answers, but not as a Ray cluster (no gRPC server there)")


def available_resources() -> dict[str, float]:
    """CPUs and GPUs trials can get: the joined cluster's, else what a local Ray would see here."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        have = sys.modules["ray"].cluster_resources()
        return {"cpu": float(have.get("CPU", 0)), "gpu": float(have.get("GPU", 0))}
    import torch

    return {"cpu": float(os.cpu_count() or 1), "gpu": float(torch.cuda.device_count())}


def _quiet_env() -> None:
    # Before Ray Tune is imported: these are read at import or controller start.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network call home
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the record: no CSV/JSON/TB
    # Experiment snapshots (trial states + Optuna) every 2 s instead of Ray's adaptive >= 10 s, so a
    # killed driver loses little; a snapshot of a few dozen trials costs milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0 on restore too
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Per-epoch and infeasible results lack some objectives by design (the searcher handles them).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


# Imported by every worker process of a Ray started here, before it takes work (Ray's
# ``preload_python_modules``): torch (with torch._dynamo, which the optimizers import on first
# use), Tune's function-trainable machinery and this package's training path: about 4 s of imports
# per process (on this 2-core machine) otherwise paid by the first trial on it.
WORKER_PRELOAD = (
    "torch",
    "torch._dynamo",
    "ray.tune.trainable.function_trainable",
    "hybridnas.runners.trial",
    "hybridnas.runners.train",
    "hybridnas.runners.data",
    "hybridnas.search_space.build",
)


_LOCAL_RAY_SESSION: str | None = None  # the job id of the Ray that `init_ray` started in this process


def _ray_started_here() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_job_id() == _LOCAL_RAY_SESSION


@contextlib.contextmanager
def trial_actors_on_prestarted_workers(local: bool | None = None) -> Iterator[None]:
    """Let Tune's trial actors run on the workers Ray prestarted (and preloaded) at ``ray.init``.

    Tune gives its trial actors a runtime environment of a few environment variables
    (``PL_DISABLE_FORK=1`` and some propagated from the driver: ray.tune.execution.class_cache).
    Ray only hands an actor an idle worker of the same runtime environment, and it prestarts
    workers with none, so every trial actor got a fresh process and imported torch again (measured:
    the second slot's first trial started 7 s after Tune asked for it). For a Ray started by this
    process the variables are already in every worker's environment (inherited from the driver),
    so the trial actors can go without: the class cache's variable lists are emptied while Tune
    runs. A cluster's workers do not inherit the driver's environment: left as Tune has it.
    """
    if local is None:  # the callers' case: is this the Ray `init_ray` started here?
        local = _ray_started_here()
    if not local:
        yield
        return
    with internals.tune_actors_without_env_vars():
        yield


def _package_for_cluster() -> str:
    """The ``hybridnas`` package as one folder that Ray can ship to a cluster's nodes.

    Installed from a wheel, that is the package's own folder. In an editable install the
    subpackages live in the repository's top-level folders, so they are copied into one temporary
    ``hybridnas/`` tree (Python sources and the example files only)."""
    import importlib
    import shutil
    import tempfile

    import hybridnas

    root = Path(hybridnas.__file__).parent
    subs = ("blocks", "search_space", "runners", "experiments")
    if all((root / s / "__init__.py").is_file() for s in subs):
        return str(root)
    stage = Path(tempfile.mkdtemp(prefix="hybridnas-ship-")) / "hybridnas"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root, stage, ignore=ignore)
    for sub in subs:
        src = Path(importlib.import_module(f"hybridnas.{sub}").__path__[0])
        shutil.copytree(src, stage / sub, ignore=ignore, dirs_exist_ok=True)
    return str(stage)


def init_ray(
    address: str | None = None,
    workers: int | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> bool:
    """Start (or join) Ray unless this process already did (Ray then stays up until the process
    exits, so a second search reuses it). Returns True when started here.

    Joining ``address`` fails within ``connect_timeout`` seconds when no cluster answers there
    (`probe_cluster`).

    ``workers`` (the trials that run at once) caps the worker processes a local Ray prestarts and
    keeps idle (Ray's ``num_workers_soft_limit``; one per CPU otherwise): each one imports torch
    (~300 MB) up front, which is waste beyond the trial slots on a many-core machine. More are
    still started when needed."""
    _quiet_env()
    import ray

    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        probe_cluster(address, connect_timeout)
        try:
            # Ship this package's code with the job: nodes need only the dependencies installed.
            ray.init(address=address, runtime_env={"py_modules": [_package_for_cluster()]}, **common)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    else:
        # Ray starts one idle worker per CPU as soon as this driver connects; they import what a
        # trial needs while the driver sets the search up, and Tune's trial actors take them (see
        # `trial_actors_on_prestarted_workers`): the first trials start without paying the imports.
        os.environ.setdefault("PL_DISABLE_FORK", "1")  # what Tune gives its actors; inherited here
        slots = max(1, min(int(workers), os.cpu_count() or 1)) if workers else None
        # "local": a new Ray here. With no address Ray joins whatever RAY_ADDRESS or
        # /tmp/ray/ray_current_cluster names (`ray start`, ray.cluster_utils in another process)
        # and then refuses num_cpus; a cluster is joined with --address only.
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            _system_config=internals.worker_system_config(WORKER_PRELOAD, slots),
            **common,
        )
        global _LOCAL_RAY_SESSION
        _LOCAL_RAY_SESSION = ray.get_runtime_context().get_job_id()
    # Tune logs every failed trial with its traceback; the progress line and MLflow already say it.
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return True

"""The Python API: `hybridnas.search`, `ablate`, `train` and `profile` (see the README's "Python API").

Each call takes a file path or the object it describes, runs the same code as the command line and
returns a typed result. Library code sets process-wide state to do its work (torch's thread count,
warning filters, logger levels, a few environment variables read by Ray and MLflow, a local Ray);
each call here puts all of it back as it found it, so a notebook or a script keeps its settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridnas.runners.examples import resolve

if TYPE_CHECKING:
    from hybridnas.runners.ablation import AblationResult
    from hybridnas.runners.search import SearchResult
    from hybridnas.runners.train import TrainRun
    from hybridnas.search_space.ablation import AblationStudy
    from hybridnas.search_space.experiment import Experiment
    from hybridnas.search_space.spec import ArchSpec

Progress = bool | Callable[[str], None]


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """Restore, on the way out, what the library may change in this process: the environment,
    warning filters, every logger's level and handlers, torch's intra-op thread count, and a Ray
    that was not running before (shut down again)."""
    env = dict(os.environ)
    loggers = {
        name: lg for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }
    levels = {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for name, lg in loggers.items()}
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers))
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    ray = sys.modules.get("ray")
    ray_was_up = bool(ray is not None and ray.is_initialized())
    try:
        with warnings.catch_warnings():
            yield
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and not ray_was_up and ray.is_initialized():
            ray.shutdown()
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads if threads is not None else torch.get_num_threads())
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if not isinstance(lg, logging.Logger):
                continue
            if name in levels:  # loggers created by the call belong to modules it imported: kept
                lg.level, handlers, lg.propagate, lg.disabled = levels[name]
                lg.handlers[:] = handlers
        root.setLevel(root_state[0])
        root.handlers[:] = root_state[1]
        for k in set(os.environ) - set(env):
            del os.environ[k]
        for k, v in env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


def _say(progress: Progress) -> Callable[[str], None] | None:
    if callable(progress):
        return progress
    return (lambda line: print(line, flush=True)) if progress else None


def search(
    experiment: str | os.PathLike | Experiment,
    *,
    trials: int | None = None,
    epochs: int | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: Progress = False,
    connect_timeout: float | None = None,
) -> SearchResult:
    """Run (or resume) the search an experiment file describes; what `hybridnas search` does.

    ``experiment``: a path, YAML text or an `Experiment`. ``progress``: True prints the progress
    lines, a callable receives them. ``connect_timeout``: seconds joining ``address`` may take to
    fail (default 30). Returns the `SearchResult` (front, counts, exported files; when no trial
    trained, ``nothing_trained`` says why)."""
    from hybridnas.runners.search import apply_overrides, run_search
    from hybridnas.search_space.experiment import Experiment

    with preserved_process_state():
        exp = experiment if isinstance(experiment, Experiment) else Experiment.from_yaml(resolve(experiment))
        exp = apply_overrides(exp, trials, epochs)
        return run_search(
            exp,
            tracking_uri=tracking_uri,
            address=address,
            resume=resume,
            out_dir=out_dir,
            progress=_say(progress),
            connect_timeout=connect_timeout,
        )


def ablate(
    ablation: str | os.PathLike | AblationStudy,
    *,
    seeds: list[int] | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: Progress = False,
    connect_timeout: float | None = None,
) -> AblationResult:
    """Run (or resume) an ablation study; what `hybridnas ablate` does. Returns its table rows
    (when no trial trained, none, and ``nothing_trained`` says why)."""
    from hybridnas.runners.ablation import run_ablation
    from hybridnas.search_space.ablation import AblationStudy

    with preserved_process_state():
        study = (
            ablation
            if isinstance(ablation, AblationStudy)
            else AblationStudy.from_yaml(resolve(ablation), seeds=seeds)
        )
        return run_ablation(
            study,
            tracking_uri=tracking_uri,
            address=address,
            resume=resume,
            out_dir=out_dir,
            progress=_say(progress),
            connect_timeout=connect_timeout,
        )


def _spec(arch: str | os.PathLike | ArchSpec) -> ArchSpec:
    from hybridnas.search_space.spec import ArchSpec

    if isinstance(arch, ArchSpec):
        return arch
    arch = resolve(arch)  # a shipped example by name
    return ArchSpec.from_yaml(Path(arch) if isinstance(arch, os.PathLike) else arch)


def train(
    arch: str | os.PathLike | ArchSpec,
    *,
    data: str | None = None,
    root: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    out: str | os.PathLike | None = None,
    progress: Progress = False,
) -> TrainRun:
    """Train one architecture and write ``model.pt`` and ``arch.yaml``; what `hybridnas train` does.

    The recipe recorded in the architecture's provenance is used unless an argument overrides it."""
    from hybridnas.runners.train import train_arch

    say = _say(progress)
    with preserved_process_state():
        return train_arch(
            _spec(arch),
            data=data,
            root=root,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            precision=precision,
            threads=threads,
            out=out,
            on_start=(lambda line, cfg: say(line)) if say else None,
            on_epoch=(
                lambda m: say(f"epoch {m['epoch']}: loss {m['train_loss']:.4f}  val_acc {m['val_acc']:.4f}")
            )
            if say
            else None,
        )


def profile(
    arch: str | os.PathLike | ArchSpec,
    *,
    latency: bool = False,
    device: str = "cpu",
    batch_size: int = 1,
    threads: int = 1,
) -> dict[str, Any]:
    """MACs, flops and params of an architecture, per stage too (`hybridnas profile`); with
    ``latency=True`` also its measured latency (``latency_ms``, median ms of a forward pass)."""
    from hybridnas.runners.latency import LatencyContext
    from hybridnas.runners.latency import latency as time_model
    from hybridnas.runners.macs import profile_spec
    from hybridnas.search_space.build import build_model

    spec = _spec(arch)
    with preserved_process_state():
        out = profile_spec(spec)
        if latency:
            inp = spec.input
            ctx = LatencyContext(device=device, batch_size=batch_size, threads=threads)
            out["latency_ms"] = time_model(build_model(spec), (inp.channels, inp.size, inp.size), ctx)[
                "median_ms"
            ]
        return out

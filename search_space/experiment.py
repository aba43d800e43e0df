"""`Experiment`: the experiment (search) file, every section validated and its defaults filled.

::

    name: quickstart
    data: {dataset: mnist5k, val_fraction: 0.2, seed: 0}
    train: {epochs: 2, batch_size: 128, optimizer: adamw, lr: 0.002}
    space: {...}                                   # see search_space/space.py
    objectives: [{metric: val_acc, mode: max}, {metric: macs, mode: min}]   # or just [val_acc, macs]
    constraints: {macs: {max: 2.0e7}}              # numbers may be written 20M, 1.5G, 2e7
    search: {sampler: nsga2, trials: 16, concurrency: 2, seed: 0, max_failures: 1}
    resources: {cpu: 1, gpu: 0}                    # per trial; fractions allowed
    latency: {device: cpu, batch_size: 1, threads: 1, clock: auto}   # clock: auto | wall | cpu
    tracking: {uri: sqlite:///mlflow.db, experiment: quickstart}
    out_dir: hybridnas_runs/quickstart             # the default

Only `space` is required; `name` defaults to the file's stem. The input (channels, size, classes) comes from
the dataset: for the datasets whose shape is fixed it is known here, so the space is checked against it before
any data is loaded (runners/data.py remains the source of truth at run time).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checks import as_choice, as_float, as_int, check_mapping, key_path, type_name
from .config import MAX_CONCURRENCY, MAX_SEED, DataConfig, TrainConfig
from .errors import SpecError, not_one_of
from .space import ENUMERATE_LIMIT, SearchSpace
from .spec import InputSpec
from .yaml_io import load_mapping

OBJECTIVE_METRICS = ("val_acc", "macs", "flops", "params", "latency_ms", "train_time_s")
CONSTRAINT_METRICS = ("macs", "flops", "params", "latency_ms")
MODES = ("min", "max")
SAMPLERS = ("tpe", "nsga2", "nsga3", "random", "grid")
SCHEDULERS = ("fifo", "asha", "moasha")
LATENCY_DEVICES = ("cpu", "cuda")
LATENCY_CLOCKS = ("auto", "wall", "cpu")  # auto: cpu with one thread on the CPU, else wall
EXPERIMENT_KEYS = (
    "name",
    "data",
    "train",
    "space",
    "objectives",
    "constraints",
    "search",
    "resources",
    "latency",
    "tracking",
    "out_dir",
)
# Shapes of the datasets whose shape is fixed: (channels, size, classes).
DATASET_INPUTS = {
    "mnist5k": (1, 28, 10),
    "digits": (1, 8, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
}
SYNTHETIC_DEFAULTS = (3, 16, 10)  # channels, size, classes of `synthetic` when not given
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "min" | "max"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode}


@dataclass(frozen=True)
class Bound:
    """A feasible interval; either end may be open (None)."""

    min: float | None = None
    max: float | None = None

    def violation(self, value: float) -> float:
        """How far `value` lies outside the interval (0.0 inside): Optuna's constraints convention, <= 0 is feasible."""
        over = value - self.max if self.max is not None else 0.0
        under = self.min - value if self.min is not None else 0.0
        return float(max(over, under, 0.0))

    def contains(self, value: float) -> bool:
        return self.violation(value) == 0.0

    def to_dict(self) -> dict:
        return {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}

    def describe(self, metric: str) -> str:
        if self.min is not None and self.max is not None:
            return f"{_num(self.min)} <= {metric} <= {_num(self.max)}"
        if self.max is not None:
            return f"{metric} <= {_num(self.max)}"
        return f"{metric} >= {_num(self.min)}"


@dataclass(frozen=True)
class SearchConfig:
    sampler: str = "tpe"
    trials: int = 20
    concurrency: int = 1
    seed: int = 0
    max_failures: int = 1  # Ray Tune retries of a trial whose worker failed
    # fifo: every trial trains train.epochs; asha: Ray's successive halving on the first objective;
    # moasha: successive halving ranked by all objectives (runners/scheduler.py)
    scheduler: str = "fifo"
    min_epochs: int = 1  # the first rung; rungs at min_epochs * reduction_factor^k below train.epochs
    reduction_factor: int = 3  # about 1 in reduction_factor trials at a rung goes on to the next
    repeats: int = 0  # extra seeds for every front member at the full budget

    def rungs(self, epochs: int) -> tuple[int, ...]:
        """The epochs at which asha/moasha decide (`rung_epochs`); none for fifo."""
        return () if self.scheduler == "fifo" else rung_epochs(self.min_epochs, epochs, self.reduction_factor)


def rung_epochs(min_epochs: int, epochs: int, reduction_factor: int) -> tuple[int, ...]:
    """``min_epochs * reduction_factor^k`` for every k with a value below ``epochs`` (the full
    budget is no rung: a trial that gets there has finished)."""
    out, r = [], min_epochs
    while r < epochs:
        out.append(r)
        r *= reduction_factor
    return tuple(out)


@dataclass(frozen=True)
class Resources:
    """Per trial; fractions allowed (two trials per GPU: gpu: 0.5)."""

    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True)
class LatencyConfig:
    device: str = "cpu"
    batch_size: int = 1
    threads: int = 1
    clock: str = "auto"  # what times a run: wall (perf_counter), cpu (the thread's CPU time), or auto


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # None: --tracking-uri, else sqlite:///mlflow.db in the working directory
    experiment: str = ""  # MLflow experiment name; defaults to the experiment's name


@dataclass(frozen=True)
class Experiment:
    name: str
    data: DataConfig
    train: TrainConfig
    space: SearchSpace
    objectives: tuple[Objective, ...]
    constraints: Mapping[str, Bound]
    search: SearchConfig
    resources: Resources
    latency: LatencyConfig
    tracking: TrackingConfig
    out_dir: str
    input: InputSpec  # what the space was checked against (the dataset's shape when known here)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    source_text: str | None = field(default=None, compare=False, repr=False)
    path: str | None = field(default=None, compare=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> Experiment:
        d, text, path = load_mapping(text_or_path, "an experiment")
        return cls.from_dict(d, path=path, source_text=text)

    @classmethod
    def from_dict(cls, d: Any, path: str | None = None, source_text: str | None = None) -> Experiment:
        d = check_mapping(d, "", EXPERIMENT_KEYS, required=("space",), what="an experiment mapping")
        name = _name(d, path)
        data = DataConfig.from_dict(d.get("data"), "data")
        train = TrainConfig.from_dict(d.get("train"), "train")
        space_d = d["space"]
        input = known_input(data)
        if input is not None and isinstance(space_d, Mapping) and space_d.get("input") is not None:
            own = InputSpec.from_dict(space_d["input"], "space.input")
            if own != input:
                raise SpecError(
                    "space.input",
                    f"dataset {data.dataset!r} gives {_shape(input)}, not {_shape(own)}; remove space.input "
                    "(the input comes from the data)",
                )
        space = SearchSpace.from_dict(space_d, "space", input=input)
        objectives = _objectives(d.get("objectives"))
        constraints = _constraints(d.get("constraints"))
        search = _search(d.get("search"))
        check_schedule(search, train, objectives, d.get("search"))
        if search.sampler == "grid":
            n = space.size()
            if n > ENUMERATE_LIMIT:
                raise SpecError(
                    "search.sampler",
                    f"grid over {n:,} architectures (at most {ENUMERATE_LIMIT:,}); fix more values",
                )
            if search.trials > n:
                warnings.warn(
                    f"search.trials: {search.trials} > {n} architectures in the grid; it runs {n}",
                    stacklevel=2,
                )
        resources = parse_resources(d.get("resources"))
        latency = parse_latency(d.get("latency"))
        tracking = parse_tracking(d.get("tracking"), name)
        out_dir = d.get("out_dir", f"hybridnas_runs/{name}")
        if not isinstance(out_dir, str) or not out_dir:
            raise SpecError("out_dir", f"expected a directory path, got {out_dir!r}")
        return cls(
            name=name,
            data=data,
            train=train,
            space=space,
            objectives=objectives,
            constraints=constraints,
            search=search,
            resources=resources,
            latency=latency,
            tracking=tracking,
            out_dir=out_dir,
            input=space.input,
            raw=d,
            source_text=source_text,
            path=path,
        )

    def to_resolved_dict(self) -> dict:
        """Every section with its defaults filled, as plain JSON-able data (logged as resolved_config.json)."""
        return {
            "name": self.name,
            "data": asdict(self.data),
            "train": self.train.to_dict(),
            "input": self.input.to_dict(),
            "space": self.space.to_dict(),
            "space_size": self.space.size(),
            "objectives": [o.to_dict() for o in self.objectives],
            "constraints": {k: b.to_dict() for k, b in self.constraints.items()},
            "search": asdict(self.search),
            "resources": asdict(self.resources),
            "latency": asdict(self.latency),
            "tracking": asdict(self.tracking),
            "out_dir": self.out_dir,
        }


def known_input(data: DataConfig) -> InputSpec | None:
    """The input a dataset gives, when it is known without loading it."""
    if data.dataset in DATASET_INPUTS:
        c, s, k = DATASET_INPUTS[data.dataset]
        return InputSpec(channels=c, size=s, classes=k)
    if data.dataset == "synthetic":  # the generator's defaults where the file leaves a field out
        c, s, k = SYNTHETIC_DEFAULTS
        return InputSpec(channels=data.channels or c, size=data.size or s, classes=data.classes or k)
    return None


def _shape(i: InputSpec) -> str:
    return f"{i.channels}x{i.size}x{i.size} images, {i.classes} classes"


def _num(x: float) -> str:
    return f"{x:.4g}"


def _name(d: dict, path: str | None) -> str:
    if "name" in d:
        name = d["name"]
    elif path:
        name = Path(path).stem
    else:
        raise SpecError("name", "required key is missing")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(
            "name",
            f"expected a name of letters, digits, '_', '.', '-' (at most 100, used in paths), got {name!r}",
        )
    return name


def number(value: Any, path: str) -> float:
    """A non-negative number; also ``5e7`` (YAML 1.1 reads it as a string) and suffixes ``20M``, ``1.5G``, ``300k``."""
    if isinstance(value, str):
        s = value.strip().replace("_", "")
        mult = 1.0
        if s and s[-1].lower() in _SUFFIX:
            s, mult = s[:-1], _SUFFIX[s[-1].lower()]
        try:
            value = float(s) * mult
        except ValueError:
            raise SpecError(path, f"expected a number (e.g. 2e7 or 20M), got {value!r}") from None
    v = as_float(value, path, 0.0)
    if not math.isfinite(v):
        raise SpecError(path, f"expected a finite number, got {value!r}")
    return v


def _objectives(value: Any) -> tuple[Objective, ...]:
    if value is None:
        return (Objective("val_acc", "max"),)
    if not isinstance(value, list) or not value:
        raise SpecError(
            "objectives", f"expected a non-empty list of {{metric, mode}}, got {type_name(value)}"
        )
    out: list[Objective] = []
    for i, o in enumerate(value):
        p = key_path("objectives", i)
        if isinstance(o, str):
            o = {"metric": o}
        o = check_mapping(
            o, p, ("metric", "mode"), required=("metric",), what="{metric, mode} or a metric name"
        )
        metric = as_choice(o["metric"], key_path(p, "metric"), OBJECTIVE_METRICS)
        mode = as_choice(o.get("mode", "max" if metric == "val_acc" else "min"), key_path(p, "mode"), MODES)
        if any(x.metric == metric for x in out):
            raise SpecError(key_path(p, "metric"), f"{metric!r} is already an objective")
        out.append(Objective(metric, mode))
    both = [i for i, o in enumerate(out) if o.metric in ("macs", "flops")]
    if len(both) == 2:
        raise SpecError(
            f"objectives[{both[1]}].metric", "macs and flops are one objective (flops = 2 * macs); keep one"
        )
    return tuple(out)


def _constraints(value: Any) -> dict[str, Bound]:
    if value is None:
        return {}
    d = check_mapping(value, "constraints", CONSTRAINT_METRICS, what="a mapping of metric: {min, max}")
    out = {}
    for metric, b in d.items():
        p = key_path("constraints", metric)
        if not isinstance(b, Mapping) and b is not None:
            raise SpecError(p, f"expected {{max: N}} and/or {{min: N}}, got {type_name(b)} {b!r}")
        b = check_mapping(b or {}, p, ("min", "max"))
        lo = None if b.get("min") is None else number(b["min"], key_path(p, "min"))
        hi = None if b.get("max") is None else number(b["max"], key_path(p, "max"))
        if lo is None and hi is None:
            raise SpecError(p, "give max and/or min")
        if lo is not None and hi is not None and lo > hi:
            raise SpecError(key_path(p, "min"), f"min {lo:g} is above max {hi:g}")
        out[metric] = Bound(lo, hi)
    return out


def _search(value: Any) -> SearchConfig:
    d = check_mapping({} if value is None else value, "search", SearchConfig.__dataclass_fields__)
    sampler = d.get("sampler", "tpe")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise not_one_of("search.sampler", sampler, SAMPLERS)
    scheduler = d.get("scheduler", "fifo")
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise not_one_of("search.scheduler", scheduler, SCHEDULERS)
    return SearchConfig(
        sampler=sampler,
        trials=as_int(d.get("trials", 20), "search.trials", 1, 1_000_000),
        concurrency=as_int(d.get("concurrency", 1), "search.concurrency", 1, MAX_CONCURRENCY),
        seed=as_int(d.get("seed", 0), "search.seed", 0, MAX_SEED),
        max_failures=as_int(d.get("max_failures", 1), "search.max_failures", 0, 100),
        scheduler=scheduler,
        min_epochs=as_int(d.get("min_epochs", 1), "search.min_epochs", 1),
        reduction_factor=as_int(d.get("reduction_factor", 3), "search.reduction_factor", 2, 100),
        repeats=as_int(d.get("repeats", 0), "search.repeats", 0, 100),
    )


def check_schedule(
    search: SearchConfig, train: TrainConfig, objectives: tuple[Objective, ...], raw: Any = None
) -> None:
    """The scheduler keys against the training length and the objectives (also after ``--epochs``).

    ``raw`` (the file's ``search:`` mapping) tells which keys were written: with ``fifo`` a written
    ``min_epochs`` or ``reduction_factor`` has no effect, and a warning says so.
    """
    metrics = [o.metric for o in objectives]
    if search.scheduler == "fifo":
        written = [k for k in ("min_epochs", "reduction_factor") if isinstance(raw, Mapping) and k in raw]
        if written:
            warnings.warn(
                f"search.{written[0]}: has no effect with scheduler: fifo (every trial trains "
                "train.epochs); set scheduler: moasha or asha to stop weak trials early",
                stacklevel=3,
            )
        return
    if search.min_epochs >= train.epochs:
        raise SpecError(
            "search.min_epochs",
            f"{search.min_epochs} is not below train.epochs ({train.epochs}): the first rung must come "
            "before the end of training; lower min_epochs or raise train.epochs",
        )
    if search.scheduler == "moasha" and len(objectives) < 2:
        raise SpecError(
            "search.scheduler",
            f"moasha ranks trials by several objectives, this search has one ({metrics[0]}); use "
            "scheduler: asha",
        )
    if "val_acc" not in metrics:
        raise SpecError(
            "search.scheduler",
            f"{search.scheduler} stops trials by their accuracy part-way through training, but val_acc "
            f"is not an objective ({', '.join(metrics)}); add it or use scheduler: fifo",
        )
    if search.scheduler == "asha" and metrics[0] != "val_acc":
        raise SpecError(
            "search.scheduler",
            f"asha ranks trials by the first objective, here {metrics[0]}, which training does not "
            "change; put val_acc first, or use scheduler: moasha",
        )
    if search.scheduler == "asha" and len(objectives) > 1:
        warnings.warn(
            f"search.scheduler: asha stops trials by val_acc alone, so {', '.join(metrics[1:])} play no "
            "part in which trials go on; moasha ranks them by every objective",
            stacklevel=3,
        )


def parse_resources(value: Any, path: str = "resources") -> Resources:
    """`resources:` (per trial; fractions allowed). Shared by experiment and ablation files."""
    r = _section(value, path, Resources)
    r = Resources(cpu=as_float(r.cpu, f"{path}.cpu", 0.0), gpu=as_float(r.gpu, f"{path}.gpu", 0.0))
    if r.cpu <= 0:
        raise SpecError(f"{path}.cpu", f"must be > 0, got {r.cpu}")
    return r


def parse_latency(value: Any, path: str = "latency") -> LatencyConfig:
    lat = _section(value, path, LatencyConfig)
    as_choice(lat.device, f"{path}.device", LATENCY_DEVICES)
    as_int(lat.batch_size, f"{path}.batch_size", 1, 4096)
    as_int(lat.threads, f"{path}.threads", 1, 1024)
    as_choice(lat.clock, f"{path}.clock", LATENCY_CLOCKS)
    if lat.clock == "cpu" and (lat.device != "cpu" or lat.threads != 1):
        raise SpecError(
            f"{path}.clock",
            f"'cpu' times the calling thread, so it needs device cpu and threads 1 (got device "
            f"{lat.device!r}, threads {lat.threads}); use wall or auto",
        )
    return lat


def parse_tracking(value: Any, default_experiment: str, path: str = "tracking") -> TrackingConfig:
    t = _section(value, path, TrackingConfig)
    if t.uri is not None and (not isinstance(t.uri, str) or not t.uri):
        raise SpecError(f"{path}.uri", f"expected a tracking URI string, got {t.uri!r}")
    if not isinstance(t.experiment, str):
        raise SpecError(f"{path}.experiment", f"expected a string, got {type_name(t.experiment)}")
    return TrackingConfig(uri=t.uri, experiment=t.experiment or default_experiment)


def _section(value: Any, path: str, cls: type) -> Any:
    """Keys checked; values type-checked by the caller (defaults from the dataclass)."""
    d = check_mapping({} if value is None else value, path, cls.__dataclass_fields__)
    return cls(**d)

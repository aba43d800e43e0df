"""The ablation file: a base architecture, the factors to vary, and the seeds.

```yaml
name: ablation_mixer
base: arch_base.yaml            # a path (relative to this file, then to the working directory) or a mapping
data: {dataset: mnist5k}
train: {epochs: 2}
vary: {stages.1.mixer: [conv, acmix, window], train.lr: [0.001, 0.004]}
mode: one_at_a_time             # the base plus each factor changed alone; or grid: every combination
seeds: [0, 1, 2]
```

Every variant is built here, before anything trains, so a factor path that does not exist or a value
that cannot be built fails with a `SpecError` naming the factor and the value.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import MAX_CONCURRENCY, MAX_SEED, DataConfig, TrainConfig, check_range
from .errors import SpecError, did_you_mean
from .experiment import (
    LatencyConfig,
    Resources,
    TrackingConfig,
    parse_latency,
    parse_resources,
    parse_tracking,
)
from .spec import ArchSpec
from .yaml_io import load_yaml, read_text

MODES = ("one_at_a_time", "grid")
KEYS = (
    "name",
    "base",
    "data",
    "train",
    "vary",
    "mode",
    "seeds",
    "resources",
    "concurrency",
    "latency",
    "tracking",
    "out_dir",
    "confidence",
)
BASE = "base"


@dataclass(frozen=True)
class Variant:
    """One architecture/training setting of the study; trained once per seed."""

    name: str  # "base" or "stages.1.mixer=acmix" (grid: "a=1, b=2")
    factors: tuple[tuple[str, Any], ...]  # the (path, value) pairs that differ from the base
    spec: ArchSpec
    train: TrainConfig

    @property
    def factor(self) -> str:
        return ", ".join(p for p, _ in self.factors) or BASE

    @property
    def value(self) -> str:
        return ", ".join(_fmt(v) for _, v in self.factors) or BASE

    @property
    def is_base(self) -> bool:
        return not self.factors


@dataclass(frozen=True)
class AblationStudy:
    name: str
    base: ArchSpec
    data: DataConfig
    train: TrainConfig
    vary: tuple[tuple[str, tuple[Any, ...]], ...]
    mode: str
    seeds: tuple[int, ...]
    resources: Resources
    concurrency: int
    latency: LatencyConfig
    tracking: TrackingConfig
    out_dir: str
    confidence: float = 0.95
    variants: tuple[Variant, ...] = field(default=(), compare=False)
    source_text: str = field(default="", compare=False, repr=False)
    path: str | None = field(default=None, compare=False)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path, seeds: list[int] | None = None) -> AblationStudy:
        # One loader for every file format: duplicate keys are errors, unreadable files one line.
        text, where = read_text(path_or_text)
        path = Path(where) if where else None
        raw = load_yaml(text, where)
        if isinstance(raw, dict) and "name" not in raw and path is not None:
            raw = {**raw, "name": path.stem}  # two files without a name never share a folder
        study = cls.from_dict(raw, base_dir=path.parent if path else Path.cwd(), seeds=seeds)
        return _with(study, source_text=text, path=where)

    @classmethod
    def from_dict(
        cls, raw: Any, base_dir: Path | None = None, seeds: list[int] | None = None
    ) -> AblationStudy:
        if not isinstance(raw, dict):
            raise SpecError("", f"an ablation file is a mapping with keys {', '.join(KEYS)}")
        for k in raw:
            if k not in KEYS:
                raise SpecError(str(k), f"unknown key; allowed: {', '.join(KEYS)}{did_you_mean(k, KEYS)}")
        for k in ("base", "vary"):
            if k not in raw:
                raise SpecError(k, "required key is missing")
        name = raw.get("name", "ablation")
        if not isinstance(name, str) or not name.strip():
            raise SpecError("name", f"expected a non-empty string, got {name!r}")
        base = _load_base(raw["base"], base_dir or Path.cwd())
        data = DataConfig.from_dict(raw.get("data"))
        train = TrainConfig.from_dict(raw.get("train"))
        mode = raw.get("mode", "one_at_a_time")
        if mode not in MODES:
            raise SpecError("mode", f"{mode!r} is not one of {', '.join(MODES)}{did_you_mean(mode, MODES)}")
        seeds_raw = seeds if seeds is not None else raw.get("seeds", [0, 1, 2])
        if (
            not isinstance(seeds_raw, list)
            or not seeds_raw
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds_raw)
        ):
            raise SpecError("seeds", f"expected a non-empty list of integers, got {seeds_raw!r}")
        for i, seed in enumerate(seeds_raw):
            check_range(seed, f"seeds[{i}]", 0, MAX_SEED)
        if len(set(seeds_raw)) != len(seeds_raw):
            raise SpecError("seeds", f"seeds must be distinct, got {seeds_raw!r}")
        if len(seeds_raw) < 2:
            warnings.warn(
                f"only {len(seeds_raw)} seed: the table will have no confidence intervals or p-values "
                "(use at least 2 seeds, better 3 or more)",
                stacklevel=2,
            )
        vary = _parse_vary(raw["vary"])
        concurrency = raw.get("concurrency", 2)
        if not isinstance(concurrency, int) or isinstance(concurrency, bool):
            raise SpecError("concurrency", f"expected a positive integer, got {concurrency!r}")
        check_range(concurrency, "concurrency", 1, MAX_CONCURRENCY)
        confidence = raw.get("confidence", 0.95)
        if not isinstance(confidence, (int, float)) or not 0.5 <= float(confidence) < 1.0:
            raise SpecError("confidence", f"expected a number in [0.5, 1), got {confidence!r}")
        tracking = parse_tracking(raw.get("tracking"), name)
        study = cls(
            name=name,
            base=base,
            data=data,
            train=train,
            vary=vary,
            mode=mode,
            seeds=tuple(seeds_raw),
            resources=parse_resources(raw.get("resources")),
            concurrency=concurrency,
            latency=parse_latency(raw.get("latency")),
            tracking=tracking,
            out_dir=str(raw.get("out_dir") or Path("hybridnas_runs") / name),
            confidence=float(confidence),
        )
        return _with(study, variants=tuple(_make_variants(study)))

    def trials(self) -> list[tuple[Variant, int]]:
        """Every (variant, seed) pair, base first."""
        return [(v, s) for v in self.variants for s in self.seeds]


def _with(study: AblationStudy, **changes: Any) -> AblationStudy:
    from dataclasses import replace

    return replace(study, **changes)


def _looks_like_path(x: str | Path) -> bool:
    return isinstance(x, Path) or ("\n" not in str(x) and str(x).endswith((".yaml", ".yml")))


def _fmt(v: Any) -> str:
    return (
        v
        if isinstance(v, str)
        else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
    )


def _load_base(base: Any, base_dir: Path) -> ArchSpec:
    if isinstance(base, dict):
        try:
            return ArchSpec.from_dict(base)
        except SpecError as e:
            raise SpecError(f"base.{e.path}" if e.path else "base", str(e).split(": ", 1)[-1]) from None
    if not isinstance(base, str):
        raise SpecError("base", f"expected a path to an architecture YAML or a mapping, got {base!r}")
    for candidate in (base_dir / base, Path(base)):
        if candidate.is_file():
            try:
                return ArchSpec.from_yaml(candidate)
            except SpecError as e:
                raise SpecError(f"base ({candidate})", str(e)) from None
    raise SpecError(
        "base", f"architecture file {base!r} not found (looked in {base_dir} and the working directory)"
    )


def _parse_vary(vary: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(vary, dict) or not vary:
        raise SpecError(
            "vary", "expected a mapping of key path -> list of values, e.g. {stages.1.mixer: [conv, acmix]}"
        )
    out = []
    for path, values in vary.items():
        if not isinstance(path, str):
            raise SpecError("vary", f"factor names are key paths like stages.1.mixer, got {path!r}")
        if not isinstance(values, list) or not values:
            raise SpecError(f"vary.{path}", f"expected a non-empty list of values, got {values!r}")
        if len({_fmt(v) for v in values}) != len(values):
            raise SpecError(f"vary.{path}", f"values must be distinct, got {values!r}")
        out.append((path, tuple(values)))
    return tuple(out)


def _apply(study: AblationStudy, factors: tuple[tuple[str, Any], ...]) -> tuple[ArchSpec, TrainConfig]:
    spec, train = study.base, study.train
    for path, value in factors:
        where = f"vary.{path}"
        if path.startswith("train."):
            key = path.split(".", 1)[1]
            if key not in train.to_dict():
                allowed = ", ".join(f"train.{k}" for k in train.to_dict())
                raise SpecError(where, f"no such training setting; allowed: {allowed}")
            try:
                train = TrainConfig.from_dict({**train.to_dict(), key: value})
            except SpecError as e:
                raise SpecError(where, f"value {value!r}: {str(e).split(': ', 1)[-1]}") from None
            continue
        try:
            spec = spec.replace_path(path, value)
        except SpecError as e:
            raise SpecError(where, f"value {_fmt(value)!r} cannot be applied to the base: {e}") from None
    return spec, train


def _base_value(study: AblationStudy, path: str) -> Any:
    """The base's value at a factor path, or a sentinel when the path has no single value (stages.*)."""
    if path.startswith("train."):
        return study.train.to_dict().get(path.split(".", 1)[1], _MISSING)
    node: Any = study.base.to_dict()
    for part in path.split("."):
        if part == "*":
            return _MISSING
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() and int(part) < len(node) else _MISSING
        elif isinstance(node, dict):
            node = node.get(part, _MISSING)
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


_MISSING = object()


def _make_variants(study: AblationStudy) -> list[Variant]:
    # Validate every (factor, value) on its own first so the error names the culprit.
    for path, values in study.vary:
        for value in values:
            _apply(study, ((path, value),))
    variants = [Variant(BASE, (), study.base, study.train)]
    if study.mode == "one_at_a_time":
        combos = [((path, v),) for path, values in study.vary for v in values]
    else:
        combos = [
            tuple(zip([p for p, _ in study.vary], vals))
            for vals in itertools.product(*[v for _, v in study.vary])
        ]
    seen = {(study.base.arch_hash(), _train_key(study.train))}
    for combo in combos:
        # Factors equal to the base's value do not change anything: they are the base.
        changed = tuple((p, v) for p, v in combo if _base_value(study, p) != v)
        spec, train = _apply(study, changed)
        key = (spec.arch_hash(), _train_key(train))
        if not changed or key in seen:
            continue
        seen.add(key)
        name = ", ".join(f"{p}={_fmt(v)}" for p, v in changed)
        variants.append(Variant(name, changed, spec, train))
    if len(variants) == 1:
        raise SpecError("vary", "every value equals the base: nothing to compare")
    return variants


def _train_key(train: TrainConfig) -> tuple:
    return tuple(sorted(train.to_dict().items()))

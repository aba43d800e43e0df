"""`ArchSpec`: one architecture, the YAML file that describes it, and its validation.

An architecture file (what `hybridnas export` writes and `train`/`profile` read)::

    input: {channels: 1, size: 28, classes: 10}
    stem: {channels: 32}
    norm: batchnorm
    drop_path: 0.0
    stages:
      - {mixer: conv, depth: 2, channels: 32, addon: none, downsample: none, mlp_ratio: 2.0, options: {kernel: 3}}
      - {mixer: acmix, depth: 1, channels: 64, addon: ca, downsample: spd, mlp_ratio: 2.0, options: {heads: 4}}
    head: {dropout: 0.0}

`metrics:` and `provenance:` blocks are kept through a round trip but are not part of the architecture: they
are ignored by the builder, by ``==`` and by `arch_hash()`. Options a stage does not set take the block's
default (``blocks.MIXERS[name].options``).

Every check raises `SpecError` naming the key path (``stages[2].mixer``), the bad value and what is allowed.
The checks live in `checks` (shared with `space`, `experiment` and `ablation`), the YAML reading and
writing in `yaml_io`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from hybridnas.blocks import ADDONS, ATTENTION_MIXERS, DOWNSAMPLES, MIXERS

from .checks import (
    EXTENT_OPTIONS,
    MAX_CHANNELS,
    MAX_DEPTH,
    MAX_MLP_RATIO,
    MAX_STAGES,
    NORMS,
    as_choice,
    as_float,
    as_int,
    check_heads,
    check_mapping,
    check_option,
    downsampled,
    key_path,
    mixer_error,
    type_name,
)
from .config import MAX_CLASSES, MAX_INPUT_CHANNELS, MAX_INPUT_SIZE
from .errors import SpecError, did_you_mean
from .yaml_io import flow_yaml, load_mapping, plain_data, yaml_scalar

# --------------------------------------------------------------------------------------------------------------
# the spec


class FrozenOptions(Mapping):
    """An immutable, hashable mapping of mixer options; compares equal to any mapping with the same items."""

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()):
        self._d = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self._d == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._d)

    def __reduce__(self):
        return (FrozenOptions, (self._d,))


@dataclass(frozen=True)
class InputSpec:
    """What the network eats: square images of `size` with `channels`, and how many `classes` it predicts."""

    channels: int = 1
    size: int = 28
    classes: int = 10

    @classmethod
    def from_dict(cls, d: Any, path: str = "input") -> InputSpec:
        d = check_mapping({} if d is None else d, path, [f.name for f in fields(cls)])
        return cls(
            channels=as_int(d.get("channels", 1), key_path(path, "channels"), 1, MAX_INPUT_CHANNELS),
            size=as_int(d.get("size", 28), key_path(path, "size"), 1, MAX_INPUT_SIZE),
            classes=as_int(d.get("classes", 10), key_path(path, "classes"), 1, MAX_CLASSES),
        )

    def to_dict(self) -> dict:
        return {"channels": self.channels, "size": self.size, "classes": self.classes}


@dataclass(frozen=True)
class StemSpec:
    """3x3 conv (stride 1, so the first stage sees the full resolution) + norm + GELU."""

    channels: int = 32

    def to_dict(self) -> dict:
        return {"channels": self.channels}


@dataclass(frozen=True)
class StageSpec:
    """One stage: an optional downsampling, then `depth` Blocks of `channels` with one mixer and add-on.

    `options` holds only what the file sets; the rest are the block's defaults.
    """

    mixer: str
    depth: int
    channels: int
    addon: str = "none"
    downsample: str = "none"
    options: Mapping[str, Any] = field(default_factory=FrozenOptions)
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.options, FrozenOptions):
            object.__setattr__(self, "options", FrozenOptions(self.options or {}))

    def to_dict(self) -> dict:
        return {
            "mixer": self.mixer,
            "depth": self.depth,
            "channels": self.channels,
            "addon": self.addon,
            "downsample": self.downsample,
            "mlp_ratio": self.mlp_ratio,
            "options": dict(self.options),
        }


@dataclass(frozen=True)
class HeadSpec:
    """Global average pool, LayerNorm, dropout, linear."""

    dropout: float = 0.0

    def to_dict(self) -> dict:
        return {"dropout": self.dropout}


STAGE_KEYS = ("mixer", "depth", "channels", "addon", "downsample", "mlp_ratio", "options")
ARCH_KEYS = ("input", "stem", "norm", "drop_path", "stages", "head", "metrics", "provenance")


def parse_stage(d: Any, path: str) -> StageSpec:
    """Types and names of one stage (context-free checks; `check_arch` does the rest)."""
    d = check_mapping(d, path, STAGE_KEYS, required=("mixer", "depth", "channels"))
    mixer = as_choice(d["mixer"], key_path(path, "mixer"), MIXERS)
    options_path = key_path(path, "options")
    raw_options = d.get("options") or {}
    if not isinstance(raw_options, Mapping):
        raise SpecError(options_path, f"expected a mapping of option: value, got {type_name(raw_options)}")
    options = {}
    for name, value in raw_options.items():
        options[name] = check_option(mixer, name, value, key_path(options_path, str(name)))
    return StageSpec(
        mixer=mixer,
        depth=as_int(d["depth"], key_path(path, "depth"), 1, MAX_DEPTH),
        channels=as_int(d["channels"], key_path(path, "channels"), 1, MAX_CHANNELS),
        addon=as_choice(d.get("addon", "none"), key_path(path, "addon"), ADDONS),
        downsample=as_choice(
            d.get("downsample", "none"), key_path(path, "downsample"), ["none", *DOWNSAMPLES]
        ),
        options=FrozenOptions(options),
        mlp_ratio=as_float(d.get("mlp_ratio", 2.0), key_path(path, "mlp_ratio"), 0.0625, MAX_MLP_RATIO),
    )


def stage_resolutions(size: int, downsamples: Iterable[str], path: str = "") -> list[int]:
    """Map side each stage's blocks see; SpecError when a stage would downsample a 1x1 map."""
    out, side, n = [], size, 0
    for i, ds in enumerate(downsamples):
        if ds != "none":
            if side == 1:
                raise SpecError(
                    key_path(key_path(path, "stages"), i) + ".downsample",
                    f"{ds!r} would downsample a 1x1 map: a {size}x{size} input is 1x1 after {n} "
                    f"downsamplings; use downsample: none here, or downsample in fewer stages",
                )
            side, n = downsampled(side), n + 1
        out.append(side)
    return out


def window_warnings(stage: StageSpec, side: int, stage_path: str) -> list[str]:
    """Attention extents larger than the map the stage sees (allowed: the block clamps them)."""
    if stage.mixer not in ATTENTION_MIXERS:
        return []
    msgs = []
    for name in EXTENT_OPTIONS:
        if name not in MIXERS[stage.mixer].options:
            continue
        value = stage.options.get(name, MIXERS[stage.mixer].options[name])
        if isinstance(value, int) and not isinstance(value, bool) and value > side:
            msgs.append(
                f"{key_path(stage_path, 'options.' + name)}: {name} {value} is larger than the "
                f"{side}x{side} map this stage sees; the block clamps it to the map"
            )
    return msgs


def check_arch(spec: ArchSpec, path: str = "", warn: bool = True) -> None:
    """Everything that needs more than one field: resolutions, head divisibility, what the blocks accept."""
    stages_path = key_path(path, "stages")
    sides = stage_resolutions(spec.input.size, [s.downsample for s in spec.stages], path)
    for i, (stage, side) in enumerate(zip(spec.stages, sides)):
        sp = key_path(stages_path, i)
        check_heads(stage.mixer, stage.channels, stage.options, sp)
        err = mixer_error(stage.mixer, stage.channels, stage.options)
        if err is not None:
            raise SpecError(
                key_path(sp, "options"), f"mixer {stage.mixer!r} with {stage.channels} channels: {err}"
            )
        if warn:
            for msg in window_warnings(stage, side, sp):
                warnings.warn(msg, UserWarning, stacklevel=3)


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: input, stem, stages, head. Build it with `search_space.build_model(spec)`."""

    input: InputSpec
    stem: StemSpec
    stages: tuple[StageSpec, ...]
    head: HeadSpec = field(default_factory=HeadSpec)
    norm: str = "batchnorm"
    drop_path: float = 0.0
    # Informational (written by export); not part of the architecture: excluded from ==, hash and arch_hash.
    metrics: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    provenance: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple):
            object.__setattr__(self, "stages", tuple(self.stages))

    # ---- dict / YAML ---------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Any, path: str = "", warn: bool = True) -> ArchSpec:
        """Validate a parsed architecture (SpecError on anything wrong; warnings for clamped windows)."""
        d = check_mapping(d, path, ARCH_KEYS, required=("stages",), what="an architecture mapping")
        # Checked in file order, so the first error reported is the first in the file.
        input = InputSpec.from_dict(d.get("input"), key_path(path, "input"))
        stem = check_mapping({} if d.get("stem") is None else d["stem"], key_path(path, "stem"), ["channels"])
        stem_channels = as_int(stem.get("channels", 32), key_path(path, "stem.channels"), 1, MAX_CHANNELS)
        norm = as_choice(d.get("norm", "batchnorm"), key_path(path, "norm"), NORMS)
        drop_path = as_float(d.get("drop_path", 0.0), key_path(path, "drop_path"), 0.0, 1.0, hi_open=True)
        stages = d["stages"]
        stages_path = key_path(path, "stages")
        if not isinstance(stages, list) or not stages:
            raise SpecError(
                stages_path, f"expected a non-empty list of stages, got {type_name(stages)} {stages!r}"
            )
        if len(stages) > MAX_STAGES:
            raise SpecError(stages_path, f"at most {MAX_STAGES} stages, got {len(stages)}")
        parsed = tuple(parse_stage(s, key_path(stages_path, i)) for i, s in enumerate(stages))
        head = check_mapping({} if d.get("head") is None else d["head"], key_path(path, "head"), ["dropout"])
        dropout = as_float(head.get("dropout", 0.0), key_path(path, "head.dropout"), 0.0, 1.0, hi_open=True)
        spec = cls(
            input=input,
            stem=StemSpec(stem_channels),
            stages=parsed,
            head=HeadSpec(dropout),
            norm=norm,
            drop_path=drop_path,
            metrics=None if d.get("metrics") is None else _extra(d["metrics"], key_path(path, "metrics")),
            provenance=None
            if d.get("provenance") is None
            else _extra(d["provenance"], key_path(path, "provenance")),
        )
        check_arch(spec, path, warn=warn)
        return spec

    def to_dict(self) -> dict:
        """Plain data, every field explicit (defaults included), metrics/provenance last when present."""
        d = {
            "input": self.input.to_dict(),
            "stem": self.stem.to_dict(),
            "norm": self.norm,
            "drop_path": self.drop_path,
            "stages": [s.to_dict() for s in self.stages],
            "head": self.head.to_dict(),
        }
        if self.metrics is not None:
            d["metrics"] = plain_data(self.metrics, "metrics")
        if self.provenance is not None:
            d["provenance"] = plain_data(self.provenance, "provenance")
        return d

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike, warn: bool = True) -> ArchSpec:
        """From YAML text or a file path (str or Path)."""
        d, _, _ = load_mapping(text_or_path, "an architecture")
        return cls.from_dict(d, warn=warn)

    def to_yaml(self) -> str:
        """The architecture file: one line per stage; `from_yaml(spec.to_yaml()) == spec`."""
        d = self.to_dict()
        lines = [
            f"input: {flow_yaml(d['input'])}",
            f"stem: {flow_yaml(d['stem'])}",
            f"norm: {yaml_scalar(d['norm'])}",
            f"drop_path: {yaml_scalar(d['drop_path'])}",
            "stages:",
            *(f"  - {flow_yaml(s)}" for s in d["stages"]),
            f"head: {flow_yaml(d['head'])}",
        ]
        text = "\n".join(lines) + "\n"
        for extra in ("metrics", "provenance"):
            if extra in d:
                text += yaml.safe_dump(
                    {extra: d[extra]}, sort_keys=False, default_flow_style=False, width=100
                )
        return text

    # ---- identity ------------------------------------------------------------------------------------------

    def arch_hash(self) -> str:
        """12 hex chars of the SHA-256 of the canonical JSON of the architecture (metrics/provenance excluded)."""
        d = self.to_dict()
        d.pop("metrics", None)
        d.pop("provenance", None)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def flat_params(self) -> dict[str, str | int | float]:
        """The architecture as flat ``a.b.c`` keys (stage indices 0-based), e.g. for MLflow params.

        Options appear only when the spec sets them (``stages.1.options.heads``); `None` values as ``"null"``.
        """
        out: dict[str, str | int | float] = {}
        for k, v in self.input.to_dict().items():
            out[f"input.{k}"] = v
        out["stem.channels"] = self.stem.channels
        out["norm"] = self.norm
        out["drop_path"] = self.drop_path
        for i, stage in enumerate(self.stages):
            for k, v in stage.to_dict().items():
                if k == "options":
                    for name, value in v.items():
                        out[f"stages.{i}.options.{name}"] = "null" if value is None else value
                else:
                    out[f"stages.{i}.{k}"] = v
        out["head.dropout"] = self.head.dropout
        return out

    def resolutions(self) -> list[int]:
        """Map side each stage's blocks see (after that stage's downsampling)."""
        return stage_resolutions(self.input.size, [s.downsample for s in self.stages])

    def replace(self, **changes: Any) -> ArchSpec:
        """A copy with top-level fields replaced, validated."""
        d = self.to_dict()
        for k, v in changes.items():
            d[k] = v.to_dict() if hasattr(v, "to_dict") else v
        return ArchSpec.from_dict(d, warn=False)

    def replace_path(self, path: str, value: Any) -> ArchSpec:
        """A validated copy with one value changed by key path.

        Paths: ``stem.channels``, ``norm``, ``drop_path``, ``head.dropout``, ``input.size``,
        ``stages.1.mixer``, ``stages.*.addon`` (every stage), ``stages.2.options.window``.
        Changing a mixer keeps only the options the new mixer accepts (``heads`` survives acmix -> window).
        A `None` value for an option removes it (back to the block's default).
        """
        if not isinstance(path, str) or not path:
            raise SpecError(str(path), "expected a key path such as stages.1.mixer")
        parts = path.split(".")
        d = self.to_dict()
        d.pop("metrics", None)
        d.pop("provenance", None)
        if parts[0] == "stages":
            if len(parts) < 3:
                raise SpecError(path, "expected stages.<index or *>.<key>, e.g. stages.1.mixer")
            n = len(d["stages"])
            if parts[1] == "*":
                indices = range(n)
            else:
                try:
                    i = int(parts[1])
                except ValueError:
                    raise SpecError(path, f"stage index must be an integer or *, got {parts[1]!r}") from None
                if not 0 <= i < n:
                    raise SpecError(path, f"no stage {i}: the spec has {n} stage(s), indices 0-{n - 1}")
                indices = [i]
            for i in indices:
                _set_stage(d["stages"][i], parts[2:], value, path)
        else:
            _set_nested(d, parts, value, path)
        return ArchSpec.from_dict(d, warn=False)


def _extra(value: Any, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise SpecError(path, f"expected a mapping, got {type_name(value)}")
    return plain_data(value, path)


def _set_stage(stage: dict, parts: list[str], value: Any, path: str) -> None:
    key = parts[0]
    if key == "options":
        if len(parts) == 1:
            stage["options"] = value
            return
        if len(parts) != 2:
            raise SpecError(path, "expected stages.<i>.options.<name>")
        if value is None:
            stage["options"].pop(parts[1], None)
        else:
            stage["options"][parts[1]] = value
        return
    if len(parts) != 1 or key not in stage:
        raise SpecError(
            path, f"unknown key {key!r}; allowed: {', '.join(STAGE_KEYS)}{did_you_mean(key, STAGE_KEYS)}"
        )
    if key == "mixer" and isinstance(value, str) and value in MIXERS:
        accepted = MIXERS[value].options
        stage["options"] = {k: v for k, v in stage["options"].items() if k in accepted}
    stage[key] = value


def _set_nested(d: dict, parts: list[str], value: Any, path: str) -> None:
    node = d
    for depth, key in enumerate(parts):
        if not isinstance(node, dict) or key not in node:
            allowed = list(node) if isinstance(node, dict) else []
            raise SpecError(
                path, f"no key {key!r} here; allowed: {', '.join(allowed)}{did_you_mean(key, allowed)}"
            )
        if depth == len(parts) - 1:
            node[key] = value
        else:
            node = node[key]

"""`SearchSpace`: many architectures, the `space:` part of an experiment file, sampled with Optuna define-by-run.

::

    space:
      stem: {channels: [16, 32]}               # a list is a choice, a scalar is fixed
      stages:
        - {mixer: [conv, window], depth: [1, 2], channels: [16, 32], addon: [none, gc], downsample: none}
        - {mixer: [conv, acmix], depth: 1, channels: 32, downsample: [conv, spd],
           mixer_options: {acmix: {kernel_att: [5, 7]}}}       # optional per-stage override of the global ones
      mixer_options:                           # conditional: sampled only in stages that chose that mixer
        window: {window: [4, 7], heads: [2, 4]}
        acmix: {heads: [2, 4]}
      norm: batchnorm                          # also optional: drop_path, head: {dropout}, input
      # a stage whose mixer is fixed may write its options directly: options: {window: [4, 7]}

Optuna parameter names are stable and readable: ``stem.channels``, ``stages.1.mixer``, ``stages.1.depth``,
``stages.1.window`` (an option), ``norm``. When two mixers of one stage give the same option different choice
lists, the name carries the mixer (``stages.1.acmix.heads``), because Optuna needs one fixed distribution per
name. Fixed values are not parameters.

Repair rule. Some option values are invalid for some widths (heads must divide the width; the blocks may add
rules of their own). Every option is sampled from its full choice list, so distributions stay static, and an
invalid combination is then replaced, deterministically, by the valid combination closest to it (fewest options
changed, then smallest total distance in list positions, then list order). The sampled value stays in the
trial's params; the trial's user attribute ``repaired`` records what was used instead. `size()` and
`enumerate()` count only valid combinations, so they list exactly the architectures `suggest()` can return.
A width that no combination fits is a SpecError when the space loads.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hybridnas.blocks import ADDONS, DOWNSAMPLES, MIXERS

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
    check_mapping,
    check_option,
    downsampled,
    key_path,
    mixer_error,
    type_name,
)
from .errors import SpecError
from .spec import ArchSpec, HeadSpec, InputSpec, StageSpec, StemSpec
from .yaml_io import load_mapping

ENUMERATE_LIMIT = 100_000
GRID_PARAM = "arch_index"  # the one parameter a grid search samples: an index into enumerate()
SPACE_KEYS = ("input", "stem", "norm", "drop_path", "head", "stages", "mixer_options")
STAGE_SPACE_KEYS = (
    "mixer",
    "depth",
    "channels",
    "addon",
    "downsample",
    "mlp_ratio",
    "mixer_options",
    "options",
)
STAGE_FIELDS = ("mixer", "depth", "channels", "addon", "downsample", "mlp_ratio")

Choices = tuple  # a non-empty tuple of distinct values


def choices(value: Any, path: str, parse: Callable[[Any, str], Any]) -> Choices:
    """A list is a choice among its items, anything else is fixed: a tuple of parsed, distinct values."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise SpecError(path, "empty list of choices: give at least one value")
        out = tuple(parse(v, key_path(path, i)) for i, v in enumerate(value))
    else:
        out = (parse(value, path),)
    # Distinct by type too (1 == 1.0 == True in Python).
    keys = [(type(v), v) for v in out]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise SpecError(key_path(path, i), f"duplicate choice {out[i]!r}")
    return out


def _ints(lo: int, hi: int) -> Callable[[Any, str], int]:
    return lambda v, p: as_int(v, p, lo, hi)


def _names(allowed: Sequence[str]) -> Callable[[Any, str], str]:
    return lambda v, p: as_choice(v, p, allowed)


def _parse_mixer_options(
    d: Any, path: str, mixers: Sequence[str] | None = None
) -> dict[str, dict[str, Choices]]:
    """``{mixer: {option: value or [choices]}}``."""
    if d is None:
        return {}
    allowed = list(MIXERS) if mixers is None else list(mixers)
    d = check_mapping(d, path, allowed, what="a mapping of mixer: {option: choices}")
    out: dict[str, dict[str, Choices]] = {}
    for mixer, opts in d.items():
        mp = key_path(path, mixer)
        if opts is None:
            out[mixer] = {}
            continue
        if not isinstance(opts, Mapping):
            raise SpecError(mp, f"expected a mapping of option: choices, got {type_name(opts)} {opts!r}")
        out[mixer] = {}
        for name, value in opts.items():
            op = key_path(mp, str(name))
            if name not in MIXERS[mixer].options:
                check_option(mixer, name, None, op)  # raises: unknown option, with did-you-mean
            out[mixer][name] = choices(value, op, lambda v, p, m=mixer, n=name: check_option(m, n, v, p))
    return out


@dataclass(frozen=True)
class StageChoices:
    """The choices of one stage; `options[mixer][option]` are the conditional option choices."""

    mixer: Choices
    depth: Choices
    channels: Choices
    addon: Choices
    downsample: Choices
    mlp_ratio: Choices
    options: Mapping[str, Mapping[str, Choices]]

    def to_dict(self) -> dict:
        d: dict[str, Any] = {k: list(getattr(self, k)) for k in STAGE_FIELDS}
        d["mixer_options"] = {
            m: {o: list(c) for o, c in opts.items()} for m, opts in self.options.items() if opts
        }
        return d


@dataclass(frozen=True)
class Param:
    """One Optuna parameter: its name, choices, and (for options) the mixer that makes it exist."""

    name: str
    choices: Choices
    condition: str | None = None  # e.g. "stages.1.mixer in (window, shifted_window)"


class SearchSpace:
    """Many architectures: per-stage choices, fixed values, conditional mixer options. Build with `from_dict`."""

    def __init__(
        self,
        stem_channels: Choices,
        stages: tuple[StageChoices, ...],
        input: InputSpec | None = None,
        norm: Choices = ("batchnorm",),
        drop_path: Choices = (0.0,),
        head_dropout: Choices = (0.0,),
        mixer_options: Mapping[str, Mapping[str, Choices]] | None = None,
        path: str = "space",
    ):
        self.stem_channels = tuple(stem_channels)
        self.stages = tuple(stages)
        self.input = input or InputSpec()
        self.norm = tuple(norm)
        self.drop_path = tuple(drop_path)
        self.head_dropout = tuple(head_dropout)
        self.mixer_options = {m: dict(o) for m, o in (mixer_options or {}).items()}
        self.path = path
        self._names = self._param_names()
        self._valid = self._valid_combos()
        self._checked: set[InputSpec] = set()
        self._enumerated: dict[InputSpec, list[ArchSpec]] = {}
        self.check(self.input, warn=True)

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Any, path: str = "space", input: InputSpec | None = None) -> SearchSpace:
        """Validate a `space:` mapping. `input` (from the dataset) overrides the space's own `input:`."""
        d = check_mapping(d, path, SPACE_KEYS, required=("stages",), what="a search space mapping")
        if input is None:
            input = InputSpec.from_dict(d.get("input"), key_path(path, "input"))
        stem = check_mapping({} if d.get("stem") is None else d["stem"], key_path(path, "stem"), ["channels"])
        head = check_mapping({} if d.get("head") is None else d["head"], key_path(path, "head"), ["dropout"])
        global_opts = _parse_mixer_options(d.get("mixer_options"), key_path(path, "mixer_options"))
        stages_path = key_path(path, "stages")
        raw_stages = d["stages"]
        if not isinstance(raw_stages, list) or not raw_stages:
            raise SpecError(stages_path, f"expected a non-empty list of stages, got {type_name(raw_stages)}")
        if len(raw_stages) > MAX_STAGES:
            raise SpecError(stages_path, f"at most {MAX_STAGES} stages, got {len(raw_stages)}")
        stages = tuple(
            _parse_stage(s, key_path(stages_path, i), global_opts) for i, s in enumerate(raw_stages)
        )
        return cls(
            stem_channels=choices(
                stem.get("channels", 32), key_path(path, "stem.channels"), _ints(1, MAX_CHANNELS)
            ),
            stages=stages,
            input=input,
            norm=choices(d.get("norm", "batchnorm"), key_path(path, "norm"), _names(NORMS)),
            drop_path=choices(
                d.get("drop_path", 0.0),
                key_path(path, "drop_path"),
                lambda v, p: as_float(v, p, 0.0, 1.0, True),
            ),
            head_dropout=choices(
                head.get("dropout", 0.0),
                key_path(path, "head.dropout"),
                lambda v, p: as_float(v, p, 0.0, 1.0, True),
            ),
            mixer_options=global_opts,
            path=path,
        )

    @classmethod
    def from_yaml(cls, text_or_path: Any, input: InputSpec | None = None) -> SearchSpace:
        """A YAML file (or text) that is either a bare space or an experiment file with a `space:` key."""
        d, _, _ = load_mapping(text_or_path, "a search space")
        if "space" in d and "stages" not in d:
            return cls.from_dict(d["space"], "space", input=input)
        return cls.from_dict(d, "space", input=input)

    def to_dict(self) -> dict:
        """Normalised plain data (every choice as a list); `from_dict(to_dict())` is the same space."""
        return {
            "input": self.input.to_dict(),
            "stem": {"channels": list(self.stem_channels)},
            "norm": list(self.norm),
            "drop_path": list(self.drop_path),
            "head": {"dropout": list(self.head_dropout)},
            "stages": [s.to_dict() for s in self.stages],
            "mixer_options": {
                m: {o: list(c) for o, c in opts.items()} for m, opts in self.mixer_options.items()
            },
        }

    def with_input(self, input: InputSpec) -> SearchSpace:
        """The same space for another input (checked against it)."""
        space = SearchSpace.from_dict(self.to_dict(), self.path, input=input)
        return space

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SearchSpace({len(self.stages)} stages, {self.size():,} architectures)"

    # ---- validity ------------------------------------------------------------------------------------------

    def _param_names(self) -> dict[tuple[int, str, str], str]:
        """(stage, mixer, option) -> Optuna parameter name, for options with more than one choice."""
        names = {}
        for i, st in enumerate(self.stages):
            by_option: dict[str, dict[str, Choices]] = {}
            for m in st.mixer:
                for opt, ch in st.options.get(m, {}).items():
                    if len(ch) > 1:
                        by_option.setdefault(opt, {})[m] = ch
            for opt, per_mixer in by_option.items():
                shared = len(set(per_mixer.values())) == 1 and opt not in STAGE_FIELDS
                for m in per_mixer:
                    names[(i, m, opt)] = f"stages.{i}.{opt}" if shared else f"stages.{i}.{m}.{opt}"
        return names

    def _valid_combos(self) -> dict[tuple[int, str, int], list[tuple]]:
        """(stage, mixer, width) -> the option combinations the blocks accept, in product order."""
        valid = {}
        for i, st in enumerate(self.stages):
            for m in st.mixer:
                opts = st.options.get(m, {})
                names = list(opts)
                for c in st.channels:
                    good, first_err = [], None
                    for combo in itertools.product(*(opts[n] for n in names)):
                        err = _heads_error(m, c, dict(zip(names, combo))) or mixer_error(
                            m, c, dict(zip(names, combo))
                        )
                        if err is None:
                            good.append(combo)
                        elif first_err is None:
                            first_err = err
                    if not good:
                        shown = ", ".join(f"{n} in {list(opts[n])}" for n in names) or "default options"
                        raise SpecError(
                            key_path(key_path(self.path, "stages"), i) + ".channels",
                            f"{c} channels fit no option choice of mixer {m!r} ({shown}): {first_err}",
                        )
                    valid[(i, m, c)] = good
        return valid

    def check(self, input: InputSpec, warn: bool = False) -> None:
        """SpecError when some choice of downsamplings is impossible for this input; warn on oversized windows."""
        if input in self._checked and not warn:
            return
        side_min, side_max, n_max = input.size, input.size, 0
        for i, st in enumerate(self.stages):
            can = any(ds != "none" for ds in st.downsample)
            must = all(ds != "none" for ds in st.downsample)
            if can:
                if side_min == 1:
                    raise SpecError(
                        key_path(key_path(self.path, "stages"), i) + ".downsample",
                        f"this stage can downsample a 1x1 map: a {input.size}x{input.size} input allows "
                        f"{_max_downsamplings(input.size)} downsamplings and the stages up to here can do {n_max + 1}; "
                        "make downsample: none possible or required in some stage",
                    )
                side_min, n_max = downsampled(side_min), n_max + 1
            if must:
                side_max = downsampled(side_max)
            if warn:
                self._warn_extents(i, st, side_max)
        self._checked.add(input)

    def _warn_extents(self, i: int, st: StageChoices, side_max: int) -> None:
        for m in st.mixer:
            defaults = MIXERS[m].options
            for opt in EXTENT_OPTIONS:
                if opt not in defaults or m in ("conv", "deform"):
                    continue
                values = st.options.get(m, {}).get(opt, (defaults[opt],))
                big = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > side_max]
                if big:
                    shown = ", ".join(map(str, big))
                    warnings.warn(
                        f"{key_path(key_path(self.path, 'stages'), i)}: mixer {m!r} with {opt} {shown}: larger than "
                        f"any map this stage can see (at most {side_max}x{side_max}); the block clamps it to the map",
                        UserWarning,
                        stacklevel=4,
                    )

    # ---- parameters ----------------------------------------------------------------------------------------

    def params(self) -> list[Param]:
        """Every Optuna parameter `suggest` may ask for, in the order it asks (fixed values are not params)."""
        out = []
        if len(self.stem_channels) > 1:
            out.append(Param("stem.channels", self.stem_channels))
        for i, st in enumerate(self.stages):
            for f in STAGE_FIELDS:
                if len(getattr(st, f)) > 1:
                    out.append(Param(f"stages.{i}.{f}", getattr(st, f)))
            seen: dict[str, Param] = {}
            for m in st.mixer:
                for opt, ch in st.options.get(m, {}).items():
                    name = self._names.get((i, m, opt))
                    if name is None:
                        continue
                    if name in seen:
                        seen[name] = Param(name, ch, f"{seen[name].condition[:-1]}, {m})")
                    else:
                        seen[name] = Param(name, ch, f"stages.{i}.mixer in ({m})")
            out.extend(seen.values())
        for name, ch in (
            ("norm", self.norm),
            ("drop_path", self.drop_path),
            ("head.dropout", self.head_dropout),
        ):
            if len(ch) > 1:
                out.append(Param(name, ch))
        return out

    # ---- sampling ------------------------------------------------------------------------------------------

    def suggest(self, trial: Any, input: InputSpec | None = None, grid: bool | None = None) -> ArchSpec:
        """Sample one architecture with Optuna's define-by-run API (`optuna.trial.Trial`, also what Ray Tune's
        OptunaSearch passes to a define-by-run function).

        `input` comes from the dataset (default: the space's). With a `GridSampler` (auto-detected, or
        ``grid=True``) the trial samples only `arch_index`, an index into `enumerate()`; build the sampler from
        `grid_search_space()`.
        """
        input = input or self.input
        self.check(input)
        if grid is None:
            grid = _is_grid_trial(trial)
        if grid:
            archs = self.enumerate(input)
            return archs[trial.suggest_categorical(GRID_PARAM, list(range(len(archs))))]

        def pick(name: str, ch: Choices) -> Any:
            return ch[0] if len(ch) == 1 else trial.suggest_categorical(name, list(ch))

        repaired: dict[str, Any] = {}
        stem = pick("stem.channels", self.stem_channels)
        stages = []
        for i, st in enumerate(self.stages):
            mixer = pick(f"stages.{i}.mixer", st.mixer)
            depth = pick(f"stages.{i}.depth", st.depth)
            channels = pick(f"stages.{i}.channels", st.channels)
            addon = pick(f"stages.{i}.addon", st.addon)
            downsample = pick(f"stages.{i}.downsample", st.downsample)
            mlp_ratio = pick(f"stages.{i}.mlp_ratio", st.mlp_ratio)
            opts = st.options.get(mixer, {})
            names = list(opts)
            combo = tuple(pick(self._names.get((i, mixer, n), ""), opts[n]) for n in names)
            valid = self._valid[(i, mixer, channels)]
            if combo not in valid:
                fixed = _closest(combo, valid, [opts[n] for n in names])
                for n, used, sampled in zip(names, fixed, combo):
                    if used != sampled:
                        repaired[f"stages.{i}.options.{n}"] = used
                combo = fixed
            stages.append(
                StageSpec(
                    mixer=mixer,
                    depth=depth,
                    channels=channels,
                    addon=addon,
                    downsample=downsample,
                    options=dict(zip(names, combo)),
                    mlp_ratio=mlp_ratio,
                )
            )
        spec = ArchSpec(
            input=input,
            stem=StemSpec(stem),
            stages=tuple(stages),
            head=HeadSpec(pick("head.dropout", self.head_dropout)),
            norm=pick("norm", self.norm),
            drop_path=pick("drop_path", self.drop_path),
        )
        if repaired and hasattr(trial, "set_user_attr"):
            trial.set_user_attr("repaired", repaired)
        return spec

    def grid_search_space(self, input: InputSpec | None = None) -> dict[str, list[int]]:
        """The `search_space` for `optuna.samplers.GridSampler`: every index into `enumerate()`."""
        return {GRID_PARAM: list(range(self.size(input)))}

    # ---- counting ------------------------------------------------------------------------------------------

    def _stage_count(self, i: int) -> int:
        st = self.stages[i]
        combos = sum(len(self._valid[(i, m, c)]) for m in st.mixer for c in st.channels)
        return combos * len(st.depth) * len(st.addon) * len(st.downsample) * len(st.mlp_ratio)

    def size(self, input: InputSpec | None = None) -> int:
        """The exact number of distinct architectures `suggest` can return (valid option combinations only)."""
        self.check(input or self.input)
        stages = math.prod(self._stage_count(i) for i in range(len(self.stages)))
        return (
            len(self.stem_channels) * stages * len(self.norm) * len(self.drop_path) * len(self.head_dropout)
        )

    def _stage_variants(self, i: int) -> Iterator[StageSpec]:
        st = self.stages[i]
        for m in st.mixer:
            names = list(st.options.get(m, {}))
            for c in st.channels:
                for combo in self._valid[(i, m, c)]:
                    for depth, addon, ds, mlp in itertools.product(
                        st.depth, st.addon, st.downsample, st.mlp_ratio
                    ):
                        yield StageSpec(m, depth, c, addon, ds, dict(zip(names, combo)), mlp)

    def enumerate(self, input: InputSpec | None = None, limit: int = ENUMERATE_LIMIT) -> list[ArchSpec]:
        """Every architecture, in a fixed order (for grid search). SpecError above `limit`."""
        input = input or self.input
        n = self.size(input)
        if n > limit:
            raise SpecError(
                self.path,
                f"{n:,} architectures; enumerate() lists at most {limit:,}: fix more values or use another sampler",
            )
        if input not in self._enumerated:
            per_stage = [list(self._stage_variants(i)) for i in range(len(self.stages))]
            self._enumerated[input] = [
                ArchSpec(input, StemSpec(stem), tuple(stages), HeadSpec(hd), norm, dp)
                for stem in self.stem_channels
                for stages in itertools.product(*per_stage)
                for norm in self.norm
                for dp in self.drop_path
                for hd in self.head_dropout
            ]
        return list(self._enumerated[input])


def _parse_stage(d: Any, path: str, global_opts: Mapping[str, Mapping[str, Choices]]) -> StageChoices:
    d = check_mapping(d, path, STAGE_SPACE_KEYS, required=("mixer", "depth", "channels"))
    mixers = choices(d["mixer"], key_path(path, "mixer"), _names(list(MIXERS)))
    local = _parse_mixer_options(d.get("mixer_options"), key_path(path, "mixer_options"), mixers)
    if d.get("options") is not None:
        if len(mixers) != 1:
            raise SpecError(
                key_path(path, "options"),
                "options: needs a fixed mixer; with a choice of mixers use mixer_options: {mixer: {option: ...}}",
            )
        extra = _parse_mixer_options({mixers[0]: d["options"]}, key_path(path, "options"))
        local = {mixers[0]: {**local.get(mixers[0], {}), **extra[mixers[0]]}}
    options = {m: {**global_opts.get(m, {}), **local.get(m, {})} for m in mixers}
    return StageChoices(
        mixer=mixers,
        depth=choices(d["depth"], key_path(path, "depth"), _ints(1, MAX_DEPTH)),
        channels=choices(d["channels"], key_path(path, "channels"), _ints(1, MAX_CHANNELS)),
        addon=choices(d.get("addon", "none"), key_path(path, "addon"), _names(list(ADDONS))),
        downsample=choices(
            d.get("downsample", "none"), key_path(path, "downsample"), _names(["none", *DOWNSAMPLES])
        ),
        mlp_ratio=choices(
            d.get("mlp_ratio", 2.0),
            key_path(path, "mlp_ratio"),
            lambda v, p: as_float(v, p, 0.0625, MAX_MLP_RATIO),
        ),
        options=options,
    )


def _heads_error(mixer: str, channels: int, options: Mapping[str, Any]) -> str | None:
    if "heads" not in MIXERS[mixer].options:
        return None
    heads = options.get("heads", MIXERS[mixer].options["heads"])
    if isinstance(heads, int) and heads >= 1 and channels % heads:
        return f"heads {heads} does not divide {channels} channels"
    return None


def _max_downsamplings(size: int) -> int:
    n = 0
    while size > 1:
        size, n = downsampled(size), n + 1
    return n


def _closest(combo: tuple, valid: list[tuple], option_choices: list[Choices]) -> tuple:
    """The valid combination nearest to `combo`: fewest options changed, then list distance, then list order."""

    def position(ch: Choices, v: Any) -> int:
        return next(k for k, c in enumerate(ch) if c == v and type(c) is type(v))

    pos = [position(ch, v) for ch, v in zip(option_choices, combo)]

    def cost(item: tuple[int, tuple]) -> tuple[int, int, int]:
        order, cand = item
        cpos = [position(ch, v) for ch, v in zip(option_choices, cand)]
        return (sum(a != b for a, b in zip(pos, cpos)), sum(abs(a - b) for a, b in zip(pos, cpos)), order)

    return min(enumerate(valid), key=cost)[1]


def _is_grid_trial(trial: Any) -> bool:
    try:
        from optuna.samplers import GridSampler
    except ImportError:  # pragma: no cover - optuna is a dependency
        return False
    sampler = getattr(getattr(trial, "study", None), "sampler", None)
    return isinstance(sampler, GridSampler)

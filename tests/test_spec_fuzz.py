"""Fuzz the loaders: every mutated file either loads or raises the project's own error, nothing else.

Mutations of valid architecture, experiment and ablation dicts (random types, keys and values anywhere in
the tree), of their YAML text (inserted and deleted characters) and of the bytes of their files (binary
junk). An architecture that loads builds a working model; an experiment or ablation that loads has a
meaningful recipe (finite numbers, probabilities in [0, 1), seeds >= 0, ...). No TypeError, KeyError,
UnicodeDecodeError, RuntimeError, ...
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridnas.blocks import MIXERS
from hybridnas.search_space import ArchSpec, Experiment, SpecError, UserError, build_model
from hybridnas.search_space.ablation import AblationStudy
from hybridnas.search_space.config import MAX_EPOCHS, MAX_SEED, DataConfig, TrainConfig

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BASES: list[dict[str, Any]] = [
    {
        "input": {"channels": 1, "size": 12, "classes": 10},
        "stem": {"channels": 8},
        "norm": "batchnorm",
        "stages": [
            {"mixer": "conv", "depth": 1, "channels": 8, "options": {"kernel": 3}},
            {
                "mixer": "window",
                "depth": 2,
                "channels": 16,
                "downsample": "conv",
                "options": {"heads": 2, "window": 3},
            },
        ],
        "head": {"dropout": 0.1},
    },
    {
        "input": {"channels": 3, "size": 9, "classes": 4},
        "stem": {"channels": 8},
        "norm": "layernorm",
        "drop_path": 0.1,
        "stages": [
            {"mixer": "acmix", "depth": 1, "channels": 8, "addon": "ca", "options": {"heads": 2}},
            {
                "mixer": "slide",
                "depth": 1,
                "channels": 16,
                "addon": "gc",
                "downsample": "spd",
                "options": {"heads": 4},
            },
            {
                "mixer": "axial",
                "depth": 1,
                "channels": 16,
                "downsample": "patch_merge",
                "options": {"heads": 2},
            },
        ],
        "metrics": {"val_acc": 0.5},
    },
    {
        "input": {"channels": 1, "size": 8, "classes": 3},
        "stem": {"channels": 4},
        "stages": [
            {
                "mixer": "shifted_window",
                "depth": 2,
                "channels": 8,
                "options": {"heads": 2, "window": 2, "shift": 1},
            },
            {"mixer": "deform", "depth": 1, "channels": 8, "downsample": "conv", "mlp_ratio": 1.5},
        ],
    },
]

NAMES = [
    "conv", "acmix", "window", "shifted_window", "slide", "axial", "deform", "windw", "none", "gc", "ca", "spd",
    "patch_merge", "batchnorm", "layernorm", "heads", "kernel", "depth", "channels", "options", "mixer", "",
]  # fmt: skip
KEYS = ["mixer", "depth", "channels", "addon", "downsample", "options", "mlp_ratio", "heads", "window", "kernel",
        "shift", "span", "groups", "qkv_bias", "size", "classes", "stages", "stem", "input", "norm", "head", "bogus"]  # fmt: skip

plausible = st.one_of(st.sampled_from([1, 2, 3, 4, 8, 16, 0.5, 2.0]), st.sampled_from(NAMES))  # often valid
scalars = st.one_of(
    plausible,
    plausible,
    plausible,
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([0, 5, 7, 33, 64, 513, 10**9, -(2**70)]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=6),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=3),
    ),
    max_leaves=4,
)


def containers(node: Any) -> list[Any]:
    """Every dict and list in the tree, the root first: where a mutation can set, delete or add a value."""
    out = [node]
    for v in node.values() if isinstance(node, dict) else node if isinstance(node, list) else []:
        if isinstance(v, (dict, list)):
            out.extend(containers(v))
    return out


def mutate(data: st.DataObject, d: dict, keys: list[str] = KEYS) -> dict:
    d = copy.deepcopy(d)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        target = data.draw(st.sampled_from(containers(d)), label="where")
        op = data.draw(st.sampled_from(["set", "delete", "add"]), label="op")
        if isinstance(target, dict):
            if op == "add" or not target:
                target[data.draw(st.sampled_from(keys) | st.text(max_size=4), label="key")] = data.draw(
                    values
                )
            else:
                k = data.draw(st.sampled_from(list(target)), label="key")
                if op == "delete":
                    del target[k]
                else:
                    target[k] = data.draw(values, label="value")
        else:
            if op == "add" or not target:
                target.append(data.draw(values, label="item"))
            else:
                i = data.draw(st.integers(0, len(target) - 1), label="index")
                if op == "delete":
                    del target[i]
                else:
                    target[i] = data.draw(values, label="item")
    return d


def builds_or_spec_error(load) -> None:
    """`load()` gives a spec that builds, runs and round-trips, or raises SpecError; anything else fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # oversized windows warn; that is allowed
            spec = load()
    except SpecError:
        return
    assert ArchSpec.from_yaml(spec.to_yaml(), warn=False) == spec
    model = build_model(spec).eval()
    i = spec.input
    # Run small models only: the fuzz is about validation, not about big convolutions.
    if i.size * i.size * max([spec.stem.channels] + [s.channels for s in spec.stages]) <= 100_000:
        with torch.no_grad():
            out = model(torch.randn(1, i.channels, i.size, i.size))
        assert out.shape == (1, i.classes)


@SETTINGS
@given(data=st.data())
def test_mutated_arch_dicts_build_or_raise_spec_error(data):
    d = mutate(data, data.draw(st.sampled_from(BASES), label="base"))
    builds_or_spec_error(lambda: ArchSpec.from_dict(d))


@settings(SETTINGS, max_examples=100)
@given(
    base=st.sampled_from(BASES),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.text(max_size=3)), max_size=3),
)
def test_mutated_yaml_text_builds_or_raises_spec_error(base, edits):
    text = ArchSpec.from_dict(base, warn=False).to_yaml()
    for pos, insert in edits:  # delete one character at pos and insert some text there
        pos %= len(text)
        text = text[:pos] + insert + text[pos + 1 :]
    builds_or_spec_error(lambda: ArchSpec.from_yaml(text))


OPTION_POOL = {
    "heads": [1, 2, 3, 4, 8],
    "window": [1, 2, 3, 7],
    "kernel": [1, 3, 4, 5],
    "kernel_att": [3, 5, 7],
    "kernel_conv": [3],
    "shift": [None, 0, 1, 5],
    "span": [None, 1, 3],
    "groups": [1, 2, 3],
    "qkv_bias": [True, False],
}


@st.composite
def stage_dicts(draw: st.DrawFn) -> dict:
    """A well-typed stage: options mostly from the mixer's own set, values from plausible pools."""
    mixer = draw(st.sampled_from(list(MIXERS)))
    own = [k for k in MIXERS[mixer].options if k in OPTION_POOL]
    names = draw(st.lists(st.sampled_from(own), max_size=3, unique=True)) if own else []
    if draw(st.integers(0, 9)) == 0:  # now and then an option this mixer does not have
        names.append(draw(st.sampled_from(list(OPTION_POOL))))
    return {
        "mixer": mixer,
        "depth": draw(st.integers(1, 2)),
        "channels": draw(st.sampled_from([4, 6, 8, 12, 16])),
        "addon": draw(st.sampled_from(["none", "gc", "ca"])),
        "downsample": draw(st.sampled_from(["none", "none", "conv", "spd", "patch_merge"])),
        "options": {n: draw(st.sampled_from(OPTION_POOL[n])) for n in names},
    }


@settings(SETTINGS, max_examples=150)
@given(
    size=st.sampled_from([1, 2, 3, 5, 8, 12]),
    channels=st.sampled_from([1, 3]),
    norm=st.sampled_from(["batchnorm", "layernorm"]),
    stages=st.lists(stage_dicts(), min_size=1, max_size=3),
)
def test_recombined_plausible_stages_build_and_run_or_raise_spec_error(size, channels, norm, stages):
    """Well-typed values in every combination: option/width/resolution interplay reaches the blocks themselves."""
    d = {"input": {"channels": channels, "size": size, "classes": 3}, "stem": {"channels": 4}, "norm": norm,
         "stages": stages}  # fmt: skip
    builds_or_spec_error(lambda: ArchSpec.from_dict(d))


EXPERIMENT = {
    "name": "fuzz",
    "data": {"dataset": "mnist5k", "val_fraction": 0.2},
    "train": {"epochs": 1, "batch_size": 32},
    "space": {
        "stem": {"channels": [8, 16]},
        "stages": [{"mixer": ["conv", "window"], "depth": [1, 2], "channels": 16, "downsample": "conv"}],
        "mixer_options": {"window": {"window": [2, 4], "heads": [2, 4]}},
    },
    "objectives": [{"metric": "val_acc", "mode": "max"}, {"metric": "macs", "mode": "min"}],
    "constraints": {"macs": {"max": 1e7}},
    "search": {"sampler": "tpe", "trials": 4, "concurrency": 1, "seed": 0},
    "resources": {"cpu": 1, "gpu": 0},
    "latency": {"device": "cpu", "batch_size": 1, "threads": 1},
    "tracking": {"uri": "sqlite:///x.db"},
}


# The keys of the experiment and ablation files and of their train:/data: sections, so that "add" mutations
# hit real settings with random values.
FILE_KEYS = [
    "name", "data", "train", "space", "objectives", "constraints", "search", "resources", "latency", "tracking",
    "out_dir", "base", "vary", "mode", "seeds", "concurrency", "confidence", "dataset", "root", "val_fraction",
    "seed", "download", "size", "channels", "classes", "samples", "epochs", "batch_size", "optimizer", "lr",
    "weight_decay", "momentum", "warmup_epochs", "label_smoothing", "augment", "crop_padding", "device",
    "threads", "precision", "max_train_batches", "trials", "sampler", "cpu", "gpu", "max", "min", "uri",
    "stages.1.mixer", "train.lr", "train.label_smoothing", "bogus",
]  # fmt: skip
CONFIG_VALUES = st.one_of(
    values,
    st.sampled_from(
        [-1, 0, 1, 2.0, 0.5, 0.999, 10**12, -(10**12), 2**32, "nan", ".nan", "1e-3", "synthetic"]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
)


def set_recipe_value(data: st.DataObject, d: dict) -> None:
    """Set one train: or data: setting (a real key) to a random value: the values every trial depends on."""
    section, cls = data.draw(st.sampled_from([("train", TrainConfig), ("data", DataConfig)]), label="section")
    key = data.draw(st.sampled_from(list(cls.__dataclass_fields__)), label=f"{section} key")
    old = d.get(section) if isinstance(d.get(section), dict) else {}
    d[section] = {**old, key: data.draw(CONFIG_VALUES, label="value")}


def mutated_recipe(data: st.DataObject, base: dict) -> dict:
    """``base`` mutated anywhere (half the time) and with one train:/data: value set at random."""
    d = mutate(data, base, FILE_KEYS) if data.draw(st.booleans(), label="mutate") else copy.deepcopy(base)
    set_recipe_value(data, d)
    return d


def assert_meaningful_recipe(train: TrainConfig, data: DataConfig) -> None:
    """What a loaded train:/data: pair promises the trainer: every number finite and inside its range."""
    floats = (train.lr, train.weight_decay, train.momentum, train.warmup_epochs, train.label_smoothing)
    assert all(isinstance(v, float) and math.isfinite(v) for v in floats + (data.val_fraction,)), (
        train,
        data,
    )
    assert 0 < train.lr and train.weight_decay >= 0 and 0 < train.momentum < 1 and train.warmup_epochs >= 0
    assert 0 <= train.label_smoothing < 1 and 0 < data.val_fraction < 1
    assert 1 <= train.epochs <= MAX_EPOCHS and train.batch_size >= 1
    assert 0 <= train.seed <= MAX_SEED and 0 <= data.seed <= MAX_SEED
    assert train.threads >= 0 and train.crop_padding >= 0 and train.max_train_batches >= 0
    for n in (data.size, data.channels, data.classes, data.samples):
        assert n is None or (isinstance(n, int) and n >= 1)


def loads_or_raises_own_error(load) -> Any:
    """``load()``'s result, or None when it raised the project's own error (anything else fails the test)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one seed, a grid with few architectures: warnings are allowed
            return load()
    except UserError as e:
        assert "\n" not in str(e), f"a user error is one line: {e!s}"
        return None


def check_experiment(e: Experiment | None) -> None:
    if e is None:
        return
    assert_meaningful_recipe(e.train, e.data)
    assert math.isfinite(e.resources.cpu) and e.resources.cpu > 0 and e.resources.gpu >= 0
    assert e.search.trials >= 1 and 0 <= e.search.seed <= MAX_SEED and e.search.concurrency >= 1
    assert e.space.size() >= 1
    e.to_resolved_dict()


def check_ablation(a: AblationStudy | None) -> None:
    if a is None:
        return
    assert_meaningful_recipe(a.train, a.data)
    for v in a.variants:
        assert_meaningful_recipe(v.train, a.data)
    assert a.seeds and all(0 <= s <= MAX_SEED for s in a.seeds) and len(set(a.seeds)) == len(a.seeds)
    assert len(a.variants) >= 2 and a.variants[0].is_base and a.concurrency >= 1


def edit_text(text: str, edits: list[tuple[int, str]]) -> str:
    for pos, insert in edits:  # delete one character at pos and insert some text there
        pos %= max(1, len(text))
        text = text[:pos] + insert + text[pos + 1 :]
    return text


def edit_bytes(raw: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    for pos, insert in edits:
        pos %= max(1, len(raw))
        raw = raw[:pos] + insert + raw[pos + 1 :]
    return raw


TEXT_EDITS = st.lists(st.tuples(st.integers(0, 10_000), st.text(max_size=3)), max_size=3)
BYTE_EDITS = st.lists(
    st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=4)), min_size=1, max_size=3
)


@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_mutated_experiment_dicts_load_with_a_meaningful_recipe_or_raise_spec_error(data):
    d = mutated_recipe(data, EXPERIMENT)
    check_experiment(loads_or_raises_own_error(lambda: Experiment.from_dict(d)))


@settings(SETTINGS, max_examples=60)
@given(edits=TEXT_EDITS, byte_edits=st.none() | BYTE_EDITS)
def test_mutated_experiment_files_load_or_raise_a_user_error(edits, byte_edits):
    raw = edit_text(yaml.safe_dump(EXPERIMENT, sort_keys=False), edits).encode()
    if byte_edits:
        raw = edit_bytes(raw, byte_edits)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "fuzz.yaml"
        f.write_bytes(raw)
        check_experiment(loads_or_raises_own_error(lambda: Experiment.from_yaml(f)))


ABLATION = {
    "name": "fuzz",
    "base": BASES[0],
    "data": {"dataset": "synthetic", "size": 12, "channels": 1, "classes": 10, "samples": 200},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.002},
    "vary": {"stages.1.mixer": ["conv", "window"], "train.lr": [0.001, 0.004]},
    "mode": "one_at_a_time",
    "seeds": [0, 1],
    "concurrency": 2,
    "confidence": 0.95,
}


@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_mutated_ablation_dicts_load_with_a_meaningful_recipe_or_raise_spec_error(data):
    d = mutated_recipe(data, ABLATION)
    if data.draw(st.booleans(), label="a train factor"):
        key = data.draw(st.sampled_from(list(TrainConfig.__dataclass_fields__)), label="factor")
        if isinstance(d.get("vary"), dict):
            d["vary"][f"train.{key}"] = data.draw(
                st.lists(CONFIG_VALUES, min_size=1, max_size=3), label="levels"
            )
    check_ablation(
        loads_or_raises_own_error(lambda: AblationStudy.from_dict(d, base_dir=Path("/nonexistent")))
    )


@settings(SETTINGS, max_examples=60)
@given(edits=TEXT_EDITS, byte_edits=st.none() | BYTE_EDITS, inline=st.booleans())
def test_mutated_ablation_files_load_or_raise_a_user_error(edits, byte_edits, inline):
    with tempfile.TemporaryDirectory() as tmp:
        d = dict(ABLATION)
        if not inline:  # the base as a file next to the ablation file
            (Path(tmp) / "base.yaml").write_text(ArchSpec.from_dict(BASES[0], warn=False).to_yaml())
            d["base"] = "base.yaml"
        raw = edit_text(yaml.safe_dump(d, sort_keys=False), edits).encode()
        if byte_edits:
            raw = edit_bytes(raw, byte_edits)
        f = Path(tmp) / "fuzz_ablation.yaml"
        f.write_bytes(raw)
        check_ablation(loads_or_raises_own_error(lambda: AblationStudy.from_yaml(f)))

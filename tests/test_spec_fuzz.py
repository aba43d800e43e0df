"""Fuzz the loaders: every mutated spec either builds a working model or raises SpecError, nothing else.

Mutations of valid architecture dicts (random types, keys and values anywhere in the tree), of their YAML
text (inserted and deleted characters), and of experiment dicts. No TypeError, KeyError, RuntimeError, ...
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridnas.blocks import MIXERS
from hybridnas.search_space import ArchSpec, Experiment, SpecError, build_model

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


def mutate(data: st.DataObject, d: dict) -> dict:
    d = copy.deepcopy(d)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        target = data.draw(st.sampled_from(containers(d)), label="where")
        op = data.draw(st.sampled_from(["set", "delete", "add"]), label="op")
        if isinstance(target, dict):
            if op == "add" or not target:
                target[data.draw(st.sampled_from(KEYS) | st.text(max_size=4), label="key")] = data.draw(
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


@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_mutated_experiment_dicts_load_or_raise_spec_error(data):
    d = mutate(data, EXPERIMENT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = Experiment.from_dict(d)
    except SpecError:
        return
    assert exp.space.size() >= 1
    exp.to_resolved_dict()

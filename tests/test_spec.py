"""ArchSpec: YAML round trip, identity (==, arch_hash), errors with key paths, and the model builder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hybridnas.blocks import MIXERS
from hybridnas.search_space import ArchSpec, HybridNet, InputSpec, SpecError, StageSpec, build_model
from hybridnas.search_space.build import block_mixers

ROOT = Path(__file__).resolve().parents[1]
ARCH_FILES = sorted((ROOT / "experiments").glob("arch_*.yaml"))
ALL_MIXERS = list(MIXERS)


def arch(**top) -> dict:
    """A small valid architecture dict (conv only, so it builds as soon as blocks/conv.py exists)."""
    d = {
        "input": {"channels": 1, "size": 16, "classes": 10},
        "stem": {"channels": 8},
        "stages": [
            {"mixer": "conv", "depth": 1, "channels": 8},
            {"mixer": "conv", "depth": 2, "channels": 16, "addon": "none", "downsample": "conv"},
        ],
    }
    d.update(top)
    return d


def with_stage(i: int, **changes) -> dict:
    d = arch()
    d["stages"][i] = {**d["stages"][i], **changes}
    return d


def reorder(value):
    """The same data with every mapping's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


# ---- round trip and identity ---------------------------------------------------------------------------------


def test_experiments_has_at_least_two_architecture_files():
    assert len(ARCH_FILES) >= 2


@pytest.mark.parametrize("path", ARCH_FILES, ids=lambda p: p.name)
def test_architecture_files_round_trip_exactly(path):
    spec = ArchSpec.from_yaml(path)
    text = spec.to_yaml()
    again = ArchSpec.from_yaml(text)
    assert again == spec
    assert again.to_yaml() == text
    assert again.arch_hash() == spec.arch_hash()
    assert ArchSpec.from_yaml(str(path)) == spec  # a str path works like a Path


def test_round_trip_keeps_options_metrics_and_provenance():
    d = with_stage(1, options={"kernel": 5, "groups": 4}, mlp_ratio=3.0)
    d["metrics"] = {"val_acc": 0.9731, "macs": 123456, "history": [0.5, 0.9]}
    d["provenance"] = {"experiment": "quickstart", "trial": "7", "run_id": "abc", "version": "0.1.0"}
    d["drop_path"] = 1e-05
    spec = ArchSpec.from_dict(d)
    again = ArchSpec.from_yaml(spec.to_yaml())
    assert again == spec
    assert again.metrics == d["metrics"] and again.provenance == d["provenance"]
    assert again.stages[1].options == {"kernel": 5, "groups": 4}
    assert again.drop_path == 1e-05


def test_metrics_and_provenance_are_ignored_by_equality_hash_and_builder():
    plain = ArchSpec.from_dict(arch())
    tagged = ArchSpec.from_dict(arch(metrics={"val_acc": 0.5}, provenance={"trial": 3}))
    assert plain == tagged
    assert hash(plain) == hash(tagged)
    assert plain.arch_hash() == tagged.arch_hash()
    a, b = build_model(plain), build_model(tagged)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def test_arch_hash_does_not_depend_on_key_order():
    d = with_stage(1, options={"kernel": 5, "groups": 2})
    assert ArchSpec.from_dict(d).arch_hash() == ArchSpec.from_dict(reorder(d)).arch_hash()
    assert ArchSpec.from_dict(d) == ArchSpec.from_dict(reorder(d))


def test_arch_hash_is_the_same_in_another_process(tmp_path):
    d = with_stage(1, options={"kernel": 5})
    spec = ArchSpec.from_dict(d)
    f = tmp_path / "arch.json"
    f.write_text(json.dumps(reorder(d)))
    code = (
        "import json, sys; from hybridnas.search_space import ArchSpec; "
        "print(ArchSpec.from_dict(json.load(open(sys.argv[1]))).arch_hash())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(f)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == spec.arch_hash()
    assert len(spec.arch_hash()) == 12 and int(spec.arch_hash(), 16) >= 0


@pytest.mark.parametrize(
    "path, value",
    [
        ("stem.channels", 16),
        ("norm", "layernorm"),
        ("drop_path", 0.1),
        ("head.dropout", 0.2),
        ("input.size", 20),
        ("input.classes", 3),
        ("stages.0.depth", 2),
        ("stages.0.channels", 12),
        ("stages.1.addon", "gc"),
        ("stages.1.downsample", "spd"),
        ("stages.1.mlp_ratio", 4.0),
        ("stages.1.options.kernel", 5),
    ],
)
def test_every_architecture_field_changes_the_hash(path, value):
    spec = ArchSpec.from_dict(arch())
    other = spec.replace_path(path, value)
    assert other != spec
    assert other.arch_hash() != spec.arch_hash()


def test_options_are_immutable_and_compare_by_value():
    stage = StageSpec("conv", 1, 8, options={"kernel": 3})
    assert stage == StageSpec("conv", 1, 8, options={"kernel": 3})
    assert hash(stage) == hash(StageSpec("conv", 1, 8, options={"kernel": 3}))
    with pytest.raises(TypeError):
        stage.options["kernel"] = 5  # type: ignore[index]


def test_from_yaml_reads_text_str_path_and_pathlike(tmp_path):
    spec = ArchSpec.from_dict(arch())
    f = tmp_path / "a.yaml"
    f.write_text(spec.to_yaml())
    assert ArchSpec.from_yaml(f) == ArchSpec.from_yaml(str(f)) == ArchSpec.from_yaml(spec.to_yaml()) == spec


def test_flat_params_and_replace_path_agree():
    spec = ArchSpec.from_dict(with_stage(1, options={"kernel": 5}))
    flat = spec.flat_params()
    assert flat["stages.1.mixer"] == "conv" and flat["stages.1.options.kernel"] == 5
    assert flat["stem.channels"] == 8 and flat["input.size"] == 16
    assert all(isinstance(v, (str, int, float)) for v in flat.values())
    for key, value in flat.items():  # setting every param to its own value is the identity
        assert spec.replace_path(key, value) == spec


def test_replace_path_star_changes_every_stage():
    spec = ArchSpec.from_dict(arch()).replace_path("stages.*.addon", "gc")
    assert [s.addon for s in spec.stages] == ["gc", "gc"]


def test_replace_path_mixer_keeps_only_options_the_new_mixer_accepts():
    spec = ArchSpec.from_dict(with_stage(1, options={"kernel": 5, "groups": 2}))
    win = spec.replace_path("stages.1.mixer", "window")
    assert win.stages[1].mixer == "window"
    assert set(win.stages[1].options) <= set(MIXERS["window"].options)


@pytest.mark.parametrize(
    "path, value, where",
    [
        ("stages.5.mixer", "conv", "stages.5.mixer"),
        ("stages.1.mixr", "conv", "stages.1.mixr"),
        ("stem.width", 3, "stem.width"),
        ("stages.1.mixer", "windw", "stages[1].mixer"),
        ("stages.1.options.kernl", 3, "stages[1].options.kernl"),
        ("stages.1.channels", -1, "stages[1].channels"),
    ],
)
def test_replace_path_errors_name_the_path(path, value, where):
    with pytest.raises(SpecError) as e:
        ArchSpec.from_dict(arch()).replace_path(path, value)
    assert e.value.path == where


def test_resolutions_halve_with_ceil_and_keep_without_downsampling():
    d = arch(input={"channels": 1, "size": 7, "classes": 2})
    d["stages"].append({"mixer": "conv", "depth": 1, "channels": 16, "downsample": "spd"})
    assert ArchSpec.from_dict(d).resolutions() == [7, 4, 2]


# ---- errors ---------------------------------------------------------------------------------------------------

ERRORS = [
    # (yaml, key path, words the message must contain)
    (
        "stages:\n  - {mixer: conv, depth: 1, channels: 8}\n  - {mixer: windw, depth: 1, channels: 8}",
        "stages[1].mixer",
        ["'windw'", "conv, acmix, window", "did you mean 'window'"],
    ),
    (
        "stages:\n  - {mixer: conv, depth: 1, channels: 8}\n  - {mixer: window, depth: 1, channels: 8,"
        " options: {windw: 4}}",
        "stages[1].options.windw",
        ["unknown option", "did you mean 'window'"],
    ),
    ("stages:\n  - {mixer: conv, depth: two, channels: 8}", "stages[0].depth", ["integer", "'two'"]),
    ("stages:\n  - {mixer: conv, depth: 1, channels: 8.5}", "stages[0].channels", ["integer", "8.5"]),
    ("stages:\n  - {mixer: conv, depth: 0, channels: 8}", "stages[0].depth", [">= 1"]),
    (
        "stages:\n  - {mixer: conv, depth: 1, channels: 8, adon: gc}",
        "stages[0].adon",
        ["did you mean 'addon'"],
    ),
    ("stages:\n  - {mixer: conv, depth: 1}", "stages[0].channels", ["required"]),
    ("stem: {channels: 8}", "stages", ["required"]),
    ("stages: []", "stages", ["non-empty"]),
    ("stages: {mixer: conv}", "stages", ["list"]),
    ("norm: groupnorm\nstages:\n  - {mixer: conv, depth: 1, channels: 8}", "norm", ["batchnorm, layernorm"]),
    ("stages:\n  - {mixer: conv, depth: 1, channels: 8, addon: se}", "stages[0].addon", ["none, gc, ca"]),
    (
        "stages:\n  - {mixer: conv, depth: 1, channels: 8, downsample: pool}",
        "stages[0].downsample",
        ["none, conv, spd, patch_merge"],
    ),
    ("stages:\n  - {mixer: conv, depth: 1, channels: 8}\nhead: {dropout: 1.5}", "head.dropout", ["< 1.0"]),
    ("input: {channels: 1, size: 28, clases: 10}\nstages: []", "input.clases", ["did you mean 'classes'"]),
    ("stages:\n  - {mixer: window, depth: 1, channels: 30}", "stages[0].channels", ["heads 4", "30"]),
    (
        "stages:\n  - {mixer: window, depth: 1, channels: 32, options: {heads: 3}}",
        "stages[0].options.heads",
        ["not divisible", "1, 2, 4, 8, 16, 32"],
    ),
    (
        "stages:\n  - {mixer: window, depth: 1, channels: 32, options: {window: true}}",
        "stages[0].options.window",
        ["integer"],
    ),
    (
        "stages:\n  - {mixer: conv, depth: 1, channels: 8, options: {kernel: 4}}",
        "stages[0].options",
        ["kernel", "odd"],
    ),
    (
        "input: {size: 4}\nstages:\n" + "  - {mixer: conv, depth: 1, channels: 8, downsample: conv}\n" * 3,
        "stages[2].downsample",
        ["1x1", "after 2 downsamplings"],
    ),
    (
        "stages:\n  - {mixer: conv, depth: 1, channels: 8}\nmetrics: [1, 2]",
        "metrics",
        ["mapping"],
    ),
]


@pytest.mark.parametrize("text, path, words", ERRORS, ids=[e[1] for e in ERRORS])
def test_invalid_files_raise_spec_error_naming_path_value_and_allowed(text, path, words):
    with pytest.raises(SpecError) as e:
        ArchSpec.from_yaml(text)
    assert e.value.path == path, str(e.value)
    msg = str(e.value)
    assert msg.startswith(path + ": ")
    for w in words:
        assert w in msg, msg


def test_stage_paths_count_from_zero_and_deep_errors_name_the_stage():
    d = arch()
    d["stages"].append({"mixer": "conv", "depth": 1, "channels": 8, "options": {"groups": 3}})
    with pytest.raises(SpecError) as e:
        ArchSpec.from_dict(d)
    assert e.value.path == "stages[2].options" and "groups" in str(e.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("stages:\n  - {mixer: conv, depth: 1, channels: 8\n", ["line 3"]),
        ("stages:\n  - mixer: conv\n   depth: 1\n", ["line 3"]),
        (
            "stages:\n  - {mixer: conv, mixer: window, depth: 1, channels: 8}",
            ["duplicate key 'mixer'", "line 2"],
        ),
        ("", ["empty"]),
        ("- 1\n- 2\n", ["mapping", "list"]),
    ],
)
def test_malformed_yaml_is_a_spec_error_with_the_line(text, words):
    with pytest.raises(SpecError) as e:
        ArchSpec.from_yaml(text)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        ArchSpec.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="file not found"):
        ArchSpec.from_yaml(str(tmp_path / "nope.yaml"))


def test_window_larger_than_the_map_warns_and_still_builds():
    text = "input: {size: 8}\nstages:\n  - {mixer: window, depth: 1, channels: 8, downsample: conv, options: {heads: 2}}"
    with pytest.warns(
        UserWarning, match=r"stages\[0\]\.options\.window: window 7 is larger than the 4x4 map"
    ):
        spec = ArchSpec.from_yaml(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(spec)  # the builder does not warn again
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


# ---- builder --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 100), (3, 28, 7), (1, 32, 2)])
def test_builder_works_for_mnist_and_cifar_shapes_and_any_class_count(channels, size, classes):
    d = arch(input={"channels": channels, "size": size, "classes": classes})
    model = build_model(ArchSpec.from_dict(d))
    assert isinstance(model, HybridNet)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)


def test_builder_layout_stem_stages_head():
    spec = ArchSpec.from_dict(arch())
    model = build_model(spec)
    assert len(model.stages) == len(spec.stages)
    x = model.stem(torch.randn(1, 1, 16, 16))
    assert x.shape == (1, 8, 16, 16)  # stem keeps full resolution
    for stage, side, st in zip(model.stages, spec.resolutions(), spec.stages):
        x = stage(x)
        assert x.shape == (1, st.channels, side, side)
        assert len(stage.blocks) == st.depth
    assert model.head(x).shape == (1, 10)


def test_stage_zero_may_downsample_and_width_changes_without_downsampling_project():
    d = arch()
    d["stages"] = [
        {"mixer": "conv", "depth": 1, "channels": 12, "downsample": "conv"},
        {"mixer": "conv", "depth": 1, "channels": 24},  # width 12 -> 24 at the same resolution
    ]
    spec = ArchSpec.from_dict(d)
    assert spec.resolutions() == [8, 8]
    model = build_model(spec)
    x = model.stages[0](model.stem(torch.randn(1, 1, 16, 16)))
    assert x.shape == (1, 12, 8, 8)
    assert model.stages[1](x).shape == (1, 24, 8, 8)
    assert isinstance(model.stages[0].downsample, torch.nn.Module)


def test_drop_path_rises_linearly_over_all_blocks():
    spec = ArchSpec.from_dict(arch(drop_path=0.3))
    model = build_model(spec)
    rates = [b.drop_path.p for st in model.stages for b in st.blocks]
    assert rates == pytest.approx([0.0, 0.15, 0.3])


@pytest.mark.parametrize(
    "depth, kinds",
    [
        (1, ["shifted_window"]),
        (2, ["window", "shifted_window"]),
        (3, ["shifted_window", "window", "shifted_window"]),
        (4, ["window", "shifted_window", "window", "shifted_window"]),
    ],
)
def test_shifted_window_stages_alternate_and_end_on_a_shifted_block(depth, kinds):
    stage = StageSpec("shifted_window", depth, 8, options={"heads": 2, "window": 4})
    names = [name for name, _ in block_mixers(stage)]
    assert names == kinds
    for name, opts in block_mixers(stage):
        assert set(opts) <= set(MIXERS[name].options)


def test_built_shifted_window_stage_holds_regular_and_shifted_blocks():
    d = arch()
    d["stages"][1] = {"mixer": "shifted_window", "depth": 2, "channels": 16, "downsample": "conv"}
    model = build_model(ArchSpec.from_dict(d))
    kinds = [type(b.mixer) for b in model.stages[1].blocks]
    assert kinds == [MIXERS["window"], MIXERS["shifted_window"]]


@pytest.mark.parametrize("mixer", ALL_MIXERS)
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_every_mixer_builds_trains_one_step_and_round_trips(mixer, norm):
    d = arch(norm=norm, drop_path=0.1)
    d["stages"][1] = {"mixer": mixer, "depth": 2, "channels": 16, "addon": "ca", "downsample": "spd"}
    spec = ArchSpec.from_dict(d)
    assert ArchSpec.from_yaml(spec.to_yaml()) == spec
    model = build_model(spec)
    out = model(torch.randn(2, 1, 16, 16))
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_build_model_revalidates_specs_built_by_hand():
    bad = ArchSpec(InputSpec(), ArchSpec.from_dict(arch()).stem, (StageSpec("windw", 1, 8),))
    with pytest.raises(SpecError) as e:
        build_model(bad)
    assert e.value.path == "stages[0].mixer"
    with pytest.raises(SpecError) as e:
        build_model(ArchSpec(InputSpec(), bad.stem, (StageSpec("conv", "2", 8),)))  # type: ignore[arg-type]
    assert e.value.path == "stages[0].depth"


def test_validation_leaves_the_global_rng_alone_so_seeded_builds_repeat():
    d = arch()
    d["stages"][1] = {"mixer": "window", "depth": 1, "channels": 20, "options": {"heads": 5, "window": 3}}
    state = torch.get_rng_state()
    spec = ArchSpec.from_dict(d)  # first sight of this mixer config: the blocks are asked (and cached)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    first = build_model(spec.replace_path("stages.1.options.window", 2)).state_dict()
    torch.manual_seed(0)
    second = build_model(spec.replace_path("stages.1.options.window", 2)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)

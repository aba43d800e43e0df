"""Run names a person can read in the MLflow runs table and in every chart's legend.

A search's child run is named after its trial number and what the search varied, and marked with
its outcome: ``t07 s1:window(w4)+ca c32 [front]``. Only the choices that vary in the search space
appear (a space that only picks stage 1's mixer and add-on gives ``t07 s1:window+ca``), so names
stay short; the trial number keeps them unique within the search. Marks: ``[front]`` (on the
Pareto front, set once the front is known), ``[infeasible]`` (never trained), ``[failed]``,
``[stopped]`` (ended early by the scheduler) and ``[repeat seed N]`` (a front member trained
again with another seed). An ablation's child run is named after its variant and seed:
``s1.mixer=window seed1``. The whole architecture is in the tag ``hybridnas.arch``
(`arch_line`). Names are plain ASCII.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FRONT_MARK = "[front]"
STATUS_MARKS = {"infeasible": "[infeasible]", "failed": "[failed]", "stopped": "[stopped]"}
_STAGE_FIELDS = ("mixer", "depth", "channels", "addon", "downsample", "mlp_ratio")
# Mixer options, shortened the way the papers write them (w7 = a 7x7 window, h4 = 4 heads).
_OPTION_ABBREV = {
    "window": "w",
    "heads": "h",
    "kernel": "k",
    "kernel_att": "ka",
    "kernel_conv": "kc",
    "groups": "g",
    "shift": "sh",
    "span": "sp",
    "qkv_bias": "qkv",
}


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _options(opts: Any, names: Sequence[str] | None = None) -> str:
    """``(w4,h2)`` for the options ``names`` (all set ones when None) that the stage sets."""
    keys = [k for k in (opts or {}) if names is None or k in names]
    parts = [f"{_OPTION_ABBREV.get(k, k + '=')}{_num(opts[k])}" for k in keys if opts[k] is not None]
    return f"({','.join(parts)})" if parts else ""


def _varied_by_stage(
    varied: Sequence[str],
) -> tuple[dict[int, set[str]], dict[int, dict[str, str | None]], list[str]]:
    """Split parameter names (`SearchSpace.params`) into stage fields, stage options and the rest.

    Options are ``stages.i.<option>`` (shared by the mixers that have it) or
    ``stages.i.<mixer>.<option>`` (that mixer's only): option -> mixer (or None for shared).
    """
    fields: dict[int, set[str]] = {}
    options: dict[int, dict[str, str | None]] = {}
    rest = []
    for name in varied:
        parts = name.split(".")
        if parts[0] == "stages" and len(parts) in (3, 4) and parts[1].isdigit():
            i = int(parts[1])
            if len(parts) == 3 and parts[2] in _STAGE_FIELDS:
                fields.setdefault(i, set()).add(parts[2])
            elif len(parts) == 3:
                options.setdefault(i, {})[parts[2]] = None
            else:
                options.setdefault(i, {})[parts[3]] = parts[2]
        else:
            rest.append(name)
    return fields, options, rest


def varied_summary(spec: Any, varied: Sequence[str]) -> str:
    """What the search varied, as this architecture has it: ``s0:conv x2 s1:window(w4)+ca c32``.

    ``varied`` are the space's parameter names (``[p.name for p in space.params()]``). Per stage:
    the mixer with its varied options, ``+addon`` (nothing for none), ``x<depth>``, ``c<channels>``,
    ``><downsample>`` (nothing for none) and ``mlp<ratio>``; before the stages ``stem<channels>``,
    after them the norm, ``dp<drop path>`` and ``hd<head dropout>``.
    """
    fields, options, rest = _varied_by_stage(varied)
    tokens = []
    if "stem.channels" in rest:
        tokens.append(f"stem{spec.stem.channels}")
    for i, st in enumerate(spec.stages):
        f = fields.get(i, set())
        opts = [o for o, mixer in options.get(i, {}).items() if mixer in (None, st.mixer)]
        head = ""
        if "mixer" in f or opts:
            head = st.mixer + _options(st.options, opts)
        if "addon" in f and st.addon != "none":
            head += f"+{st.addon}"
        stage = [head] if head else []
        if "depth" in f:
            stage.append(f"x{st.depth}")
        if "channels" in f:
            stage.append(f"c{st.channels}")
        if "downsample" in f and st.downsample != "none":
            stage.append(f">{st.downsample}")
        if "mlp_ratio" in f:
            stage.append(f"mlp{_num(st.mlp_ratio)}")
        if stage:
            tokens.append(f"s{i}:" + " ".join(stage))
    if "norm" in rest:
        tokens.append(str(spec.norm))
    if "drop_path" in rest:
        tokens.append(f"dp{_num(spec.drop_path)}")
    if "head.dropout" in rest:
        tokens.append(f"hd{_num(spec.head.dropout)}")
    return " ".join(tokens)


def arch_line(spec: Any) -> str:
    """The whole architecture on one line, for the ``hybridnas.arch`` tag:
    ``stem c16 | conv(k3) x1 c16 | window(w4,h2) x1 c32 +ca >spd mlp2 | batchnorm``."""
    parts = [f"stem c{spec.stem.channels}"]
    for st in spec.stages:
        text = f"{st.mixer}{_options(st.options)} x{st.depth} c{st.channels}"
        if st.addon != "none":
            text += f" +{st.addon}"
        if st.downsample != "none":
            text += f" >{st.downsample}"
        parts.append(text + f" mlp{_num(st.mlp_ratio)}")
    tail = str(spec.norm)
    if spec.drop_path:
        tail += f" dp{_num(spec.drop_path)}"
    if spec.head.dropout:
        tail += f" hd{_num(spec.head.dropout)}"
    return " | ".join(parts + [tail])


def trial_name(number: Any, width: int, summary: str) -> str:
    """``t07 <summary>``: the trial number zero-padded to ``width`` digits, then what was varied."""
    n = str(number)
    label = f"t{n.zfill(width)}" if n.isdigit() else f"t{n}"
    return f"{label} {summary}".rstrip()


def ablation_name(variant: str, seed: Any) -> str:
    """``s1.mixer=window seed1`` (``stages.`` shortened to ``s``; a grid's factors joined by spaces)."""
    short = str(variant).replace("stages.", "s").replace(", ", " ")
    return f"{short} seed{seed}"


def digits(total: int) -> int:
    """How many digits the trial numbers 0 .. total-1 need (at least 2)."""
    return max(2, len(str(max(0, int(total) - 1))))


def marked(base: str, status: str | None = None, front: bool = False, repeat_seed: Any = None) -> str:
    """``base`` with its outcome marks: ``[repeat seed N]``, then the status's or ``[front]``."""
    name = base
    if repeat_seed is not None:
        name += f" [repeat seed {repeat_seed}]"
    mark = STATUS_MARKS.get(status or "")
    if mark:
        name += f" {mark}"
    elif front:
        name += f" {FRONT_MARK}"
    return name


def unmarked(name: str) -> str:
    """``name`` without a trailing ``[front]`` (the mark that changes when a search goes on)."""
    suffix = f" {FRONT_MARK}"
    return name[: -len(suffix)] if name.endswith(suffix) else name

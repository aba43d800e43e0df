"""`hybridnas space EXPERIMENT.yaml [--samples N] [--seed S]`: validate an experiment file, print its search
space (size and parameters) and a few randomly sampled architectures, one line per stage with MACs.

Sampling uses the same `SearchSpace.suggest` a search uses, driven by Optuna's seeded RandomSampler, so what is
printed is what a search could train. MACs come from `runners.macs.profile_spec` (attention counted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybridnas.search_space import ArchSpec, Experiment


def human(n: float | None) -> str:
    """12345678 -> '12.3M'."""
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def _profiler():
    """`runners.macs.profile_spec`, or None where it is not available (reported, never fatal)."""
    try:
        from hybridnas.runners.macs import profile_spec
    except ImportError as e:
        return None, f"MACs unavailable: {e}"
    return profile_spec, None


def _stage_value(stage: Any, key: str) -> Any:
    if isinstance(stage, dict):
        return stage.get(key)
    return stage if key == "macs" and isinstance(stage, (int, float)) else None


def _options(stage) -> str:
    return " ".join(f"{k}={'null' if v is None else v}" for k, v in stage.options.items()) or "-"


def format_arch(spec: ArchSpec, profile: dict | None) -> list[str]:
    """One line per stage: index, resolution, mixer, depth, width, add-on, downsample, options, MACs."""
    rows = [("stage", "res", "mixer", "depth", "ch", "addon", "down", "options", "MACs", "params")]
    stages_prof = (profile or {}).get("stages") or []
    for i, (stage, side) in enumerate(zip(spec.stages, spec.resolutions())):
        prof = stages_prof[i] if i < len(stages_prof) else None
        rows.append(
            (
                str(i),
                f"{side}x{side}",
                stage.mixer,
                str(stage.depth),
                str(stage.channels),
                stage.addon,
                stage.downsample,
                _options(stage),
                human(_stage_value(prof, "macs")),
                human(_stage_value(prof, "params")),
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def report(exp: Experiment, say: Callable[[str], None], samples: int = 3, seed: int = 0) -> list[ArchSpec]:
    """Hand ``say`` the experiment's summary, its space and ``samples`` sampled architectures, one
    line at a time; return the sampled architectures."""
    import optuna

    def p(*parts: Any) -> None:
        say(" ".join(str(x) for x in parts))

    space, inp = exp.space, exp.input
    p(f"{exp.path or exp.name}: valid")
    p(
        f"  name {exp.name}; data {exp.data.dataset} ({inp.channels}x{inp.size}x{inp.size}, {inp.classes} classes); "
        f"train {exp.train.epochs} epoch(s), batch {exp.train.batch_size}, {exp.train.optimizer} lr {exp.train.lr:g}"
    )
    p("  objectives: " + ", ".join(f"{o.metric} ({o.mode})" for o in exp.objectives))
    if exp.constraints:
        p("  constraints: " + ", ".join(b.describe(m) for m, b in exp.constraints.items()))
    s = exp.search
    p(
        f"  search: {s.sampler}, {s.trials} trials, concurrency {s.concurrency}, seed {s.seed}; "
        f"per trial cpu {exp.resources.cpu:g}, gpu {exp.resources.gpu:g}"
    )
    rungs = s.rungs(exp.train.epochs)
    if rungs or s.repeats:
        p(
            f"  scheduler: {s.scheduler}"
            + (
                f", rungs at epoch(s) {', '.join(map(str, rungs))}, reduction factor {s.reduction_factor}"
                if rungs
                else ""
            )
            + (f"; repeats: {s.repeats} more seed(s) per front member" if s.repeats else "")
        )
    params = space.params()
    p("")
    p(f"space: {len(space.stages)} stages, {space.size():,} distinct architectures, {len(params)} parameters")
    name_w = max((len(q.name) for q in params), default=0)
    for q in params:
        line = f"  {q.name.ljust(name_w)}  {' | '.join('null' if c is None else str(c) for c in q.choices)}"
        p(line + (f"    if {q.condition}" if q.condition else ""))
    if samples <= 0:
        return []

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    profile_spec, why = _profiler()
    p("")
    p(f"{samples} sampled architecture(s) (random sampler, seed {seed}):")
    if why:
        p(f"  ({why})")
    specs = []
    for k in range(samples):
        trial = study.ask()
        spec = space.suggest(trial, input=inp, grid=False)
        study.tell(trial, [0.0] * len(study.directions))
        specs.append(spec)
        prof = profile_spec(spec) if profile_spec else None
        head = f"#{k + 1}  arch {spec.arch_hash()}  stem {spec.stem.channels}"
        if prof:
            head += f"  MACs {human(prof.get('macs'))}  params {human(prof.get('params'))}"
            head += "  " + _feasibility(exp, prof)
        if trial.user_attrs.get("repaired"):
            head += f"  (repaired: {trial.user_attrs['repaired']})"
        p("")
        p(head)
        for line in format_arch(spec, prof):
            p(line)
    return specs


def _feasibility(exp: Experiment, prof: dict) -> str:
    bad = []
    for metric, bound in exp.constraints.items():
        if prof.get(metric) is None:
            continue  # latency is measured by a search, not here
        if not bound.contains(prof[metric]):
            bad.append(f"{metric} {human(prof[metric])} outside {bound.describe(metric)}")
    return "infeasible (never trained): " + "; ".join(bad) if bad else "feasible"

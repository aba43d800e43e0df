"""`hybridnas ablate`: one factor (or a grid of factors) of a base architecture, several seeds each.

Every (variant, seed) is one Ray Tune trial, run by the same trainable as a search
(`runners.search.hybridnas_trial`) and logged by the same driver-side MLflow callback: one parent
run for the study, one nested child run per trial tagged with ``factor``, ``value``, ``seed`` and
``variant``. The table at the end (`runners.ablation_table`) is built from what MLflow holds, so a
study continued with ``--resume`` reports every seed, and trains only the (variant, seed) pairs
that have no finished run yet.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridnas.runners.files import shown
from hybridnas.runners.resume import (
    Stop,
    check_can_start,
    check_state,
    close_orphans,
    fingerprint,
    nothing_trained,
    parent_guard,
    write_state,
)
from hybridnas.runners.trial import TrialConfig
from hybridnas.search_space.errors import SpecError, UserError

STATE_FILE = "ablation_state.json"
FILES = ("ablation.md", "ablation.csv", "ablation.tex", "ablation.png")


class AblationError(UserError):
    """A study that cannot start or continue as asked."""


@dataclasses.dataclass
class AblationResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    out_dir: Path
    rows: list  # list[ablation_table.Row]
    files: list[Path]
    trained: int  # trials run by this call (a resumed study skips the finished ones)
    skipped: int
    counts: dict[str, int]
    ui_command: str
    interrupted: bool = False
    stopped_by: str | None = None  # SIGINT | SIGTERM, when interrupted
    experiment_id: str = ""
    runs_url: str = ""  # the MLflow UI's runs table of the experiment (`runners.store.runs_url`)
    parent_url: str = ""  # the MLflow UI's page of the study's parent run
    nothing_trained: str | None = None  # why no trial trained, in one line (then there is no table)


def ablation_trial(config: dict) -> None:
    """The Tune trainable: the search's trainable on one (variant, seed) config."""
    from hybridnas.runners.trial import hybridnas_trial

    hybridnas_trial(config["trial"])


def _trial_key(variant: str, seed: int) -> str:
    return json.dumps([variant, seed])


def measure_variants(study: Any, input_spec: Any) -> dict[str, dict]:
    """MACs, FLOPs, params and latency of every variant, checking that each one builds.

    Runs before anything trains: a variant that cannot be built for this data is a `SpecError`
    naming the variant and the reason. An ablation has a handful of variants, so each one's latency
    is measured end to end (`runners.latency.latency`, median of 50 runs) rather than predicted
    from the lookup table a search needs for thousands of candidates.
    """
    from hybridnas.runners.latency import LatencyContext, latency
    from hybridnas.runners.macs import profile_spec
    from hybridnas.search_space.build import build_model

    ctx = LatencyContext.from_config(study.latency)
    out = {}
    for v in study.variants:
        if v.spec.input != input_spec:
            raise SpecError(
                "base.input",
                f"the architecture takes {_shape(v.spec.input)} but dataset {study.data.dataset!r} gives "
                f"{_shape(input_spec)}; set input: {{channels: {input_spec.channels}, size: {input_spec.size}, "
                f"classes: {input_spec.classes}}}",
            )
        try:
            p = profile_spec(v.spec)
        except (ValueError, RuntimeError) as e:
            raise SpecError(f"variant {v.name!r}", f"cannot be built: {e}") from None
        inp = v.spec.input
        lat = latency(build_model(v.spec), (inp.channels, inp.size, inp.size), ctx, runs=50)["median_ms"]
        out[v.name] = {"macs": p["macs"], "flops": p["flops"], "params": p["params"], "latency_ms": lat}
    return out


def _shape(i: Any) -> str:
    return f"{i.channels}x{i.size}x{i.size} with {i.classes} classes"


def _finished_runs(client: Any, exp_id: str, parent: str) -> dict[str, Any]:
    """Finished child runs of the study by (variant, seed) key; unfinished ones are deleted."""
    from hybridnas.runners.store import FINISHED, child_runs, close_unfinished_run

    done = {}
    for run in child_runs(client, exp_id, parent):
        tags = run.data.tags
        key = tags.get("hybridnas.run_key")
        if key and tags.get("hybridnas.status") in FINISHED:
            done[key] = run
        elif key:  # cut short by an interruption (or left RUNNING by a killed driver): it runs again
            close_unfinished_run(client, run)
            client.delete_run(run.info.run_id)
    return done


EXPERIMENT_NOTE = (
    "Ablations of hybrid conv/attention backbones by hybridnas: one parent run per study "
    "(tag hybridnas.kind = ablation) holding its table (ablation.md, also its description) and "
    "per-variant metrics (mean/, diff/, ci_low/, ci_high/), and one child run per variant and seed, "
    "tagged variant, factor, value and seed (group the runs by the tag variant to chart them)."
)


def _start_parent(client: Any, exp_id: str, study: Any, out: Path, uri: str) -> str:
    from hybridnas.runners.store import describe_experiment, log_params, provenance_tags, search_id, set_tags

    describe_experiment(client, exp_id, EXPERIMENT_NOTE)
    run = client.create_run(
        exp_id,
        run_name=study.name,
        tags={
            "hybridnas.kind": "ablation",
            "hybridnas.out_dir": str(out),
            "mlflow.note.content": f"hybridnas ablation {study.name}: {len(study.variants)} variants x "
            f"{len(study.seeds)} seeds",
        },
    )
    pid = run.info.run_id
    set_tags(client, pid, provenance_tags(study.path, search_id(study.name, pid)))
    params = {
        "mode": study.mode,
        "seeds": ",".join(map(str, study.seeds)),
        "variants": len(study.variants),
        "factors": ", ".join(p for p, _ in study.vary),
        "dataset": study.data.dataset,
        "epochs": study.train.epochs,
        "batch_size": study.train.batch_size,
        "lr": study.train.lr,
        "confidence": study.confidence,
        "base_arch_hash": study.base.arch_hash(),
    }
    log_params(client, pid, params)
    if study.source_text:
        client.log_text(pid, study.source_text, "ablation.yaml")
    client.log_text(pid, study.base.to_yaml(), "base_arch.yaml")
    return pid


def _results_from_mlflow(client: Any, exp_id: str, parent: str) -> tuple[list[dict], dict[str, int]]:
    from hybridnas.runners.store import child_runs

    results, counts = [], {"ok": 0, "failed": 0}
    for run in child_runs(client, exp_id, parent):
        tags, m = run.data.tags, run.data.metrics
        status = tags.get("hybridnas.status")
        if status in counts:
            counts[status] += 1
        if status != "ok" or "val_acc" not in m:
            continue
        results.append(
            {
                "variant": tags.get("variant"),
                "factor": tags.get("factor"),
                "value": tags.get("value"),
                "seed": int(tags.get("seed", 0)),
                **{k: m.get(k, float("nan")) for k in ("val_acc", "macs", "params", "latency_ms")},
            }
        )
    return results, counts


def study_fingerprint(study: Any) -> dict:
    """What an ablation's results depend on (not its seeds: ``--seeds ... --resume`` adds some)."""
    return {
        "base": study.base.to_dict(),
        "vary": [[p, list(map(str, vals))] for p, vals in study.vary],
        "mode": study.mode,
        "data": dataclasses.asdict(study.data),
        "train": study.train.to_dict(),
        "confidence": study.confidence,
        "faults": os.environ.get("HYBRIDNAS_FAULTS", ""),
    }


def run_ablation(
    study: Any,
    *,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    connect_timeout: float | None = None,
) -> AblationResult:
    """Train every (variant, seed) of ``study`` not finished yet, then write and log the table.

    Everything that can be wrong with the file, the data, the output folder, the resources and the
    cluster (joined here, within ``connect_timeout`` seconds) raises a `UserError` before the
    tracking store is touched. When no trial trained, ``nothing_trained`` says why (and no table
    is written). SIGINT and SIGTERM stop it cleanly (`runners.resume.Stop`): it returns
    ``interrupted`` without a table (or raises `Interrupted` outside the trials); no run is left
    RUNNING."""
    with Stop() as stop:
        return _ablate(study, tracking_uri, address, resume, out_dir, progress, stop, connect_timeout)


def _ablate(
    study: Any,
    tracking_uri: str | None,
    address: str | None,
    resume: bool,
    out_dir: str | os.PathLike | None,
    progress: Callable[[str], None] | None,
    stop: Stop,
    connect_timeout: float | None = None,
) -> AblationResult:
    from hybridnas.runners import store as tr

    say = progress if callable(progress) else (lambda line: None)
    out = Path(out_dir or study.out_dir).expanduser().resolve()
    fp = fingerprint(study_fingerprint(study))
    state = check_state(out, fp, resume, "ablation", STATE_FILE)

    # Everything that can be wrong with the file is found before MLflow or Ray start.
    from hybridnas.runners.data import input_for

    input_spec = input_for(study.data)
    out_what = "--out" if out_dir else "out_dir"
    check_can_start(out, out_what, study.resources, study.train, study.latency, address, connect_timeout)
    measures = measure_variants(study, input_spec)

    uri = tr.resolve_tracking_uri(tracking_uri or (state or {}).get("tracking_uri") or study.tracking.uri)
    tr.check_tracking_uri(uri)
    client = tr.make_client(uri)
    exp_id = tr.experiment_id(client, study.tracking.experiment)
    if state:
        parent = state["parent_run_id"]
        client.update_run(parent, status="RUNNING")
    else:
        out.mkdir(parents=True, exist_ok=True)
        parent = _start_parent(client, exp_id, study, out, uri)
        state = {
            "parent_run_id": parent,
            "tracking_uri": uri,
            "experiment_id": exp_id,
            "fingerprint": fp,
            "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        write_state(out, state, STATE_FILE)
    close_orphans(client, exp_id, "ablation", out, keep=parent)
    with parent_guard(client, parent, stop, "ablation", out):
        return _run_study(study, client, uri, exp_id, parent, out, measures, address, progress, say, stop)


def _run_study(
    study: Any,
    client: Any,
    uri: str,
    exp_id: str,
    parent: str,
    out: Path,
    measures: dict,
    address: str | None,
    progress: Callable[[str], None] | None,
    say: Callable[[str], None],
    stop: Stop,
) -> AblationResult:
    from hybridnas.runners import ablation_table as at
    from hybridnas.runners import store as tr
    from hybridnas.runners import tracking
    from hybridnas.runners.ray_runtime import init_ray

    done = _finished_runs(client, exp_id, parent)
    todo = [(v, s) for v, s in study.trials() if _trial_key(v.name, s) not in done]
    total = len(study.trials())
    say(
        f"ablation {study.name}: {len(study.variants)} variants x {len(study.seeds)} seeds = {total} trials "
        f"({study.mode}); {len(done)} finished before, {len(todo)} to train"
    )
    say(f"mlflow: experiment {study.tracking.experiment!r}, study run {parent} at {tr.redact(uri)}")

    if todo:
        configs = []
        for v, seed in todo:
            configs.append(
                TrialConfig(
                    arch=v.spec.to_dict(),
                    arch_hash=v.spec.arch_hash(),
                    trial_number=f"{v.name}/seed{seed}",
                    data=dataclasses.asdict(study.data),
                    train=v.train.replace(seed=seed).to_dict(),
                    predicted=measures[v.name],
                    cpus=study.resources.cpu,
                    faults=os.environ.get("HYBRIDNAS_FAULTS", ""),
                    run_key=_trial_key(v.name, seed),
                    tags={"variant": v.name, "factor": v.factor, "value": v.value, "seed": str(seed)},
                ).to_dict()
            )
        import torch

        torch.set_num_threads(1)
        init_ray(address, workers=study.concurrency)
        stop.rearm()
        from ray import tune

        from hybridnas.runners.ray_runtime import trial_actors_on_prestarted_workers

        callback = tracking.MlflowSearchCallback(
            uri,
            exp_id,
            parent,
            [("val_acc", "max")],
            {},
            total_trials=total,
            say=progress if callable(progress) else None,
        )
        tuner = tune.Tuner(
            tune.with_resources(ablation_trial, {"cpu": study.resources.cpu, "gpu": study.resources.gpu}),
            # A grid over complete trial configs: Tune runs each (variant, seed) once, in order.
            param_space={"trial": tune.grid_search(configs)},
            # reuse_actors: one worker process per slot for the whole ablation (Ray's prestarted,
            # preloaded ones on a local Ray), not a fresh process importing torch for every trial.
            tune_config=tune.TuneConfig(
                num_samples=1, max_concurrent_trials=study.concurrency, reuse_actors=True
            ),
            run_config=tune.RunConfig(
                name=f"ablation-{int(time.time())}",
                storage_path=str(out / "ray"),
                callbacks=[callback],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
        with trial_actors_on_prestarted_workers(), stop.tune():
            tuner.fit()

    results, counts = _results_from_mlflow(client, exp_id, parent)

    def no_table(**why: Any) -> AblationResult:
        return AblationResult(
            name=study.name,
            parent_run_id=parent,
            tracking_uri=uri,
            out_dir=out,
            rows=[],
            files=[],
            trained=len(todo),
            skipped=len(done),
            counts=counts,
            ui_command=tr.ui_command(uri),
            **_urls(uri, exp_id, parent),
            **why,
        )

    if sum(counts.values()) < total:
        # Tune stopped early (Ctrl-C, SIGTERM): no table that looks complete, never a plain success.
        reason = stop.reason or "SIGINT"
        tr.close_unfinished(client, exp_id, parent)
        client.set_terminated(parent, "KILLED")
        say(
            f"interrupted ({reason}): {sum(counts.values())}/{total} trials finished; no table written; "
            f"the study is saved in {out}"
        )
        return no_table(interrupted=True, stopped_by=reason)
    why = nothing_trained(client, exp_id, parent)
    if why:
        tr.set_tags(client, parent, {"hybridnas.error": why})
        client.set_terminated(parent, "FAILED")
        return no_table(nothing_trained=why)
    if not any(r["variant"] == "base" for r in results):
        client.set_terminated(parent, "FAILED")
        raise AblationError(
            "no run of the base architecture finished: no table to compute (see the failed runs)"
        )
    rows = at.build_table(results, confidence=study.confidence)
    files = write_outputs(rows, out, study)
    for f in files:
        client.log_artifact(parent, str(f))
    tr.log_metrics(client, parent, variant_metrics(rows))
    note = (
        f"hybridnas ablation `{study.path or study.name}`: {len(study.variants)} variants x {len(study.seeds)} "
        f"seeds ({counts['ok']} ok, {counts['failed']} failed)\n\n"
    )
    client.set_tag(parent, "mlflow.note.content", note + files[0].read_text())  # files[0]: ablation.md
    client.set_terminated(parent, "FINISHED")
    say("")
    say(at.to_text(rows, study.confidence))
    say("")
    say(
        f"{counts['ok']} ok, {counts['failed']} failed; '*' = the {round(100 * study.confidence)}% CI of the "
        "difference to the base excludes zero (Welch's t-test)"
    )
    say("wrote " + ", ".join(shown(f) for f in files))
    return AblationResult(
        name=study.name,
        parent_run_id=parent,
        tracking_uri=uri,
        out_dir=out,
        rows=rows,
        files=files,
        trained=len(todo),
        skipped=len(done),
        counts=counts,
        ui_command=tr.ui_command(uri),
        **_urls(uri, exp_id, parent),
    )


def _urls(uri: str, exp_id: str, parent: str) -> dict[str, str]:
    from hybridnas.runners import store as tr

    return {
        "experiment_id": exp_id,
        "runs_url": tr.runs_url(uri, exp_id),
        "parent_url": tr.run_url(uri, exp_id, parent),
    }


def variant_metrics(rows: list) -> dict[str, float]:
    """The table as metrics of the parent run, one per statistic and variant: ``mean/<variant>``,
    ``diff/<variant>`` (to the base), ``ci_low/<variant>`` and ``ci_high/<variant>`` (val_acc,
    0-1). MLflow's chart view groups them by statistic, one chart per variant."""
    out = {}
    for r in rows:
        key = _metric_key(r.variant.replace("stages.", "s").replace(", ", " ").replace("=", "_"))
        out[f"mean/{key}"] = r.mean
        if r.variant != "base":
            out.update({f"diff/{key}": r.diff, f"ci_low/{key}": r.ci_low, f"ci_high/{key}": r.ci_high})
    return out  # NaN bounds (a single seed) are left out by `store.log_metrics`


def _metric_key(s: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and spaces.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in s)[:200]


def write_outputs(rows: list, out: Path, study: Any) -> list[Path]:
    from hybridnas.runners import ablation_table as at
    from hybridnas.runners.files import atomic_write

    title = f"{study.name}: {', '.join(p for p, _ in study.vary)} ({study.mode}, {len(study.seeds)} seeds)"
    out.mkdir(parents=True, exist_ok=True)
    md, csv_, tex, png = (out / f for f in FILES)
    atomic_write(md, at.to_markdown(rows, study.confidence, title=title))
    atomic_write(tex, at.to_latex(rows, study.confidence, caption=title))
    tmp = csv_.with_suffix(".csv.tmp")
    at.write_csv(rows, tmp)
    tmp.replace(csv_)
    tmp = png.with_name("ablation.tmp.png")
    at.plot(rows, tmp, title=title, confidence=study.confidence)
    tmp.replace(png)
    return [md, csv_, tex, png]

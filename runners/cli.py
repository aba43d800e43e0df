"""`hybridnas`: the command line. The one module that parses arguments and prints.

Each subcommand calls the library (`runners.search`, `runners.ablation`, `runners.train`, ...)
and prints what it returns; the library hands progress lines to a callable and never prints.
Heavy modules are imported only when their subcommand runs, so `hybridnas blocks` never pays for
importing Ray. Any `UserError` (bad file, unknown name, missing data) ends with one line on stderr
and exit 2; a library warning is one ``hybridnas: warning: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridnas.runners.examples import resolve
from hybridnas.runners.files import check_writable_dir, check_writable_file, shown
from hybridnas.runners.fmt import human
from hybridnas.search_space.config import (
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_LR,
    MAX_SEED,
    MAX_THREADS,
    check_range,
)
from hybridnas.search_space.errors import SpecError, UserError

MAX_SPACE_SAMPLES = 1_000  # `space --samples`: each sample is built and profiled (0.1-1 s on a small CPU)
MAX_TRIALS = 1_000_000  # = search.trials
MAX_CONNECT_TIMEOUT_S = 3600.0


def _ranged(kind: type, lo: float, hi: float, open_lo: bool = False) -> Callable[[str], float]:
    """An argparse type: an integer (``kind`` int) or a finite number (float) in [lo, hi] (or
    (lo, hi] with ``open_lo``); the error names the bound, argparse adds the flag."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            check_range(value, "", lo, hi, open_lo=open_lo)
        except SpecError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


def _add_connect_timeout(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--connect-timeout",
        type=_ranged(float, 0.0, MAX_CONNECT_TIMEOUT_S, open_lo=True),
        default=None,
        metavar="S",
        help="with --address: fail when the cluster does not answer within S seconds (default 30)",
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors in the one-line form of every other error: ``hybridnas: error: ...``, exit 2."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        self.exit(2, f"hybridnas: error: {message} (see {self.prog} --help)\n")


def _handler(module: str, func: str = "main"):
    def run(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module), func)(args)

    return run


def _say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# blocks, space, train


def _cmd_examples(args: argparse.Namespace) -> int:
    from hybridnas.runners.examples import example_files, kind_of

    files = example_files()
    width = max(len(p.stem) for p in files)
    print("shipped example files (use the name in place of a path, e.g. `hybridnas search quickstart`):")
    for p in files:
        print(f"  {p.stem.ljust(width)}  {kind_of(p):<12}  {p}")
    return 0


def _cmd_blocks(args: argparse.Namespace) -> int:
    from hybridnas.blocks import describe

    print(describe())
    return 0


def _cmd_space(args: argparse.Namespace) -> int:
    from hybridnas.runners.space_report import report
    from hybridnas.search_space.experiment import Experiment

    exp = Experiment.from_yaml(resolve(args.experiment))
    report(exp, _say, samples=args.samples, seed=args.seed)
    return 0


def _progress_printer(stream: Any, epochs: int) -> tuple[Callable[[int, int], None], Callable[[dict], None]]:
    """A per-epoch bar redrawn in place on a terminal; on a pipe, just one line per epoch."""
    tty = stream.isatty()
    state = {"epoch": 1, "t0": time.perf_counter()}
    width = 24

    def bar(done: int, steps: int) -> str:
        filled = round(width * done / steps)
        return "[" + "#" * filled + "." * (width - filled) + "]"

    def on_batch(i: int, steps: int) -> None:
        state["steps"] = steps
        if tty and (i == steps or i % max(1, steps // width) == 0):
            stream.write(f"\repoch {state['epoch']}/{epochs} {bar(i, steps)} {i}/{steps}")
            stream.flush()

    def on_epoch(m: dict) -> None:
        steps = state.get("steps", 1)
        prefix = "\r" if tty else ""
        stream.write(
            f"{prefix}epoch {m['epoch']}/{epochs} {bar(steps, steps)} loss {m['train_loss']:.4f}  "
            f"val_acc {m['val_acc']:.4f}  {m['imgs_per_s']:,.0f} img/s  {m['epoch_time_s']:.1f}s\n"
        )
        stream.flush()
        state["epoch"] = m["epoch"] + 1

    return on_batch, on_epoch


def _cmd_train(args: argparse.Namespace) -> int:
    from hybridnas.runners.train import TrainingDiverged, train_arch
    from hybridnas.search_space.spec import ArchSpec

    spec = ArchSpec.from_yaml(Path(resolve(args.arch)))
    # With --json stdout carries exactly one JSON object, so the progress goes to stderr.
    stream = sys.stderr if args.json else sys.stdout
    bars: dict[str, Callable] = {}

    def start(line: str, cfg: Any) -> None:
        print(line, file=stream, flush=True)
        bars["batch"], bars["epoch"] = _progress_printer(stream, cfg.epochs)

    try:
        run = train_arch(
            spec,
            data=args.data,
            root=args.root,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            precision=getattr(args, "precision", None),
            threads=getattr(args, "threads", None),
            out=args.out,
            on_start=start,
            on_epoch=lambda m: bars["epoch"](m),
            on_batch=lambda i, n: bars["batch"](i, n),
        )
    except TrainingDiverged as e:
        print(f"hybridnas: {e}; try a lower --lr (now {e.lr})", file=sys.stderr)
        return 1
    res, out, summary = run.result, run.out, run.summary
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"val_acc {res.val_acc:.4f} | MACs {human(summary['macs'], 'macs')} | params {human(summary['params'], 'params')} | "
            f"{res.imgs_per_s:,.0f} img/s | {res.train_time_s:.1f}s | wrote {out}/model.pt, {out}/arch.yaml"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# search, ablate


def _resume_command(args: argparse.Namespace) -> str:
    """The exact command that continues an interrupted ``search`` or ``ablate``: the same file and
    flags (they are part of what is resumed), plus ``--resume``."""
    import shlex

    parts = ["hybridnas", args.command, args.experiment if args.command == "search" else args.ablation]
    for flag in ("trials", "epochs", "seeds", "tracking_uri", "address", "out"):  # what was given
        value = getattr(args, flag, None)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    return shlex.join([*parts, "--resume"])


def _interrupted(args: argparse.Namespace, reason: str | None, what: str) -> int:
    from hybridnas.runners.resume import EXIT_CODES

    reason = reason or "SIGINT"
    print(
        f"hybridnas: {what} interrupted ({reason}); continue with: {_resume_command(args)}", file=sys.stderr
    )
    return EXIT_CODES.get(reason, 130)


def _cmd_search(args: argparse.Namespace) -> int:
    """`hybridnas search FILE [--tracking-uri URI] [--address A] [--resume] [--out DIR] [--trials N] [--epochs N]`."""
    from hybridnas.search_space.experiment import Experiment

    exp = Experiment.from_yaml(resolve(args.experiment))  # a bad file fails before Ray is imported
    from hybridnas.runners.search import apply_overrides, run_search

    exp = apply_overrides(exp, getattr(args, "trials", None), getattr(args, "epochs", None))
    res = run_search(
        exp,
        tracking_uri=getattr(args, "tracking_uri", None),
        address=getattr(args, "address", None),
        resume=bool(getattr(args, "resume", False)),
        out_dir=getattr(args, "out", None),
        progress=_say,
        store_timeout=args.store_timeout,
        connect_timeout=getattr(args, "connect_timeout", None),
    )
    c = res.counts
    stopped = f", {c['stopped']} stopped early" if "stopped" in c else ""
    print(
        f"\nsearch {exp.name}: {sum(c.values())} trials ({c['ok']} ok{stopped}, {c['failed']} failed, "
        f"{c['infeasible']} infeasible) in {res.wall_s / 60:.1f} min"
    )
    if res.interrupted:
        _browse(res, "search run")
        return _interrupted(args, res.stopped_by, "search")
    if res.nothing_trained:
        _browse(res, "search run")
        print(f"hybridnas: error: {res.nothing_trained}", file=sys.stderr)
        return 1
    if res.reached:
        print("trained to: " + ", ".join(f"epoch {e}: {n} trials" for e, n in res.reached.items()))
    if res.front is not None and len(res.front):
        goals = ", ".join(f"{m} ({mode})" for m, mode in res.objectives)
        means = " (val_acc: mean of the seeds ± sd)" if exp.search.repeats else ""
        print(f"Pareto front of {goals}: {len(res.front)} architectures{means}")
        from hybridnas.runners.front_report import front_text

        print(front_text(res.front, res.objectives))
        if "latency_ms_predicted" in res.front.columns:
            print(
                f"latency_ms: measured end to end after the search ({res.calibration['quality']['clock']} clock); "
                "predicted_ms: the latency table's prediction, what the search optimised"
            )
    if res.fidelity:
        print("how far this search's ranking can be trusted (Kendall tau):")
        for line in res.fidelity:
            print(f"  {line}")
    if res.exported:
        print("exported architectures:")
        for p in res.exported:
            print(f"  {shown(p)}")
    if res.pareto_files:
        names = ", ".join(
            sorted({p.name if "_vs_" not in p.name else "pareto_*" + p.suffix for p in res.pareto_files})
        )
        print(f"front table and plots: {shown(res.pareto_files[0].parent)}/ ({names})")
    _browse(res, "search run")
    if res.exported:
        print(f"train one further: hybridnas train {shown(res.exported[0])} --epochs 10")
    return 0


def _browse(res: Any, what: str) -> None:
    """Where to look in MLflow: the command that serves the UI, the runs table, the parent run."""
    print(f"browse in MLflow: {res.ui_command}")
    print(f"  runs:       {res.runs_url}")
    print(f"  {what + ':':<11} {res.parent_url}")


def _cmd_ablate(args: argparse.Namespace) -> int:
    from hybridnas.runners.ablation import run_ablation
    from hybridnas.search_space.ablation import AblationStudy

    seeds = None
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise SpecError(
                "--seeds", f"expected comma-separated integers like 0,1,2, got {args.seeds!r}"
            ) from None
    study = AblationStudy.from_yaml(resolve(args.ablation), seeds=seeds)
    if args.epochs is not None:
        study = dataclasses.replace(
            study,
            train=study.train.replace(epochs=args.epochs),
            variants=tuple(
                dataclasses.replace(v, train=v.train.replace(epochs=args.epochs)) for v in study.variants
            ),
        )
    res = run_ablation(
        study,
        tracking_uri=args.tracking_uri,
        address=args.address,
        resume=args.resume,
        out_dir=args.out,
        progress=_say,
        connect_timeout=args.connect_timeout,
    )
    _browse(res, "study run")
    if res.nothing_trained:
        print(f"hybridnas: error: {res.nothing_trained}", file=sys.stderr)
        return 1
    return _interrupted(args, res.stopped_by, "ablation") if res.interrupted else 0


# ---------------------------------------------------------------------------------------------
# export, pareto


def _describe(row: Any) -> str:
    from hybridnas.runners.export import _finite
    from hybridnas.runners.pareto import arch_summary, human

    parts = [
        f"{k} {human(row.get(k), k)}"
        for k in ("val_acc", "macs", "params", "latency_ms")
        if _finite(row.get(k))
    ]
    return f"trial {row.get('trial')}: " + ", ".join(parts) + f"  [{arch_summary(row.get('arch'))}]"


def _cmd_export(args: argparse.Namespace) -> int:
    """`hybridnas export --experiment NAME [--tracking-uri URI] [--select ...] [--out PATH]`."""
    from hybridnas.runners.export import check_selection, export_selection, load_runs

    # Check the selection before touching the tracking store: a typo fails fast.
    how = check_selection(getattr(args, "select", None) or "best_acc")
    # And the output path: a bad one should not wait for the store to be read.
    if args.out and (how == "pareto" or Path(args.out).is_dir()):
        check_writable_dir(args.out)
    elif args.out:
        check_writable_file(args.out)
    df = load_runs(args.experiment, getattr(args, "tracking_uri", None))
    written = export_selection(df, args.experiment, how, getattr(args, "out", None))
    print(
        f"experiment {args.experiment} (search run {df.attrs['parent_run_id']}): {len(df)} finished trials, "
        f"selection {how}"
    )
    for path, r in written:
        print(f"wrote {path}  {_describe(r)}")
    if len(written) == 1:
        print(f"train it: hybridnas train {written[0][0]}")
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    """`hybridnas pareto --experiment NAME [--tracking-uri URI] [--out DIR]`."""
    from hybridnas.runners.export import load_runs, slug
    from hybridnas.runners.pareto import (
        DEFAULT_OBJECTIVES,
        feasible_table,
        front_table,
        objective_pairs,
        write_fronts,
    )

    if args.out:
        check_writable_dir(args.out)
    df = load_runs(args.experiment, getattr(args, "tracking_uri", None))
    objectives = df.attrs.get("objectives") or list(DEFAULT_OBJECTIVES)
    out = Path(getattr(args, "out", None) or f"{slug(args.experiment)}_pareto")
    paths = write_fronts(df, objectives, out, title=args.experiment)
    objs = objective_pairs(objectives)
    n_front = int(feasible_table(df, objs)["pareto"].sum())
    goals = ", ".join(f"{m} ({mode})" for m, mode in objs)
    print(f"experiment {args.experiment}: {len(df)} finished trials, {n_front} on the front of {goals}")
    print(front_table(df, objs))
    print("wrote:")
    for p in paths:
        print(f"  {p}")
    return 0


# ---------------------------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    from hybridnas import __version__

    p = _Parser(
        prog="hybridnas",
        description="Search and ablate hybrid conv/attention vision backbones.",
    )
    p.add_argument("--version", action="version", version=f"hybridnas {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("blocks", help="list mixers, add-ons and downsamplers with their papers and options")
    s.set_defaults(func=_cmd_blocks)

    s = sub.add_parser("examples", help="list the example files shipped with hybridnas (usable by name)")
    s.set_defaults(func=_cmd_examples)

    s = sub.add_parser(
        "space", help="validate an experiment file; print the space size and sample architectures"
    )
    s.add_argument("experiment", help="experiment YAML (e.g. experiments/quickstart.yaml)")
    s.add_argument(
        "--samples",
        type=_ranged(int, 0, MAX_SPACE_SAMPLES),
        default=3,
        help=f"how many architectures to sample and print (at most {MAX_SPACE_SAMPLES:,})",
    )
    s.add_argument("--seed", type=_ranged(int, 0, MAX_SEED), default=0)
    s.set_defaults(func=_cmd_space)

    s = sub.add_parser("profile", help="MACs, params and (optionally) latency of an architecture, per stage")
    s.add_argument("arch", help="architecture YAML")
    s.add_argument("--latency", action="store_true", help="also measure latency")
    s.add_argument("--device", default="cpu")
    s.add_argument("--batch-size", type=_ranged(int, 1, 4096), default=1)
    s.add_argument("--threads", type=_ranged(int, 1, MAX_THREADS), default=1)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_handler("hybridnas.runners.cli_profile", "main_profile"))

    s = sub.add_parser("train", help="train one architecture (e.g. one exported from a search)")
    s.add_argument("arch", help="architecture YAML")
    s.add_argument("--data", help="dataset name (mnist5k, digits, cifar10, cifar100, imagefolder, synthetic)")
    s.add_argument("--root", help="dataset directory (cifar10/cifar100/imagefolder)")
    s.add_argument("--epochs", type=_ranged(int, 1, MAX_EPOCHS))
    s.add_argument("--batch-size", type=_ranged(int, 1, MAX_BATCH_SIZE))
    s.add_argument("--lr", type=_ranged(float, 0.0, MAX_LR, open_lo=True))
    s.add_argument("--seed", type=_ranged(int, 0, MAX_SEED))
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="auto (default): bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere",
    )
    s.add_argument("--threads", type=_ranged(int, 1, MAX_THREADS), help="torch CPU threads (default: all)")
    s.add_argument("--out", help="directory for the state dict and the arch YAML")
    s.add_argument("--json", action="store_true", help="print one JSON object at the end")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("search", help="run an architecture search from an experiment file")
    s.add_argument("experiment", help="experiment YAML (e.g. experiments/quickstart.yaml)")
    s.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the file's, else sqlite:///mlflow.db)"
    )
    s.add_argument("--address", help="Ray cluster to join: 'auto' or ray://HOST:PORT (default: local)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted search")
    s.add_argument("--out", help="output directory (default: hybridnas_runs/<name>)")
    s.add_argument("--trials", type=_ranged(int, 1, MAX_TRIALS), help="override search.trials")
    s.add_argument("--epochs", type=_ranged(int, 1, MAX_EPOCHS), help="override train.epochs")
    _add_connect_timeout(s)
    s.add_argument(
        "--store-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="how long trials go on while the tracking store is unreachable (its writes wait in "
        "OUT/mlflow_buffer.jsonl) before the search stops to be resumed (exit 75); default 600",
    )
    s.set_defaults(func=_cmd_search)

    s = sub.add_parser("ablate", help="run an ablation study from an ablation file")
    s.add_argument("ablation", help="ablation YAML (e.g. experiments/ablation_mixer.yaml)")
    s.add_argument("--seeds", help="comma-separated seeds, overriding the file's (e.g. 0,1,2)")
    s.add_argument("--tracking-uri")
    s.add_argument("--address")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--out")
    s.add_argument("--epochs", type=_ranged(int, 1, MAX_EPOCHS), help="override train.epochs")
    _add_connect_timeout(s)
    s.set_defaults(func=_cmd_ablate)

    s = sub.add_parser("export", help="write architecture YAML chosen from a finished search in MLflow")
    s.add_argument("--experiment", required=True, help="MLflow experiment name")
    s.add_argument("--tracking-uri")
    s.add_argument("--select", default="best_acc", help='best_acc | knee | pareto | "macs<=N" | "params<=N"')
    s.add_argument("--out", help="file (or directory for --select pareto)")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("pareto", help="Pareto front of a finished search: table, CSV and plots")
    s.add_argument("--experiment", required=True)
    s.add_argument("--tracking-uri")
    s.add_argument("--out", help="directory for pareto.csv/png/html")
    s.set_defaults(func=_cmd_pareto)

    s = sub.add_parser("cache", help="the latency cache: tables, machines, quality, age; clear it")
    s.add_argument("action", nargs="?", choices=["show", "clear"], default="show")
    s.add_argument("--space", help="clear only this space's calibration (its experiment name)")
    s.set_defaults(func=_handler("hybridnas.runners.cli_cache"))

    b = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    bsub = b.add_subparsers(dest="bench", metavar="BENCH", required=True)
    s = bsub.add_parser("blocks", help="every mixer vs an unfold implementation and the matmul rate")
    s.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    s.add_argument(
        "--mixers",
        type=lambda v: [m for m in v.split(",") if m],
        help="comma-separated subset, e.g. acmix,slide",
    )
    s.set_defaults(func=_handler("hybridnas.runners.bench.blocks"))
    s = bsub.add_parser("latency", help="latency lookup table: predicted vs measured")
    s.add_argument("--experiment", default=None, help="space to sample from (default: the quickstart)")
    s.add_argument("--samples", type=int, default=30)
    s.add_argument("--quick", action="store_true")
    s.add_argument(
        "--load",
        type=int,
        default=0,
        help="N busy background processes during a second calibration and prediction",
    )
    s.add_argument(
        "--load-kind",
        default="cpu",
        help="what each busy process does: cpu (a loop, one core) or memory (also streams through memory)",
    )
    s.set_defaults(func=_handler("hybridnas.runners.bench.latency"))
    s = bsub.add_parser("train", help="this trainer vs a textbook DataLoader loop")
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--quick", action="store_true")
    s.set_defaults(func=_handler("hybridnas.runners.bench.train"))
    s = bsub.add_parser("search", help="orchestration overhead of the quickstart search")
    s.add_argument("--experiment", default=None, help="experiment file (default: the quickstart)")
    s.add_argument("--trials", type=int, default=None, help="default: the experiment's")
    s.add_argument("--epochs", type=int, default=None, help="default: the experiment's")
    s.add_argument("--quick", action="store_true")
    s.set_defaults(func=_handler("hybridnas.runners.bench.search"))
    s = bsub.add_parser("efficiency", help="search strategies replayed on cached learning curves")
    s.add_argument("--experiment", default=None, help="experiment file (default: the quickstart)")
    s.add_argument(
        "--archs", type=int, default=None, help="architectures to train for the table (default 32)"
    )
    s.add_argument("--reps", type=int, default=None, help="repetitions per strategy (default 20)")
    s.add_argument("--budget", type=int, default=None, help="compute budget in full trainings (default 12)")
    s.add_argument("--quick", action="store_true", help="a small table: 6 architectures, 1,000 images")
    s.add_argument(
        "--no-real", action="store_true", help="skip the two real searches (fifo, moasha) at the end"
    )
    s.set_defaults(func=_handler("hybridnas.runners.bench.efficiency"))
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    if issubclass(category, UserWarning):
        print(f"hybridnas: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _show_warning  # both restored when the command ends
        try:
            rc = args.func(args)
        except UserError as e:
            print(f"hybridnas: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            from hybridnas.runners.resume import Interrupted

            if isinstance(e, Interrupted) and e.resumable and args.command in ("search", "ablate"):
                print(f"hybridnas: {e}; continue with: {_resume_command(args)}", file=sys.stderr)
            else:
                print(f"hybridnas: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr)
            return e.exit_code if isinstance(e, Interrupted) else 130
        except BrokenPipeError:  # `hybridnas ... | head`: the reader left, nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

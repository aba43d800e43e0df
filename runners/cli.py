"""`hybridnas`: the command line.

Each subcommand's handler lives next to the code it drives (``runners.<module>.main*``) and is
imported only when that subcommand runs, so `hybridnas blocks` never pays for importing Ray.
Any `UserError` (bad file, unknown name, missing data) ends with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hybridnas.search_space.errors import UserError


def _handler(module: str, func: str = "main"):
    def run(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module), func)(args)

    return run


def _cmd_blocks(args: argparse.Namespace) -> int:
    from hybridnas.blocks import describe

    print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hybridnas import __version__

    p = argparse.ArgumentParser(
        prog="hybridnas",
        description="Search and ablate hybrid conv/attention vision backbones.",
    )
    p.add_argument("--version", action="version", version=f"hybridnas {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("blocks", help="list mixers, add-ons and downsamplers with their papers and options")
    s.set_defaults(func=_cmd_blocks)

    s = sub.add_parser(
        "space", help="validate an experiment file; print the space size and sample architectures"
    )
    s.add_argument("experiment", help="experiment YAML (e.g. experiments/quickstart.yaml)")
    s.add_argument("--samples", type=int, default=3, help="how many architectures to sample and print")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_handler("hybridnas.runners.space_report"))

    s = sub.add_parser("profile", help="MACs, params and (optionally) latency of an architecture, per stage")
    s.add_argument("arch", help="architecture YAML")
    s.add_argument("--latency", action="store_true", help="also measure latency")
    s.add_argument("--device", default="cpu")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_handler("hybridnas.runners.cli_profile", "main_profile"))

    s = sub.add_parser("train", help="train one architecture (e.g. one exported from a search)")
    s.add_argument("arch", help="architecture YAML")
    s.add_argument("--data", help="dataset name (mnist5k, digits, cifar10, cifar100, imagefolder, synthetic)")
    s.add_argument("--root", help="dataset directory (cifar10/cifar100/imagefolder)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="auto (default): bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere",
    )
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all)")
    s.add_argument("--out", help="directory for the state dict and the arch YAML")
    s.add_argument("--json", action="store_true", help="print one JSON object at the end")
    s.set_defaults(func=_handler("hybridnas.runners.train"))

    s = sub.add_parser("search", help="run an architecture search from an experiment file")
    s.add_argument("experiment", help="experiment YAML (e.g. experiments/quickstart.yaml)")
    s.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the file's, else sqlite:///mlflow.db)"
    )
    s.add_argument("--address", help="Ray cluster to join: 'auto' or ray://HOST:PORT (default: local)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted search")
    s.add_argument("--out", help="output directory (default: hybridnas_runs/<name>)")
    s.add_argument("--trials", type=int, help="override search.trials")
    s.add_argument("--epochs", type=int, help="override train.epochs")
    s.set_defaults(func=_handler("hybridnas.runners.search"))

    s = sub.add_parser("ablate", help="run an ablation study from an ablation file")
    s.add_argument("ablation", help="ablation YAML (e.g. experiments/ablation_mixer.yaml)")
    s.add_argument("--seeds", help="comma-separated seeds, overriding the file's (e.g. 0,1,2)")
    s.add_argument("--tracking-uri")
    s.add_argument("--address")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--out")
    s.add_argument("--epochs", type=int, help="override train.epochs")
    s.set_defaults(func=_handler("hybridnas.runners.ablation"))

    s = sub.add_parser("export", help="write architecture YAML chosen from a finished search in MLflow")
    s.add_argument("--experiment", required=True, help="MLflow experiment name")
    s.add_argument("--tracking-uri")
    s.add_argument("--select", default="best_acc", help='best_acc | knee | pareto | "macs<=N" | "params<=N"')
    s.add_argument("--out", help="file (or directory for --select pareto)")
    s.set_defaults(func=_handler("hybridnas.runners.export"))

    s = sub.add_parser("pareto", help="Pareto front of a finished search: table, CSV and plots")
    s.add_argument("--experiment", required=True)
    s.add_argument("--tracking-uri")
    s.add_argument("--out", help="directory for pareto.csv/png/html")
    s.set_defaults(func=_handler("hybridnas.runners.pareto"))

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"hybridnas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybridnas: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

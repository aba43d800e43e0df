"""How far a search's own ranking can be trusted: Kendall's tau between its fidelities.

A multi-fidelity search stops trials by their accuracy after a few epochs, and every search
orders its front by one seed per architecture. Both are proxies; this module measures them on
the search's own trials, with nothing trained for the purpose:

- between successive rungs (and from the last rung to the full budget): tau between the
  accuracies at the two epochs, over the trials that reached both;
- between one seed and the mean of all seeds, over the front members that were repeated.

Tau counts pairs: with no ties, ``(1 - tau) / 2`` of all pairs are ordered one way by the proxy
and the other way by the better measurement, which is how the printout puts it ("orders about 1
pair in 4 wrongly"). Below ``NOISY`` the ranking is called mostly noise, with a suggestion.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

NOISY = 0.4  # tau below this: more than 3 pairs in 10 ordered wrongly
MIN_PAIRS = 3  # trials needed for a tau worth printing


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """One comparison: ``name`` (the MLflow metric), what was compared, tau and how many trials."""

    name: str
    proxy: str
    target: str
    tau: float
    n: int

    @property
    def wrong_share(self) -> float:
        """The share of pairs the proxy orders the other way (ties aside)."""
        return (1.0 - self.tau) / 2.0

    @property
    def noisy(self) -> bool:
        return self.tau < NOISY


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties handled) of paired values; NaN when fewer than two pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} and {len(y)} values: they must be paired")
    if len(x) < 2:
        return math.nan
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


def rung_fidelities(
    curves: Mapping[str, Mapping[int, float]], rungs: Sequence[int], epochs: int
) -> list[Fidelity]:
    """Tau between the accuracies at successive rungs and from the last rung to ``epochs``, over
    the trials (``curves``: trial -> {epoch: val_acc}) that reached both; too few trials: skipped."""
    points = sorted({*rungs, epochs})
    out = []
    for a, b in zip(points, points[1:]):
        both = [c for c in curves.values() if a in c and b in c]
        tau = kendall_tau([c[a] for c in both], [c[b] for c in both])
        if len(both) >= MIN_PAIRS and math.isfinite(tau):
            out.append(
                Fidelity(f"fidelity_tau_epoch{a}_epoch{b}", f"epoch {a}", f"epoch {b}", tau, len(both))
            )
    return out


def seed_fidelity(single: Sequence[float], means: Sequence[float]) -> Fidelity | None:
    """Tau between one seed's accuracy and the seed mean over the repeated front members."""
    tau = kendall_tau(single, means)
    if len(single) < MIN_PAIRS or not math.isfinite(tau):
        return None
    return Fidelity("fidelity_tau_seed_mean", "one seed", "the seed mean", tau, len(single))


def metrics(fidelities: Sequence[Fidelity]) -> dict[str, float]:
    """What the parent run logs: each tau (in [-1, 1]) and the trials it was measured on."""
    out = {}
    for f in fidelities:
        out[f.name] = f.tau
        out[f.name.replace("_tau_", "_n_")] = float(f.n)
    return out


def _pairs(share: float) -> str:
    if share <= 0.02:
        return "orders almost no pair wrongly"
    return f"orders about 1 pair in {max(2, round(1 / share))} wrongly"


def describe(
    fidelities: Sequence[Fidelity], min_epochs: int | None = None, repeats: int | None = None
) -> list[str]:
    """Plain-words lines for the end of a search, with a warning and a suggestion where the
    ranking is mostly noise."""
    lines = []
    for f in fidelities:
        what = f"{f.proxy} -> {f.target}" if f.proxy.startswith("epoch") else f"{f.proxy} vs {f.target}"
        lines.append(f"{what}: tau {f.tau:.2f} over {f.n} trials; the {f.proxy} {_pairs(f.wrong_share)}")
        if not f.noisy:
            continue
        if f.proxy.startswith("epoch"):
            hint = (
                f"raise search.min_epochs (now {min_epochs}) so the first rung comes later"
                if min_epochs is not None
                else "raise search.min_epochs so the first rung comes later"
            )
            lines.append(f"  warning: the ranking at {f.proxy} is mostly noise; {hint}")
        else:
            more = f" (now {repeats})" if repeats is not None else ""
            lines.append(
                f"  warning: one seed orders the front mostly by noise; raise search.repeats{more} and "
                "trust only the members the table does not mark as indistinguishable"
            )
    return lines


def fidelity_report(
    client: Any, exp_id: str, parent: str, search: Any, epochs: int, front: Any = None
) -> tuple[dict[int, int], list[str]]:
    """The end of a search with rungs or repeats: how many trials trained to each rung (parent
    metrics ``trials_at_epoch<E>``), the taus (parent metrics ``fidelity_*``) and their printout.

    ``front``: the front on seed means (rows of `runners.export.load_runs` with ``seeds`` and
    ``val_acc_single``), for the seed comparison.
    """
    from hybridnas.runners.store import child_runs, log_metrics

    rungs = tuple(search.rungs(epochs))
    reached: dict[int, int] = {}
    found: list[Fidelity] = []
    if rungs:
        trials = [
            r
            for r in child_runs(client, exp_id, parent)
            if r.data.tags.get("hybridnas.kind", "trial") == "trial"
            and r.data.tags.get("hybridnas.status") in ("ok", "stopped")
        ]
        trained = [int(r.data.metrics.get("epochs_trained", 0)) for r in trials]
        reached = {e: sum(t >= e for t in trained) for e in (*rungs, epochs)}
        log_metrics(client, parent, {f"trials_at_epoch{e}": n for e, n in reached.items()})
        curves = {
            r.info.run_id: {int(m.step): m.value for m in client.get_metric_history(r.info.run_id, "val_acc")}
            for r in trials
        }
        found += rung_fidelities(curves, rungs, epochs)
    if front is not None and search.repeats and "val_acc_single" in front.columns:
        repeated = front[front["seeds"] > 1]
        f = seed_fidelity(list(repeated["val_acc_single"]), list(repeated["val_acc"]))
        if f is not None:
            found.append(f)
    log_metrics(client, parent, metrics(found))
    return reached, describe(found, search.min_epochs if rungs else None, search.repeats)

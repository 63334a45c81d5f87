"""Surrogate seconds per decision at a given number of observations.

A decision is what the tuner does before each epoch: fit the surrogate on every observed (trial, epoch)
row, then score the candidates (paused trials + fresh configurations) with expected improvement.
The first ``full_fits`` fits train from scratch (1000 steps by default), later ones warm-start (50
steps); both are timed. Synthetic learning curves stand in for training, so only the surrogate is
measured.

    python recipes/bench_surrogate.py --observations 25 50 100 --repeats 3
    python recipes/bench_surrogate.py --observations 100 --searchers dyhpo --weights stats nfn gmn

With ``--weights``, rows carry checkpoints: the demo hub's pretrained modules for epoch-1 rows and,
for later epochs, the same modules with seeded noise added (a stand-in for training; the featurizer's
cost depends on the architecture, not on the values). Entries a featurizer refuses (only ``nfn`` with
``fallback=False``) are left out of the hub.

With ``--steady``, searchers run at their library defaults (``build_searcher`` without surrogate options) and
the script times a *steady-state decision*: ``--decisions`` consecutive ``ask``/``tell`` rounds on a growing
history, so the fit schedule (fresh fits every few decisions, warm-started refits in between, promotions that
skip the surrogate) is reflected as a user experiences it; the worst single decision is reported too. The
searchers are interleaved (order reversed every other repeat) so that other load on the machine hits them alike.

    python recipes/bench_surrogate.py --steady --observations 100 500 2000 --repeats 2
    python recipes/bench_surrogate.py --steady --variants fms fms+summary gp dyhpo --uncapped fms

A variant is ``SEARCHER[+WEIGHTS][/nocap]``: ``fms+summary`` reads checkpoints with the summary featurizer,
``fms/nocap`` fits on every row (``max_rows=None``) instead of the default row cap.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lightning_fms import FMSError, FreezeThawOptimizer, ModelHub, SearchSpace
from lightning_fms.search.optimizer import DEFAULT_FRESH_CANDIDATES
from lightning_fms.search.row_cap import DEFAULT_MAX_ROWS
from lightning_fms.search.rows import ModuleProvider
from lightning_fms.search.searcher import Searcher, Selection, SelectionContext, build_searcher
from lightning_fms.search.seeds import derive_seed
from lightning_fms.surrogate import SURROGATES
from lightning_fms.weights.registry import FEATURIZERS

SPACE = {
    "hub": {"type": "categorical", "choices": ["mlp-s", "mlp-m", "cnn-s", "cnn-m", "resnet-s", "resnet-m"]},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
    "model.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "model.momentum": {"type": "float", "low": 0.0, "high": 0.95},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "data.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
}


class _Alternate(Searcher):
    """Fills the history: resume a paused trial two times out of three, else start a fresh one."""

    def select(self, context, candidates, seed):
        paused = [i for i, c in enumerate(candidates) if c.trial_id is not None]
        if paused and seed % 3:
            return Selection(paused[seed % len(paused)])
        return Selection(len(paused))


def synthetic_value(config: dict, epoch: int) -> float:
    """A plausible accuracy curve: saturating in epochs, best near lr 0.05."""
    quality = math.exp(-((math.log10(config["model.lr"]) + 1.3) ** 2))
    return 0.2 + 0.75 * quality * (1 - math.exp(-epoch / 3))


def history(observations: int, cap: int, seed: int, hub_names: list[str] | None = None) -> FreezeThawOptimizer:
    """An optimizer holding ``observations`` told epochs."""
    spec = dict(SPACE)
    if hub_names is not None:
        spec["hub"] = {"type": "hub", "choices": hub_names}
    space = SearchSpace.from_dict(spec, hub_entries=hub_names)
    opt = FreezeThawOptimizer(
        space, _Alternate(), budget=observations, max_epochs_per_trial=cap, seed=seed, num_startup_trials=0
    )
    while (s := opt.ask()) is not None:
        opt.tell(s.trial_id, s.epoch, synthetic_value(s.config, s.epoch))
    return opt


@functools.cache
def _module(hub: ModelHub, key: tuple, entry: str) -> torch.nn.Module:
    module = hub.build(entry)
    if key[0] == "trial":
        generator = torch.Generator().manual_seed(derive_seed(*key))
        with torch.no_grad():
            for param in module.parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
    return module.eval().requires_grad_(False)


def usable_entries(hub: ModelHub, weights: str, options: dict | None = None) -> list[str]:
    """Hub entries the featurizer can embed (all of them unless it was told to refuse some)."""
    from lightning_fms.weights import build_featurizer

    names = []
    featurizer = build_featurizer(weights, **(options or {}))
    for name in hub.names:
        try:
            with torch.no_grad():
                featurizer([hub.build(name)])
            names.append(name)
        except FMSError:
            continue
    return names


def time_decisions(
    observations: int,
    searcher_name: str,
    cap: int,
    fresh: int,
    repeats: int,
    device: str | None,
    weights: str = "none",
    hub: ModelHub | None = None,
    surrogate_options: dict | None = None,
    featurizer_options: dict | None = None,
):
    """Seconds of one full (from-scratch) decision and one warm-started decision."""
    full, warm = [], []
    names = usable_entries(hub, weights, featurizer_options) if weights != "none" and hub is not None else None
    for repeat in range(repeats):
        opt = history(observations, cap, seed=repeat, hub_names=names)
        searcher = build_searcher(
            searcher_name,
            opt.space,
            cap,
            device=device,
            weights=weights,
            surrogate_options=surrogate_options if searcher_name == "dyhpo" else None,
            featurizer_options=featurizer_options if weights != "none" else None,
        )
        opt.searcher = searcher
        opt.num_fresh_candidates = fresh
        modules = None
        if weights != "none":

            def modules(key, config):
                return _module(hub, key, config["hub"])

        context = SelectionContext(opt.space, opt.trials, opt.mode, cap, modules)
        candidates = opt.candidates(observations)
        start = time.perf_counter()
        searcher.select(context, candidates, seed=1)
        full.append(time.perf_counter() - start)
        if hasattr(searcher, "surrogate") and hasattr(searcher.surrogate, "full_fits"):
            searcher.surrogate.full_fits = 0  # the next fit warm-starts, as after the 10th decision
        start = time.perf_counter()
        searcher.select(context, candidates, seed=2)
        warm.append(time.perf_counter() - start)
    return statistics.median(full), statistics.median(warm)


@dataclass(frozen=True)
class Variant:
    """A searcher at its library defaults, optionally reading checkpoints or without the row cap.

    Attributes:
        searcher: A surrogate searcher's name (``fms``, ``dyhpo``, ``gp``).
        weights: Featurizer name, or ``"none"``.
        max_rows: The row cap (``None``: every row is fitted).
    """

    searcher: str
    weights: str = "none"
    max_rows: int | None = DEFAULT_MAX_ROWS

    @property
    def label(self) -> str:
        """``SEARCHER[+WEIGHTS][/nocap]``, as :func:`parse_variant` reads it."""
        weights = "" if self.weights == "none" else f"+{self.weights}"
        return f"{self.searcher}{weights}{'/nocap' if self.max_rows is None else ''}"


def parse_variant(text: str) -> Variant:
    """Read ``SEARCHER[+WEIGHTS][/nocap]`` (e.g. ``fms``, ``fms+summary``, ``fms/nocap``)."""
    body, nocap = (text[: -len("/nocap")], True) if text.endswith("/nocap") else (text, False)
    searcher, _, weights = body.partition("+")
    if searcher not in SURROGATES:
        raise SystemExit(f"unknown searcher in variant {text!r} (expected one of {', '.join(SURROGATES)})")
    if weights and weights not in FEATURIZERS:
        raise SystemExit(f"unknown featurizer in variant {text!r} (expected one of {', '.join(FEATURIZERS)})")
    return Variant(searcher, weights or "none", None if nocap else DEFAULT_MAX_ROWS)


@dataclass
class SteadyRun:
    """One run of consecutive decisions of one variant on one history.

    Attributes:
        first_s: Seconds of the decision before the run: the surrogate's first fit (from a fresh
            initialisation, on every row the cap keeps) and its first candidate scoring.
        decision_s: Seconds of each decision of the run (``ask``: candidates, selection, searcher state).
        full_fits: Fresh fits during the run.
        refine_fits: Warm-started fits during the run.
        promotions: Decisions during the run that skipped the surrogate.
    """

    first_s: float
    decision_s: list[float]
    full_fits: int
    refine_fits: int
    promotions: int


def steady_run(
    base: FreezeThawOptimizer, variant: Variant, decisions: int, device: str | None, modules: ModuleProvider | None
) -> SteadyRun:
    """Time ``decisions`` consecutive decisions of ``variant`` after a history like ``base``'s.

    The searcher is built as a study builds it (:func:`build_searcher` with no surrogate options). The history's
    earlier decisions would already have made the surrogate's initial fresh fits (the first 3 of ``fms``, 10 of
    ``dyhpo``), so the surrogate is told it made all but one of them (``full_fits = 1``): the first decision
    fits from a fresh initialisation (not timed as part of the run) and the run then follows the steady-state
    schedule (``fms``: a fresh fit every ``refit_every``-th fit, warm starts in between; ``dyhpo``: warm starts;
    ``gp``: fresh fits always). Each decision adds an observation.

    Args:
        base: The history (copied, not changed).
        variant: What to time.
        decisions: Decisions in the run.
        device: Surrogate device (``None``: the library default).
        modules: Builds a weight key's module (needed when the variant reads weights).
    """
    opt = copy.deepcopy(base)
    searcher = build_searcher(
        variant.searcher, opt.space, opt.cap, weights=variant.weights, device=device, max_rows=variant.max_rows
    )
    surrogate = searcher.surrogate
    if hasattr(surrogate, "full_fits"):
        surrogate.full_fits = 1
    opt.searcher = searcher
    opt.modules = modules if variant.weights != "none" else None
    opt.budget = opt.epochs_spent + decisions + 8  # room for the first decision and any promotion before it

    def decide() -> float:
        start = time.perf_counter()
        suggestion = opt.ask()
        seconds = time.perf_counter() - start
        if suggestion is None:
            raise SystemExit("the history ran out of candidates; use a larger --cap")
        opt.tell(suggestion.trial_id, suggestion.epoch, synthetic_value(suggestion.config, suggestion.epoch))
        return seconds

    first_s = decide()
    while surrogate.num_fits == 0:  # the first decision was a promotion: the first fit is still to come
        first_s = decide()
    full, refine, decided = surrogate.num_full_fits, surrogate.num_refine_fits, len(opt.decisions)
    seconds = [decide() for _ in range(decisions)]
    promotions = sum(1 for d in opt.decisions[decided:] if d.get("promotion"))
    return SteadyRun(first_s, seconds, surrogate.num_full_fits - full, surrogate.num_refine_fits - refine, promotions)


def interleaved_runs(
    observations: Sequence[int],
    variants: Sequence[Variant],
    repeats: int,
    decisions: int,
    cap: int,
    fresh: int,
    device: str | None,
    hub: ModelHub | None,
    uncapped_decisions: int = 3,
) -> dict[tuple[str, int], list[SteadyRun]]:
    """Steady runs of every variant at every size, interleaved: per repeat all variants on one history,
    in the given order on even repeats and reversed on odd ones.

    Args:
        observations: History sizes (told epochs before the run).
        variants: What to time. ``/nocap`` variants run only at the largest size (where the cap bites), on the
            first history, for ``uncapped_decisions`` decisions: an uncapped fit there costs minutes.
        repeats: Histories per size (seeds ``0 .. repeats - 1``).
        decisions: Decisions per run.
        cap: Per-trial epoch cap.
        fresh: Fresh candidates per decision.
        device: Surrogate device.
        hub: Model hub whose entries are the hub choice (needed by variants that read weights).
        uncapped_decisions: Decisions per run of a ``/nocap`` variant.

    Returns:
        The runs of each ``(variant label, observations)``.
    """
    names = list(hub.names) if hub is not None else None
    modules = None
    if hub is not None:

        def modules(key, config):
            return _module(hub, key, config["hub"])

    runs: dict[tuple[str, int], list[SteadyRun]] = {}
    for n in observations:
        for repeat in range(repeats):
            base = history(n, cap, seed=repeat, hub_names=names)
            base.num_fresh_candidates = fresh
            here = [v for v in variants if v.max_rows is not None or (n == max(observations) and repeat == 0)]
            for variant in here if repeat % 2 == 0 else here[::-1]:
                count = decisions if variant.max_rows is not None else uncapped_decisions
                run = steady_run(base, variant, count, device, modules)
                runs.setdefault((variant.label, n), []).append(run)
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                print(f"  {variant.label} n={n} repeat {repeat}: mean {statistics.mean(run.decision_s):.3f} s, "
                      f"load average {load:.2f}", file=sys.stderr, flush=True)  # fmt: skip
    return runs


def steady_table(runs: dict[tuple[str, int], list[SteadyRun]]) -> list[str]:
    """Markdown rows: mean and worst seconds per decision over all runs of a variant and size, and the schedule."""
    lines = [
        "| searcher | observations | rows fitted | mean decision (s) | worst decision (s) "
        "| first fit (s, not in the run) | fresh / warm fits / promotions |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, n), group in runs.items():
        seconds = [s for run in group for s in run.decision_s]
        first = statistics.median(run.first_s for run in group)
        schedule = "/".join(str(sum(getattr(r, k) for r in group)) for k in ("full_fits", "refine_fits", "promotions"))
        rows = n if label.endswith("/nocap") or label.startswith("random") else min(n, DEFAULT_MAX_ROWS)
        lines.append(
            f"| {label} | {n} | {rows} | {statistics.mean(seconds):.3f} | {max(seconds):.3f} | {first:.3f} "
            f"| {schedule} |"
        )
    return lines


def mean_decision(runs: dict[tuple[str, int], list[SteadyRun]], label: str, n: int) -> float | None:
    """Mean seconds per decision of ``label`` at ``n`` observations (``None`` when not measured)."""
    group = runs.get((label, n))
    return None if not group else statistics.mean(s for run in group for s in run.decision_s)


def cost_ratios(runs: dict[tuple[str, int], list[SteadyRun]]) -> list[tuple[str, float, float | None]]:
    """The issue's cost ratios that the runs allow: ``(what, ratio, goal or None)``."""
    sizes = sorted({n for _, n in runs})
    small, large = sizes[0], sizes[-1]
    out = []

    def add(what: str, top: float | None, bottom: float | None, goal: float | None = None) -> None:
        if top is not None and bottom:
            out.append((what, top / bottom, goal))

    add(f"fms / gp at {small} observations", mean_decision(runs, "fms", small), mean_decision(runs, "gp", small), 2.0)
    add(f"fms at {large} / fms at {small}", mean_decision(runs, "fms", large), mean_decision(runs, "fms", small), 5.0)
    for n in sizes:
        add(f"dyhpo / gp at {n}", mean_decision(runs, "dyhpo", n), mean_decision(runs, "gp", n))
    for n in sizes:
        add(f"fms+summary / fms at {n}", mean_decision(runs, "fms+summary", n), mean_decision(runs, "fms", n))
    add(f"fms/nocap / fms at {large}", mean_decision(runs, "fms/nocap", large), mean_decision(runs, "fms", large))
    return out


def steady_main(args: argparse.Namespace) -> None:
    """Print the steady-state table and the ratios."""
    variants = [parse_variant(v) for v in args.variants]
    variants += [Variant(v.searcher, v.weights, None) for v in map(parse_variant, args.uncapped)]
    hub = None
    if any(v.weights != "none" for v in variants):
        hub = load_hub(args.hub)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {args.device or 'library default'}, load average at start {load:.2f}")  # fmt: skip
    print(f"{args.decisions} decisions per run ({args.uncapped_decisions} uncapped), {args.repeats} repeats "
          f"interleaved, candidates: paused + {args.fresh} "
          f"fresh, cap {args.cap} epochs, row cap {DEFAULT_MAX_ROWS}\n")  # fmt: skip
    runs = interleaved_runs(
        args.observations,
        variants,
        args.repeats,
        args.decisions,
        args.cap,
        args.fresh,
        args.device,
        hub,
        args.uncapped_decisions,
    )
    print("\n".join(steady_table(runs)))
    print()
    for what, ratio, goal in cost_ratios(runs):
        verdict = "" if goal is None else f" (goal <= {goal:g}x: {'met' if ratio <= goal else 'NOT met'})"
        print(f"- {what}: {ratio:.2f}x{verdict}")
    end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average at end {end:.2f}")


def load_hub(path: str | None) -> ModelHub:
    """The hub at ``path`` (a hub.yaml), or the demo hub built into the cache."""
    if path:
        return ModelHub.from_yaml(path)
    from lightning_fms.zoo import build_demo_hub, default_cache_dir

    return build_demo_hub(default_cache_dir() / "hubs" / "demo")


def fit_main(args: argparse.Namespace) -> None:
    """Print a markdown table of one full-fit and one warm-started decision per searcher and size."""
    featurizer_options = dict(item.split("=", 1) for item in args.featurizer_option)
    hub = load_hub(args.hub) if args.weights != ["none"] else None
    torch.manual_seed(0)
    np.random.seed(0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} torch threads, device {device}")
    print(f"candidates per decision: paused trials + {args.fresh} fresh; median of {args.repeats} repeats")
    print(f"full fits: {args.full_fit_steps} steps; featurizer options: {featurizer_options or 'defaults'}\n")
    print("| searcher | weights | observations | full fit decision (s) | warm-started decision (s) |")
    print("|---|---|---|---|---|")
    for name in args.searchers:
        for weights in args.weights:
            if weights != "none" and name != "dyhpo":
                continue
            for n in args.observations or [25, 50, 100]:
                full, warm = time_decisions(
                    n,
                    name,
                    args.cap,
                    args.fresh,
                    args.repeats,
                    device,
                    weights,
                    hub,
                    {"full_fit_steps": args.full_fit_steps},
                    featurizer_options,
                )
                print(f"| {name} | {weights} | {n} | {full:.3f} | {warm:.3f} |", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags; time steady-state decisions with ``--steady``, else full and warm-started fits."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--observations", type=int, nargs="+", default=None,
                        help="history sizes (default: 25 50 100; with --steady 100 500 2000)")  # fmt: skip
    parser.add_argument("--searchers", nargs="+", default=list(SURROGATES), help="surrogate searchers")
    parser.add_argument("--cap", type=int, default=20)
    parser.add_argument("--fresh", type=int, default=DEFAULT_FRESH_CANDIDATES, help="fresh candidates per decision")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--weights", nargs="+", default=["none"], help=f"featurizers: none {' '.join(FEATURIZERS)}")
    parser.add_argument("--hub", default=None, help="hub.yaml for weights (default: the demo hub in the cache)")
    parser.add_argument("--full-fit-steps", type=int, default=1000, help="steps of a from-scratch fit (paper: 1000)")
    parser.add_argument("--featurizer-option", action="append", default=[], help="KEY=VALUE, e.g. trainable=readout")
    steady = parser.add_argument_group("steady-state decisions (library defaults)")
    steady.add_argument("--steady", action="store_true", help="time runs of consecutive decisions")
    steady.add_argument("--decisions", type=int, default=5, help="decisions per run (fms refits fresh every 5th)")
    steady.add_argument("--variants", nargs="+", default=["fms", "fms+summary", "gp", "dyhpo"],
                        help="SEARCHER[+WEIGHTS][/nocap]")  # fmt: skip
    steady.add_argument("--uncapped", nargs="*", default=["fms"],
                        help="variants also run uncapped at the largest size, first repeat only")  # fmt: skip
    steady.add_argument("--uncapped-decisions", type=int, default=3, help="decisions per run without the cap")
    args = parser.parse_args(argv)
    if args.steady:
        args.observations = args.observations or [100, 500, 2000]
        steady_main(args)
    else:
        fit_main(args)


if __name__ == "__main__":
    main()

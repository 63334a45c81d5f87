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
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import statistics
import time

import numpy as np
import torch

from lightning_fms import FMSError, FreezeThawOptimizer, ModelHub, SearchSpace
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


def main() -> None:
    """Print a markdown table of surrogate seconds per decision."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--observations", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--searchers", nargs="+", default=list(SURROGATES), help="surrogate searchers")
    parser.add_argument("--cap", type=int, default=20)
    parser.add_argument("--fresh", type=int, default=64, help="fresh candidates per decision")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--weights", nargs="+", default=["none"], help=f"featurizers: none {' '.join(FEATURIZERS)}")
    parser.add_argument("--hub", default=None, help="hub.yaml for --weights (default: the demo hub in the cache)")
    parser.add_argument("--full-fit-steps", type=int, default=1000, help="steps of a from-scratch fit (paper: 1000)")
    parser.add_argument("--featurizer-option", action="append", default=[], help="KEY=VALUE, e.g. trainable=readout")
    args = parser.parse_args()
    featurizer_options = dict(item.split("=", 1) for item in args.featurizer_option)
    hub = None
    if args.weights != ["none"]:
        from lightning_fms.zoo import build_demo_hub, default_cache_dir

        hub = ModelHub.from_yaml(args.hub) if args.hub else build_demo_hub(default_cache_dir() / "hubs" / "demo")
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
            for n in args.observations:
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


if __name__ == "__main__":
    main()

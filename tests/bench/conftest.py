"""Fixtures of the benchmark tests: synthetic in-memory pools over the tiny hub and fast method options."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from lightning_fms.bench.methods import RunOptions
from lightning_fms.bench.pool import Pool
from lightning_fms.hub import ModelHub
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import SearchSpace


class PerturbedHub:
    """``(index, epoch) -> module``: the configuration's hub entry with weights perturbed per (index, epoch).

    A class (not a closure) so that a pool using it pickles (``run_bench(..., jobs=2)`` sends pools to spawned
    workers, which import this module as ``bench.conftest``).
    """

    def __init__(self, hub: ModelHub, configs: list[dict[str, Any]], hub_key: str = "hub") -> None:
        self.hub = hub
        self.configs = configs
        self.hub_key = hub_key
        self._base: dict[str, dict[str, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_base": {}}

    def hub_module(self, name: str) -> torch.nn.Module:
        if name not in self._base:
            self._base[name] = {k: v.clone() for k, v in self.hub.build(name).state_dict().items()}
        module = self.hub.build(name)
        module.load_state_dict(self._base[name])
        return module

    def __call__(self, index: int, epoch: int) -> torch.nn.Module:
        module = self.hub_module(self.configs[index][self.hub_key])
        if epoch > 0:
            generator = torch.Generator().manual_seed(derive_seed("synthetic", index, epoch))
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.01 * epoch * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        return module


@pytest.fixture(scope="session")
def synthetic_pool(hub) -> Callable[..., Pool]:
    """``synthetic_pool(n=40, epochs=6, seed=0, mode="max", name="synthetic") -> Pool`` over the tiny hub.

    The pool's curves rise with the epoch to a level set by the hub entry, lr and momentum (``n`` configurations,
    ``epochs`` values each, ``1 - value`` in ``mode="min"``); a fresh pool per call, safe to change.
    """

    def make(n: int = 40, epochs: int = 6, seed: int = 0, mode: str = "max", name: str = "synthetic") -> Pool:
        space = SearchSpace.from_dict(
            {
                "hub": {"type": "hub"},
                "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
                "model.momentum": {"type": "float", "low": 0.0, "high": 0.9},
            },
            hub_entries=hub.names,
        )
        rng = np.random.default_rng(seed)
        configs = [space.sample(rng) for _ in range(n)]
        quality = {entry: 0.55 + 0.05 * k for k, entry in enumerate(hub.names)}
        level = np.array(
            [
                quality[c["hub"]] - 0.1 * (math.log10(c["model.lr"]) + 1.5) ** 2 + 0.05 * c["model.momentum"]
                for c in configs
            ]
        )
        tau = 0.5 + 3 * rng.random(n)
        k = np.arange(1, epochs + 1)
        val = level[:, None] * (1 - np.exp(-k[None, :] / tau[:, None])) + 0.005 * rng.standard_normal((n, epochs))
        test = val + 0.02 * rng.standard_normal((n, epochs))
        seconds = 1.0 + 0.5 * rng.random((n, epochs))
        if mode == "min":
            val, test = 1 - val, 1 - test
        loader = PerturbedHub(hub, configs)
        return Pool(name, space, configs, val, test, seconds, mode, loader, loader.hub_module, {"seed": seed})

    return make


@pytest.fixture
def fast_options() -> RunOptions:
    """Method options that keep a surrogate-driven run on a synthetic pool to seconds (fresh per test)."""
    return RunOptions(
        surrogate_options={"full_fit_steps": 30, "refine_steps": 5, "full_fits": 1},
        gp_options={"steps": 20},
        num_fresh_candidates=16,
    )

"""Methods run side by side on a tabulated pool, each spending exactly the same number of epochs.

``run_method(name, pool, budget, seed)`` replays a method on a :class:`~lightning_fms.bench.pool.Pool`:
"training" epoch ``k`` of configuration ``i`` costs ``pool.train_seconds[i, k-1]`` and yields
``pool.val[i, k-1]``. The :class:`~lightning_fms.bench.ledger.Ledger` keeps the books every method shares: one
row per epoch spent with the validation-selected incumbent, the tabulated training seconds and the method's own
measured decision seconds (surrogate fits, Optuna's sampler, ...).

Methods (:data:`METHODS`):

* ``fms``: the library default as a study gets it: the searcher, featurizer and curve encoder
  :class:`~lightning_fms.options.StudyOptions` declares as defaults (read at run time), with the surrogate's own
  default options; ``fms-hidden``: the same in the hidden hub regime.
* ``fms-gmn``, ``fms-nfn``, ``fms-flat``, ``fms-stats``: the freeze-thaw optimizer with the deep-kernel GP
  reading learning curves and the checkpointed weights through that featurizer; ``fms-*-nocnn`` drop the
  learning-curve CNN branch.
* ``dyhpo``: the same without weights; ``gp``: a plain GP on hyperparameters and budget; ``random``: random
  pool configurations, each trained to the cap, one after another.
* ``hyperband``, ``asha``, ``optuna``: see :mod:`lightning_fms.bench.peers`.

Hub regimes: by default every surrogate sees the hub choice's one-hot columns; the ``-hidden`` methods
(``fms-hidden``, ``dyhpo-hidden``, ``gp-hidden``) zero them, so the surrogate does not see which hub entry a
configuration starts from (the paper's setting; a weight featurizer still reads the weights). Random search,
Hyperband and ASHA do not model the hub, so they are the same in both regimes; Optuna's TPE samples the hub
choice and sees it in both.

Seeding: the optimizer-based methods share, for a given ``seed``, the order in which pool configurations are
offered and the optimizer's random stream (common random numbers: ``dyhpo`` and ``fms-gmn`` with seed 3 start
from the same random configurations); everything specific to a method (surrogate and featurizer initial
parameters, the peers' samplers) is seeded from ``(seed, method)``. A rerun makes identical choices; only the
measured decision seconds differ.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lightning_fms.atomic import sha256_file
from lightning_fms.bench import peers
from lightning_fms.bench.ledger import BudgetSpent, Ledger
from lightning_fms.bench.metrics import rank_correlation, to_scores
from lightning_fms.bench.pool_data import Pool
from lightning_fms.errors import FMSError, one_line
from lightning_fms.options import declared_default
from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.rows import WeightKey
from lightning_fms.search.searcher import resolve_weights, seeded_searcher
from lightning_fms.search.seeds import derive_seed
from lightning_fms.threads import torch_threads
from lightning_fms.weights.registry import FEATURIZERS

#: Columns of :attr:`MethodRun.rows`, one row per epoch spent.
ROW_COLUMNS = (
    "epochs_spent",
    "config",
    "epoch",
    "val",
    "test",
    "best_val",
    "incumbent_test",
    "train_s",
    "decision_s",
    "wall_s",
)


@dataclass
class MethodRun:
    """What one method did on one pool with one seed.

    Attributes:
        method: Method name.
        task: The pool's name.
        seed: The seed.
        budget: Epochs the method was given.
        rows: One dict per epoch spent, keys :data:`ROW_COLUMNS`: ``config`` (pool index) and ``epoch`` trained,
            its ``val`` and ``test`` values, the validation-selected incumbent's ``best_val`` and
            ``incumbent_test``, and cumulative ``train_s`` (tabulated), ``decision_s`` (measured) and
            ``wall_s`` (their sum).
        kendall: One dict per forecast check (surrogate methods): ``epochs_spent``, ``kendall_tau``,
            ``kendall_p``, ``spearman``, ``n_configs`` and ``predicted`` (the ``[N]`` forecast final scores in
            pool order).
        run_s: Seconds the whole run took in this process (forecast checks included).
        exhausted: Whether the method ran out of trainable epochs before the budget.
        settings: What the run depended on besides the pool (options of the method).
        notes: The distinct warnings the method raised (e.g. a featurizer falling back to statistics for an
            architecture it cannot read), recorded instead of printed once per run.
    """

    method: str
    task: str
    seed: int
    budget: int
    rows: list[dict[str, Any]]
    kendall: list[dict[str, Any]] = field(default_factory=list)
    run_s: float = 0.0
    exhausted: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def epochs_spent(self) -> int:
        """Epochs the method spent."""
        return len(self.rows)

    @property
    def trials_started(self) -> int:
        """Distinct pool configurations the method began (the freeze-thaw policy's breadth)."""
        return len({int(row["config"]) for row in self.rows})

    def column(self, name: str) -> np.ndarray:
        """``[T]`` values of one row column (float64)."""
        return np.array([row[name] for row in self.rows], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready)."""
        return {
            "method": self.method,
            "task": self.task,
            "seed": self.seed,
            "budget": self.budget,
            "rows": [dict(r) for r in self.rows],
            "kendall": [dict(k) for k in self.kendall],
            "run_s": self.run_s,
            "exhausted": self.exhausted,
            "settings": dict(self.settings),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodRun:
        """Inverse of :meth:`to_dict`."""
        return cls(
            method=str(data["method"]),
            task=str(data["task"]),
            seed=int(data["seed"]),
            budget=int(data["budget"]),
            rows=[dict(r) for r in data["rows"]],
            kendall=[dict(k) for k in data.get("kendall", [])],
            run_s=float(data.get("run_s", 0.0)),
            exhausted=bool(data.get("exhausted", False)),
            settings=dict(data.get("settings", {})),
            notes=[str(n) for n in data.get("notes", [])],
        )


@dataclass(frozen=True)
class RunOptions:
    """Options of the surrogate methods (the peers ignore them); part of every cached run's settings.

    The defaults are the library's: empty option dicts (each surrogate's and featurizer's own defaults) and the
    study's declared candidate and start-up counts, read when the options are made.

    Attributes:
        surrogate_options: Keyword arguments of the deep-kernel surrogate (searcher ``dyhpo``: ``dyhpo``,
            ``fms-*``, and ``fms`` when it resolves to ``dyhpo``).
        gp_options: Keyword arguments of the plain GP (searcher ``gp``).
        fms_options: Keyword arguments of the FMS surrogate (searcher ``fms``).
        featurizer_options: Keyword arguments of the featurizer.
        num_fresh_candidates: Fresh pool configurations scored per decision.
        num_startup_trials: Random configurations started before the searcher is consulted.
        prior: The prior file of the methods that use one (``*-prior``; set per held-out task by the runner's
            leave-one-task-out protocol, :mod:`lightning_fms.bench.transfer`); ignored by the other methods.
    """

    surrogate_options: dict[str, Any] = field(default_factory=dict)
    gp_options: dict[str, Any] = field(default_factory=dict)
    fms_options: dict[str, Any] = field(default_factory=dict)
    featurizer_options: dict[str, Any] = field(default_factory=dict)
    num_fresh_candidates: int = field(default_factory=lambda: declared_default("num_fresh_candidates"))
    num_startup_trials: int = field(default_factory=lambda: declared_default("num_startup_trials"))
    prior: str | None = None

    def options_for(self, searcher: str) -> dict[str, Any]:
        """The surrogate keyword arguments of a searcher (``{}`` for one without a surrogate)."""
        by_searcher = {"dyhpo": self.surrogate_options, "gp": self.gp_options, "fms": self.fms_options}
        return dict(by_searcher.get(searcher) or {})

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what a cached run must match)."""
        return {
            "surrogate_options": dict(self.surrogate_options or {}),
            "gp_options": dict(self.gp_options or {}),
            "fms_options": dict(self.fms_options or {}),
            "featurizer_options": dict(self.featurizer_options or {}),
            "num_fresh_candidates": self.num_fresh_candidates,
            "num_startup_trials": self.num_startup_trials,
            # only with a prior: a run without one keeps the settings (and the cache) it had before priors existed
            **({} if self.prior is None else {"prior": sha256_file(Path(self.prior))}),
        }


@dataclass(frozen=True)
class FreezeThawChoice:
    """What a freeze-thaw method runs: the searcher, its featurizer and curve encoder, and the hub regime.

    Attributes:
        searcher: A name of :data:`~lightning_fms.search.searcher.SEARCHERS`.
        weights: ``"none"`` or a featurizer name.
        curve: A curve encoder name.
        hide_hub: The hidden regime: the surrogate does not see which hub entry a configuration starts from.
    """

    searcher: str
    weights: str = "none"
    curve: str = "cnn"
    hide_hub: bool = False

    @classmethod
    def library_default(cls, hide_hub: bool = False) -> FreezeThawChoice:
        """The searcher, featurizer and curve encoder a study gets by default (read now, not at import)."""
        return cls(
            str(declared_default("searcher")),
            str(declared_default("weights")),
            str(declared_default("curve")),
            hide_hub,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (part of a cached run's settings)."""
        return {"searcher": self.searcher, "weights": self.weights, "curve": self.curve, "hide_hub": self.hide_hub}


#: ``(pool, ledger, seed, options, forecast_check) -> None``; ``forecast_check`` is called after every epoch.
MethodFn = Callable[[Pool, Ledger, int, RunOptions, Callable[[Any], None]], None]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: Registry name.
        description: One line for reports, or a function that writes it (for a method resolved at run time).
        forecasts: Whether the method has a surrogate whose forecasts get a Kendall tau.
        run: Spends the ledger's budget.
        choice: For a freeze-thaw method, what it runs (a function, called at run time); ``None`` for the peers.
        prior_kind: For a method that starts from a prior pretrained on the other tasks, the prior's kind (a key
            of :data:`lightning_fms.bench.transfer.PRIOR_KINDS`); ``None`` otherwise.
    """

    name: str
    description: str | Callable[[], str]
    forecasts: bool
    run: MethodFn
    choice: Callable[[], FreezeThawChoice] | None = None
    prior_kind: str | None = None

    def describe(self) -> str:
        """The one-line description."""
        return self.description() if callable(self.description) else self.description

    def settings(self) -> dict[str, Any]:
        """What the method resolves to now (``{}`` for the peers); part of a cached run's settings."""
        return self.choice().to_dict() if self.choice is not None else {}


class PoolModules:
    """The optimizer's module provider on a pool: ``("hub", name)`` and ``("trial", id, epoch)`` keys, cached.

    Args:
        pool: The pool.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._cache: dict[WeightKey, nn.Module] = {}

    def __call__(self, key: WeightKey, config: dict[str, Any]) -> nn.Module:
        """The module with the weights behind ``key`` (``config`` is the trial's configuration)."""
        module = self._cache.get(key)
        if module is not None:
            return module
        if key[0] == "hub":
            module = self.pool.load_hub_module(str(key[1]))
        elif key[0] == "trial":
            module = self.pool.module(self.pool.index_of(config), int(key[2]))
        else:
            raise ValueError(f"unknown weight key {key!r}")
        module.eval().requires_grad_(False)
        self._cache[key] = module
        return module


def _freeze_thaw(choose: Callable[[], FreezeThawChoice], uses_prior: bool = False) -> MethodFn:
    def run(pool: Pool, ledger: Ledger, seed: int, options: RunOptions, check: Callable[[Any], None]) -> None:
        if uses_prior and options.prior is None:
            raise FMSError("a *-prior method needs a prior: run it through the benchmark's leave-one-task-out protocol")
        _run_optimizer(pool, ledger, seed, options, check, choose(), options.prior if uses_prior else None)

    return run


def _run_optimizer(
    pool: Pool,
    ledger: Ledger,
    seed: int,
    options: RunOptions,
    check: Callable[[Any], None],
    choice: FreezeThawChoice,
    prior: str | None = None,
) -> None:
    """Run :class:`FreezeThawOptimizer` on the pool: ask, look the epoch up, tell."""
    space = pool.space
    weights = resolve_weights(choice.searcher, space, choice.weights)
    modules = PoolModules(pool) if weights != "none" else None
    # the hub regime is left out: a -hidden variant starts from the same surrogate initialisation (paired)
    method_key = (choice.searcher, weights, choice.curve)
    with ledger.deciding():
        # the surrogate's and featurizer's initial parameters depend on (seed, method) only
        search = seeded_searcher(
            choice.searcher,
            space,
            pool.epochs,
            seed=derive_seed("bench", "searcher", method_key, seed),
            modules=modules,
            weights=weights,
            curve=choice.curve,
            device="cpu",
            surrogate_options=options.options_for(choice.searcher),
            featurizer_options=options.featurizer_options,
            hide_hub=choice.hide_hub,
            prior=prior,
        )
    # a per-seed order of the pool: the optimizer offers the first of a random subset of not-yet-started
    # configurations, so the list order must not carry structure (pools may be built grouped by hub entry)
    order = np.random.default_rng(derive_seed("bench", "order", seed)).permutation(pool.size)
    opt = FreezeThawOptimizer(
        space,
        search,
        budget=ledger.budget,
        max_epochs_per_trial=pool.epochs,
        mode=pool.mode,
        seed=derive_seed("bench", "optimizer", seed),
        num_fresh_candidates=options.num_fresh_candidates,
        num_startup_trials=options.num_startup_trials,
        configurations=[pool.configs[j] for j in order],
        modules=modules,
    )
    while not ledger.done:
        with ledger.deciding():
            suggestion = opt.ask()
        if suggestion is None:
            return
        index = pool.index_of(suggestion.config)
        value = ledger.train(index, suggestion.epoch)
        with ledger.deciding():
            opt.tell(
                suggestion.trial_id, suggestion.epoch, value, float(pool.train_seconds[index, suggestion.epoch - 1])
            )
        check(opt)


#: The hub-regime note of the methods without a surrogate that could see the hub choice.
_NO_HUB_MODEL = "does not model the hub choice, so it is the same in both hub regimes"


def _fixed(choice: FreezeThawChoice) -> Callable[[], FreezeThawChoice]:
    return lambda: choice


def _library_default_description(hide_hub: bool) -> Callable[[], str]:
    def describe() -> str:
        choice = FreezeThawChoice.library_default(hide_hub)
        regime = "hub entry hidden from the surrogate" if hide_hub else "hub entry visible"
        return (
            f"the library default, as a study gets it: searcher {choice.searcher}, weights {choice.weights}, "
            f"curve {choice.curve}, the surrogate's own default options; {regime}"
        )

    return describe


def _spec_table() -> dict[str, MethodSpec]:
    table: dict[str, MethodSpec] = {}
    for hidden in (False, True):
        name = "fms-hidden" if hidden else "fms"
        table[name] = MethodSpec(
            name,
            _library_default_description(hidden),
            True,
            _freeze_thaw(lambda hidden=hidden: FreezeThawChoice.library_default(hidden)),
            lambda hidden=hidden: FreezeThawChoice.library_default(hidden),
        )
    for hidden in (False, True):  # the library default's surrogate without weights: what the weights add
        name = "fms-noweights-hidden" if hidden else "fms-noweights"
        choice = FreezeThawChoice("fms", "none", "cnn", hide_hub=hidden)
        regime = "hub entry hidden from the surrogate" if hidden else "hub entry visible"
        table[name] = MethodSpec(
            name,
            f"the library's fms searcher (plain-GP kernel plus the curve term) without a weight term; {regime}",
            True,
            _freeze_thaw(_fixed(choice)),
            _fixed(choice),
        )
    variants = [
        (f"fms-{f}", f"FMS: deep-kernel GP on hyperparameters, learning curve and {f} weight embedding", f, "cnn")
        for f in FEATURIZERS
    ] + [
        (f"fms-{f}-nocnn", f"FMS without the learning-curve CNN ({f} weight embedding)", f, "none") for f in FEATURIZERS
    ]
    for name, text, featurizer, curve in variants:
        choice = FreezeThawChoice("dyhpo", featurizer, curve)
        table[name] = MethodSpec(name, text, True, _freeze_thaw(_fixed(choice)), _fixed(choice))
    for searcher, text in (
        ("dyhpo", "DyHPO: deep-kernel GP on hyperparameters and learning curve"),
        ("gp", "plain GP on hyperparameters and budget, freeze-thaw"),
    ):
        for hidden in (False, True):
            name = f"{searcher}-hidden" if hidden else searcher
            choice = FreezeThawChoice(searcher, hide_hub=hidden)
            regime = "hub entry hidden from the surrogate (the paper's setting)" if hidden else "hub entry visible"
            table[name] = MethodSpec(name, f"{text}; {regime}", True, _freeze_thaw(_fixed(choice)), _fixed(choice))
    prior_text = "pretrained on the other tasks' pools only (leave one task out)"
    for name, kind, choose, text in (
        ("fms-prior", "fms", FreezeThawChoice.library_default, "the library default (searcher fms, weights auto)"),
        ("fms-noweights-prior", "fms-noweights", _fixed(FreezeThawChoice("fms", "none")), "fms without weights"),
        (
            "dyhpo-prior",
            "dyhpo",
            _fixed(FreezeThawChoice("dyhpo")),
            "DyHPO's deep kernel, meta-trained without weights",
        ),
    ):
        table[name] = MethodSpec(
            name,
            f"{text}, every fresh surrogate fit starting from a prior {prior_text}; hub entry visible",
            True,
            _freeze_thaw(choose, uses_prior=True),
            choose,
            prior_kind=kind,
        )
    random_choice = FreezeThawChoice("random")
    table["random"] = MethodSpec(
        "random",
        f"random search, each configuration trained to the cap; {_NO_HUB_MODEL}",
        False,
        _freeze_thaw(_fixed(random_choice)),
        _fixed(random_choice),
    )
    table["hyperband"] = MethodSpec(
        "hyperband", f"{peers.HYPERBAND_DESCRIPTION}; {_NO_HUB_MODEL}", False, _peer(peers.run_hyperband)
    )
    table["asha"] = MethodSpec("asha", f"{peers.ASHA_DESCRIPTION}; {_NO_HUB_MODEL}", False, _peer(peers.run_asha))
    table["optuna"] = MethodSpec(
        "optuna",
        f"{peers.OPTUNA_DESCRIPTION}; TPE samples the hub choice as a categorical, so it sees the hub entry "
        "(left visible in both regimes)",
        False,
        _peer(peers.run_optuna),
    )
    return table


def _peer(fn: Callable[[Pool, Ledger, int], None]) -> MethodFn:
    def run(pool: Pool, ledger: Ledger, seed: int, options: RunOptions, check: Callable[[Any], None]) -> None:
        fn(pool, ledger, seed)

    return run


#: Every method by name, in report order.
METHODS: dict[str, MethodSpec] = _spec_table()
#: The method the paired comparisons judge: the library default.
REFERENCE_METHOD = "fms"
#: The non-FMS methods: neither the library default nor a weight-reading FMS variant (the paired comparisons'
#: baselines).
BASELINES: tuple[str, ...] = ("gp", "gp-hidden", "dyhpo", "dyhpo-hidden", "random", "hyperband", "asha", "optuna")
#: What ``lightning-fms bench --quick`` runs: the library default against the cheap baselines.
QUICK_METHODS: tuple[str, ...] = ("fms", "gp", "random", "hyperband")


def check_methods(names: Sequence[str]) -> list[str]:
    """Return ``names`` as a list, or raise a one-line :class:`FMSError` naming the unknown ones and the known ones."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise FMSError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return list(names)


def run_method(
    name: str,
    pool: Pool,
    budget: int,
    seed: int,
    kendall_at: Sequence[int] = (50, 100),
    *,
    options: RunOptions | None = None,
) -> MethodRun:
    """Run one method on a pool until it has spent ``budget`` epochs.

    Args:
        name: A key of :data:`METHODS`.
        pool: The tabulated pool.
        budget: Epochs to spend (``1 .. N * E``).
        seed: Seeds every choice of the method (a rerun makes the same choices).
        kendall_at: Epochs spent at which a surrogate method forecasts every pool configuration's final
            validation score; Kendall's tau and Spearman's rho against the true final scores (same
            configurations on both sides) are recorded. Values above ``budget`` are skipped; the forecast's
            seconds are not charged to the method.
        options: Surrogate options (see :class:`RunOptions`).

    Returns:
        The run's record.

    Raises:
        FMSError: an unknown method, a budget out of range, or a featurizer that cannot read the pool.
    """
    check_methods([name])
    spec = METHODS[name]
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, np.integer))
        or not 1 <= budget <= pool.size * pool.epochs
    ):
        raise FMSError(
            f"budget must be an integer in [1, {pool.size * pool.epochs}] epochs for pool {pool.name!r}, got {budget!r}"
        )
    options = options or RunOptions()
    ledger = Ledger(pool, int(budget))
    checks = sorted({int(k) for k in kendall_at if 1 <= int(k) <= budget})
    true_final = to_scores(pool.val[:, -1], pool.mode)
    kendall: list[dict[str, Any]] = []

    def forecast_check(opt: Any) -> None:
        if not spec.forecasts or ledger.spent not in checks or any(k["epochs_spent"] == ledger.spent for k in kendall):
            return
        try:
            mean, _ = opt.predict(pool.configs)
        except FMSError:
            mean = np.full(pool.size, np.nan)
        kendall.append(
            {"epochs_spent": ledger.spent, **rank_correlation(mean, true_final), "predicted": [float(m) for m in mean]}
        )

    start = time.perf_counter()
    with torch_threads(1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            spec.run(pool, ledger, int(seed), options, forecast_check)
        except BudgetSpent:
            pass
    notes = list(dict.fromkeys(one_line(w.message) for w in caught if issubclass(w.category, UserWarning)))
    return MethodRun(
        method=name,
        task=pool.name,
        seed=int(seed),
        budget=int(budget),
        rows=ledger.rows,
        kendall=kendall,
        run_s=time.perf_counter() - start,
        exhausted=not ledger.done,
        settings={"kendall_at": checks, **spec.settings(), **(options.to_dict() if spec.forecasts else {})},
        notes=notes,
    )

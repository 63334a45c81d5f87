"""Peer methods on a tabulated pool: Hyperband, ASHA and Optuna (TPE + its Hyperband pruner).

All three spend epochs through a :class:`~lightning_fms.bench.ledger.Ledger` and stop exactly at its budget.

**Rungs.** Hyperband and ASHA promote at the epochs ``min_epochs * eta**k`` below the cap ``E`` and at ``E``
itself (``E = 20, eta = 3``: 1, 3, 9, 20), the bottom-anchored ladder Optuna's pruner uses too.

**Hyperband** (Li et al., 2018) over pool configurations: bracket ``s = s_max .. 0`` starts
``ceil((s_max + 1) / (s + 1) * eta**s)`` configurations at rung ``s_max - s`` and runs successive halving:
after each rung the best ``floor(n / eta)`` (at least one) by validation value *at that rung's epoch* go on.
Brackets repeat until the budget is spent. Freeze-thaw style: a promoted configuration continues from where
it stopped, so promotion costs only the extra epochs. Within a rung configurations are trained one after
another, each up to the rung. Configurations are drawn at random without replacement; when the pool has no
unused one left, the least-trained configurations below the cap are continued.

**ASHA** (Li et al., 2020) with one worker: whenever an epoch is to be spent, the highest rung holding a
configuration in its top ``1/eta`` that was not promoted yet promotes it (continued to the next rung); else a
fresh random configuration starts at the first rung.

**Optuna**: ``TPESampler(seed)`` with ``HyperbandPruner(min_resource=1, max_resource=E, reduction_factor=3)``
through the ask/tell API. The pool is finite, so each trial's suggested parameters (``suggest_float`` with
``log`` where the space is log, ``suggest_int``, ``suggest_categorical`` for categoricals and the hub choice)
are mapped to the *nearest not-yet-used* pool configuration, by Euclidean distance in the space's unit-cube
encoding (:meth:`~lightning_fms.search.space.SearchSpace.encode`: log-scaled numbers in ``[0, 1]``, one-hot
categoricals, so a different hub entry costs ``sqrt(2)``, more than any numeric difference within one
parameter). Optuna is told the parameters it suggested; the values reported are that pool configuration's
tabulated curve, epoch by epoch, until the pruner stops it or it reaches ``E`` (the trial's value is then its
last epoch's). When every pool configuration was used, the nearest one overall is trained again from epoch 1.
The sampler's, pruner's and the mapping's seconds are the method's decision time.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_fms.bench.metrics import to_scores
from lightning_fms.errors import FMSError
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import CategoricalParam, FloatParam, IntParam

if TYPE_CHECKING:
    from lightning_fms.bench.ledger import Ledger
    from lightning_fms.bench.pool_data import Pool

HYPERBAND_DESCRIPTION = "Hyperband (eta 3, min 1 epoch), promoted configurations continue (freeze-thaw)"
ASHA_DESCRIPTION = "ASHA (eta 3, min 1 epoch), one worker, promoted configurations continue"
OPTUNA_DESCRIPTION = "Optuna TPE + HyperbandPruner (eta 3), suggestions mapped to the nearest unused pool configuration"

ETA = 3
MIN_EPOCHS = 1


def rung_epochs(max_epochs: int, eta: int = ETA, min_epochs: int = MIN_EPOCHS) -> list[int]:
    """Epochs at which configurations are compared: ``min_epochs * eta**k`` below ``max_epochs``, then the cap."""
    if eta < 2 or min_epochs < 1 or max_epochs < min_epochs:
        raise FMSError(f"need eta >= 2 and 1 <= min_epochs <= max_epochs, got {eta}, {min_epochs}, {max_epochs}")
    levels = []
    r = min_epochs
    while r < max_epochs:
        levels.append(r)
        r *= eta
    return [*levels, max_epochs]


def hyperband_brackets(max_epochs: int, eta: int = ETA, min_epochs: int = MIN_EPOCHS) -> list[list[tuple[int, int]]]:
    """The brackets of one Hyperband round, most exploratory first.

    Returns:
        One list per bracket of ``(configurations, epochs)`` per successive-halving step, e.g. for
        ``max_epochs=20``: ``[[(27, 1), (9, 3), (3, 9), (1, 20)], [(12, 3), (4, 9), (1, 20)], ...]``.
    """
    levels = rung_epochs(max_epochs, eta, min_epochs)
    s_max = len(levels) - 1
    brackets = []
    for s in range(s_max, -1, -1):
        n = math.ceil((s_max + 1) / (s + 1) * eta**s)
        steps = []
        for level in levels[s_max - s :]:
            steps.append((n, level))
            n = max(1, n // eta)
        brackets.append(steps)
    return brackets


def _train_to(pool: Pool, ledger: Ledger, index: int, epochs: int) -> None:
    """Continue configuration ``index`` epoch by epoch up to ``epochs`` (stops at the budget or a failed epoch)."""
    while ledger.trained[index] < epochs and not ledger.done:
        value = ledger.train(index, int(ledger.trained[index]) + 1)
        if not math.isfinite(value):
            return


def _score_at(scores: np.ndarray, ledger: Ledger, index: int, epoch: int) -> float:
    """Validation score of ``index`` at ``epoch`` if it was reached, else ``-inf`` (never promoted)."""
    if ledger.trained[index] < epoch:
        return -math.inf
    value = scores[index, epoch - 1]
    return float(value) if math.isfinite(value) else -math.inf


def _draw(pool: Pool, ledger: Ledger, rng: np.random.Generator, n: int, started: np.ndarray) -> list[int]:
    """``n`` configurations: unused ones at random, then the least-trained ones below the cap that did not fail."""
    unused = np.flatnonzero(~started)
    picks = [int(i) for i in rng.permutation(unused)[:n]]
    if len(picks) < n:
        last = pool.val[np.arange(pool.size), np.maximum(ledger.trained, 1) - 1]
        alive = started & (ledger.trained < pool.epochs) & np.isfinite(last)
        open_ = [int(i) for i in np.flatnonzero(alive) if i not in picks]
        open_.sort(key=lambda i: (ledger.trained[i], rng.random()))
        picks += open_[: n - len(picks)]
    started[picks] = True
    return picks


def run_hyperband(pool: Pool, ledger: Ledger, seed: int) -> None:
    """Spend the ledger's budget with Hyperband (see the module docstring)."""
    rng = np.random.default_rng(derive_seed("bench", "hyperband", seed))
    scores = to_scores(pool.val, pool.mode)
    started = np.zeros(pool.size, dtype=bool)
    brackets = hyperband_brackets(pool.epochs)
    while not ledger.done:
        progressed = False
        for bracket in brackets:
            with ledger.deciding():
                members = _draw(pool, ledger, rng, bracket[0][0], started)
            for step, (_, epochs) in enumerate(bracket):
                before = ledger.spent
                for index in members:
                    _train_to(pool, ledger, index, epochs)
                progressed |= ledger.spent > before
                if ledger.done:
                    return
                if step + 1 < len(bracket):
                    with ledger.deciding():
                        keep = bracket[step + 1][0]
                        ranked = sorted(members, key=lambda i, e=epochs: -_score_at(scores, ledger, i, e))
                        members = [i for i in ranked[:keep] if _score_at(scores, ledger, i, epochs) > -math.inf]
        if not progressed:
            return


def run_asha(pool: Pool, ledger: Ledger, seed: int) -> None:
    """Spend the ledger's budget with sequential ASHA (see the module docstring)."""
    rng = np.random.default_rng(derive_seed("bench", "asha", seed))
    scores = to_scores(pool.val, pool.mode)
    levels = rung_epochs(pool.epochs)
    started = np.zeros(pool.size, dtype=bool)
    rungs: list[list[int]] = [[] for _ in levels]
    promoted: list[set[int]] = [set() for _ in levels]
    while not ledger.done:
        with ledger.deciding():
            job: tuple[int, int] | None = None
            for k in range(len(levels) - 2, -1, -1):
                members = rungs[k]
                top = sorted(members, key=lambda i, e=levels[k]: -_score_at(scores, ledger, i, e))[
                    : len(members) // ETA
                ]
                ready = [i for i in top if i not in promoted[k] and _score_at(scores, ledger, i, levels[k]) > -math.inf]
                if ready:
                    job = (ready[0], k + 1)
                    promoted[k].add(ready[0])
                    break
            if job is None:
                fresh = _draw(pool, ledger, rng, 1, started)
                if not fresh:
                    return
                job = (fresh[0], next(k for k, e in enumerate(levels) if e > ledger.trained[fresh[0]]))
        index, k = job
        _train_to(pool, ledger, index, levels[k])
        if ledger.trained[index] >= levels[k] and index not in rungs[k]:
            rungs[k].append(index)


# ---------------------------------------------------------------------------------------------------- Optuna
def import_optuna() -> Any:
    """Import Optuna with its logging silenced, or raise a one-line :class:`FMSError` saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise FMSError("method 'optuna' needs Optuna: pip install 'lightning_fms[bench]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


_PRIMITIVE = (type(None), bool, int, float, str)


def suggest(trial: Any, pool: Pool) -> dict[str, Any]:
    """Ask an Optuna trial for a value of every parameter of the pool's space."""
    config: dict[str, Any] = {}
    for name, param in pool.space.items():
        if isinstance(param, FloatParam):
            config[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
        elif isinstance(param, IntParam):
            config[name] = trial.suggest_int(name, param.low, param.high, log=param.log)
        elif isinstance(param, CategoricalParam):
            if all(isinstance(c, _PRIMITIVE) for c in param.choices):
                config[name] = trial.suggest_categorical(name, list(param.choices))
            else:
                config[name] = param.choices[trial.suggest_categorical(name, list(range(len(param.choices))))]
        else:  # pragma: no cover - the space admits no other parameter type
            raise FMSError(f"parameter {name!r}: Optuna mapping does not know {type(param).__name__}")
    return config


def nearest(encoded: np.ndarray, point: np.ndarray, used: np.ndarray) -> int:
    """Index of the row of ``encoded`` ``[N, D]`` nearest to ``point`` ``[D]`` among unused rows (all if none is).

    Ties go to the lowest index.
    """
    distance = ((encoded - point[None, :]) ** 2).sum(axis=1)
    if not used.all():
        distance = np.where(used, np.inf, distance)
    return int(np.argmin(distance))


def run_optuna(pool: Pool, ledger: Ledger, seed: int) -> None:
    """Spend the ledger's budget with Optuna's TPE sampler and Hyperband pruner (see the module docstring)."""
    optuna = import_optuna()
    from optuna.trial import TrialState

    with ledger.deciding(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(
            direction="maximize" if pool.mode == "max" else "minimize",
            sampler=optuna.samplers.TPESampler(seed=derive_seed("bench", "optuna", seed)),
            pruner=optuna.pruners.HyperbandPruner(
                min_resource=MIN_EPOCHS, max_resource=pool.epochs, reduction_factor=ETA
            ),
            study_name=f"bench-{seed}",  # the pruner assigns brackets from a hash of the study name: keep it fixed
        )
        encoded = pool.space.encode_many(pool.configs).numpy()
    used = np.zeros(pool.size, dtype=bool)
    while not ledger.done:
        with ledger.deciding(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = study.ask()
            config = suggest(trial, pool)
            index = nearest(encoded, pool.space.encode(config).numpy(), used)
            used[index] = True
        for epoch in range(1, pool.epochs + 1):
            value = ledger.train(index, epoch)
            with ledger.deciding(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not math.isfinite(value):
                    study.tell(trial, state=TrialState.FAIL)
                    break
                if epoch == pool.epochs:
                    study.tell(trial, value)
                    break
                trial.report(value, epoch)
                if trial.should_prune():
                    study.tell(trial, state=TrialState.PRUNED)
                    break
            if ledger.done:
                return

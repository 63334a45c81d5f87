"""The offline check on tiny synthetic pools: what it reads, both protocols, the table, the CSV, the errors."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import yaml

from lightning_fms.bench.offline import (
    ACROSS,
    LAST_VALUE,
    WITH_WEIGHTS,
    WITHIN,
    WITHOUT_WEIGHTS,
    main,
    offline_check,
    task_data,
)
from lightning_fms.errors import FMSError
from lightning_fms.weights.summary import CHANGE_START


def test_task_data_reads_encodings_curves_and_weight_features(synthetic_pool) -> None:
    pool = synthetic_pool(n=12, epochs=5)
    pool.val[3, 4] = math.nan  # a run that failed in its last epoch is left out
    data = task_data(pool, [1, 3])
    assert data.dropped == 1 and data.curves.shape == (11, 5) and data.hp.shape == (11, pool.space.dim)
    assert data.shared_names == ["model.lr", "model.momentum"] and data.shared_hp.shape == (11, 2)
    assert sorted(data.weights) == [1, 3] and data.weights[1].shape == (11, 20)
    # the synthetic pool moves the weights by 0.01 * epoch per entry: W_3 is farther from W_0 than W_1
    change = data.weights[3][:, CHANGE_START:] - data.weights[1][:, CHANGE_START:]
    assert (data.weights[1][:, CHANGE_START:] > 0).any(axis=1).all() and (change[:, 0] > 0).all()


def test_both_protocols_score_every_task_and_epoch(synthetic_pool, tmp_path) -> None:
    pools = [synthetic_pool(n=90, epochs=6, seed=0, name="a"), synthetic_pool(n=90, epochs=6, seed=1, name="b")]
    report = offline_check(pools, epochs_seen=(1, 2, 6), folds=3)
    keys = {(r["protocol"], r["task"], r["t"], r["features"]) for r in report.rows}
    assert len(report.rows) == len(keys) == 2 * 2 * 2 * 3  # t=6 is not before the end: skipped
    for protocol in (WITHIN, ACROSS):
        for task in ("a", "b"):
            for t in (1, 2):
                for features in (LAST_VALUE, WITHOUT_WEIGHTS, WITH_WEIGHTS):
                    assert (protocol, task, t, features) in keys
    # the synthetic curves rise to a level set by the hyperparameters: the regressor ranks well within a task
    assert report.value(WITHIN, "a", 2, WITHOUT_WEIGHTS, "kendall_tau") > 0.3
    assert math.isnan(report.value(WITHIN, "a", 2, LAST_VALUE, "r2"))
    again = offline_check(pools, epochs_seen=(1, 2), folds=3)
    assert [r["kendall_tau"] for r in again.rows] == [r["kendall_tau"] for r in report.rows]  # seeded
    table = report.to_markdown()
    assert table.count("| a | 1 |") == 2 and "leave-one-task-out" in table
    out = tmp_path / "offline.csv"
    report.write_csv(out)
    with open(out) as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(report.rows)
    assert np.isclose(float(written[1]["kendall_tau"]), report.rows[1]["kendall_tau"])
    assert set(report.seconds) == {"weights", "models", "total"}


def test_bad_input_is_one_line(synthetic_pool, make_recipe, tmp_path, capsys) -> None:
    with pytest.raises(FMSError, match="fewer than 5 folds"):
        offline_check([synthetic_pool(n=4, epochs=3)], epochs_seen=(1,))
    with pytest.raises(FMSError, match="at least 1"):
        offline_check([synthetic_pool(n=4, epochs=3)], epochs_seen=(0,))
    recipe = make_recipe(max_epochs_per_trial=3)
    recipe["data"]["init_args"]["test_fraction"] = 0.25
    task = tmp_path / "tiny.yaml"
    task.write_text(yaml.safe_dump({**recipe, "name": "tiny", "pool": {"size": 4, "epochs": 3, "seed": 0}}))
    assert main([str(task), "--cache_dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "not built" in err and err.count("\n") == 1

"""Reading earlier tasks: a real tiny pool and real tiny studies, their rows as a study's surrogate sees them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lightning_fms import FMSError, FMSTuner, SearchSpace
from lightning_fms.bench.methods import PoolModules
from lightning_fms.bench.pool import build_pool, pool_dir
from lightning_fms.bench.task import BenchTask
from lightning_fms.search.rows import encode_rows, training_specs
from lightning_fms.search.trial import Trial, TrialStatus
from lightning_fms.transfer.columns import encoded_column_names
from lightning_fms.transfer.source_features import COUNTS, features_cache_path
from lightning_fms.transfer.sources import SourceTask, read_source, read_sources, task_rows
from lightning_fms.weights.summary import CHANGE_START, SummaryFeaturizer
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

SIZE, EPOCHS = 4, 3
STUDY_SPACE = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "data.batch_size": {"type": "categorical", "choices": [32, 64]},
}
#: Trials with a learning rate above this fail in their third epoch (see FailingClassifier).
FAILING_LR = 0.045


class FailingClassifier(ImageClassifier):
    """Raises in the third epoch when its learning rate is above :data:`FAILING_LR` (a trial that fails)."""

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 2 and self.hparams.lr > FAILING_LR:
            raise RuntimeError("injected failure in epoch 3")
        return super().training_step(batch, batch_idx)


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message, f"not one line: {message!r}"
    return message


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_pool(make_recipe, tmp_path_factory):
    """A real pool of the tiny hub (4 configurations x 3 epochs) built by the project's pool builder."""
    root = tmp_path_factory.mktemp("transfer-pool")
    data = make_recipe(max_epochs_per_trial=EPOCHS)
    data["data"]["init_args"]["test_fraction"] = 0.25
    data["name"] = "tiny"
    data["pool"] = {"size": SIZE, "epochs": EPOCHS, "seed": 0}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    task = BenchTask.from_file(path)
    cache = root / "cache"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = build_pool(task, cache_dir=cache)
    finally:
        torch.set_num_threads(previous)
    return task, pool, path, cache


def run_study(hub, study_dir: Path, fast_surrogate: dict, **options) -> FMSTuner:
    settings = {
        "budget": 8,
        "monitor": "val_acc",
        "max_epochs_per_trial": 3,
        "seed": 0,
        "num_fresh_candidates": 16,
        "surrogate_options": dict(fast_surrogate),
        "trainer_options": {"accelerator": "cpu"},
        "progress": False,
        **options,
    }
    space = SearchSpace.from_dict(STUDY_SPACE, hub_entries=hub.names)
    tuner = FMSTuner(FailingClassifier, DigitsDataModule, space, study_dir=study_dir, hub=hub, **settings)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tuner.run()
    finally:
        torch.set_num_threads(previous)
    return tuner


@pytest.fixture(scope="module")
def study(hub, tmp_path_factory):
    """A real fms study that records weights (weights: auto on a hub), some of whose trials fail in epoch 3."""
    fast = {"full_fit_steps": 60, "refine_steps": 10, "full_fits": 2}
    directory = tmp_path_factory.mktemp("transfer-study") / "digits-study"
    return run_study(hub, directory, fast, budget=12), directory


@pytest.fixture(scope="module")
def plain_study(hub, tmp_path_factory):
    """A real study whose searcher reads no weights (random): it records no snapshots."""
    directory = tmp_path_factory.mktemp("transfer-plain") / "plain"
    run_study(hub, directory, {}, budget=4, searcher="random")
    return directory


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "features-cache"


# ------------------------------------------------------------------ pools
def test_a_pool_read_from_its_task_file_and_its_folder_is_the_pool(tiny_pool, hub):
    task, pool, path, cache = tiny_pool
    by_task = read_source(path, cache_dir=cache, weights=False)
    by_folder = read_source(pool_dir(task, cache), cache_dir=cache, weights=False)
    for source in (by_task, by_folder):
        assert (source.name, source.origin, source.mode, source.cap) == ("tiny", "pool", "max", EPOCHS)
        assert (
            source.fingerprint
            == task.fingerprint()
            == json.loads((pool_dir(task, cache) / "pool.json").read_text())["fingerprint"]
        )
        assert source.configs == pool.configs and source.values.dtype == np.float64
        assert np.array_equal(source.values, pool.val) and np.isfinite(source.values).all()
        assert source.space.to_dict() == pool.space.to_dict() and source.space.hub_key == "hub"
        assert source.weight_features is None
        assert source.hub_entry_ids == {entry.name: entry.sha256 for entry in hub}
        assert all(len(sha) == 64 for sha in source.hub_entry_ids.values())
    assert by_task.path == str(path)


def test_pool_weight_features_equal_the_summary_featurizer_number_for_number(tiny_pool, cache):
    _, pool, path, pool_cache = tiny_pool
    features = read_source(path, cache_dir=pool_cache).weight_features
    assert features.shape == (SIZE, EPOCHS, 20) and features.dtype == np.float64 and np.isfinite(features).all()
    featurizer = SummaryFeaturizer()
    for i, config in enumerate(pool.configs):
        reference = pool.load_hub_module(config["hub"])
        for k in range(EPOCHS):
            expected = featurizer.features(pool.load_module(i, k), reference)
            assert expected.dtype == torch.float64
            assert np.array_equal(features[i, k], expected.numpy()), (i, k)
        assert (features[i, 0, CHANGE_START:] == 0).all() and (features[i, 1:, CHANGE_START:] > 0).any()


def test_pool_rows_are_the_rows_a_study_on_the_pool_would_fit(tiny_pool):
    _, pool, path, cache = tiny_pool
    source = read_source(path, cache_dir=cache)
    rows = task_rows(source)
    assert len(rows) == SIZE * EPOCHS and rows.column_names == encoded_column_names(pool.space)
    assert rows.config_index.tolist() == [i for i in range(SIZE) for _ in range(EPOCHS)]
    assert rows.epoch.tolist() == list(range(1, EPOCHS + 1)) * SIZE
    # hand-checked: configuration 2, epoch 3 sees y_1, y_2, the budget 3/3 and W_2, and predicts y_3
    r = 2 * EPOCHS + 2
    assert torch.equal(rows.x[r], pool.space.encode(pool.configs[2]))
    assert rows.budget[r] == 1.0 and rows.curve_lengths[r] == 2
    assert rows.curves[r].tolist() == [pool.val[2, 0], pool.val[2, 1], 0.0]
    assert rows.targets[r] == pool.val[2, 2] and rows.final[r] == pool.val[2, 2] and rows.final_epoch[r] == EPOCHS
    reference = pool.load_hub_module(pool.configs[2]["hub"])
    assert torch.equal(rows.weights[r], SummaryFeaturizer().features(pool.load_module(2, 2), reference))
    # configuration 1, epoch 1 sees nothing of its curve and its hub entry's pretrained weights
    r = EPOCHS
    assert rows.curve_lengths[r] == 0 and not rows.curves[r].any() and rows.budget[r] == pytest.approx(1 / 3)
    assert torch.equal(rows.weights[r], torch.from_numpy(source.weight_features[1, 0]))
    # the whole table against the search layer's own alignment on the same pool
    trials = [
        Trial(id=i, config=dict(c), values=[float(v) for v in pool.val[i]], status=TrialStatus.FINISHED)
        for i, c in enumerate(pool.configs)
    ]
    specs, targets = training_specs(pool.space, trials, pool.mode)
    surrogate_rows = encode_rows(pool.space, specs, EPOCHS, modules=PoolModules(pool))
    assert_rows_equal(rows, surrogate_rows, targets)


def assert_rows_equal(rows, surrogate_rows, targets) -> None:
    """Our float64 rows against encode_rows' float32 ones, and the weight features against the featurizer's."""
    assert torch.equal(rows.targets, torch.tensor(targets, dtype=torch.float64))
    assert torch.equal(rows.x.float(), surrogate_rows.x)
    assert torch.equal(rows.budget.float(), surrogate_rows.budget)
    assert torch.equal(rows.curves.float(), surrogate_rows.curves)
    assert torch.equal(rows.curve_lengths, surrogate_rows.curve_lengths)
    references = [surrogate_rows.weights[i] for i in surrogate_rows.reference_index.tolist()]
    with torch.no_grad():
        table = SummaryFeaturizer()(list(surrogate_rows.weights), list(surrogate_rows.weight_keys), references)
    assert torch.equal(rows.weights, table[surrogate_rows.weight_index])


def test_weight_features_are_cached_and_a_corrupt_cache_file_is_recomputed(tiny_pool, cache):
    task, _, path, pool_cache = tiny_pool
    folder = pool_dir(task, pool_cache)
    cached = features_cache_path(task.fingerprint(), cache)
    assert not cached.exists()
    computed, reused = COUNTS.computed, COUNTS.cached
    first = read_source(folder, cache_dir=cache)  # a pool folder is read where it is; features go to `cache`
    assert cached.is_file() and (COUNTS.computed, COUNTS.cached) == (computed + 1, reused)
    stamp = cached.stat().st_mtime_ns
    second = read_source(folder, cache_dir=cache)
    assert (COUNTS.computed, COUNTS.cached) == (computed + 1, reused + 1) and cached.stat().st_mtime_ns == stamp
    assert np.array_equal(first.weight_features, second.weight_features)
    for damage in (b"\x00garbage, not safetensors", None):
        if damage is None:  # a readable file of another shape is no cache of this source either
            save_file({"features": torch.zeros(SIZE, EPOCHS - 1, 20, dtype=torch.float64)}, str(cached))
        else:
            cached.write_bytes(damage)
        before = COUNTS.computed
        again = read_source(folder, cache_dir=cache)
        assert COUNTS.computed == before + 1
        assert np.array_equal(again.weight_features, first.weight_features)
        assert torch.equal(load_file(str(cached))["features"], torch.from_numpy(first.weight_features))


def test_a_pool_folder_whose_task_file_is_gone_or_changed_is_refused(tiny_pool, tmp_path):
    task, _, _, cache = tiny_pool
    folder = tmp_path / "copy"
    shutil.copytree(pool_dir(task, cache), folder)
    settings = json.loads((folder / "task.json").read_text())
    gone = tmp_path / "gone.yaml"
    (folder / "task.json").write_text(json.dumps({**settings, "task_file": str(gone)}))
    with pytest.raises(FMSError) as error:
        read_source(folder, weights=False)
    assert f"task file {gone} is gone" in one_line_error(error)
    changed = tmp_path / "changed.yaml"
    data = yaml.safe_load(Path(settings["task_file"]).read_text())
    data["pool"]["seed"] = 1
    changed.write_text(yaml.safe_dump(data))
    (folder / "task.json").write_text(json.dumps({**settings, "task_file": str(changed)}))
    with pytest.raises(FMSError) as error:
        read_source(folder, weights=False)
    assert "changed since the pool was built" in one_line_error(error)


# ------------------------------------------------------------------ studies
def test_the_tuner_stores_each_hub_entry_s_pretrained_weights_once(study, hub):
    _, directory = study
    for entry in hub:
        path = directory / "weights" / f"hub-{entry.name}.safetensors"
        pretrained = hub.build(entry.name)
        stored = load_file(str(path))
        assert set(stored) == set(pretrained.state_dict())
        assert all(torch.equal(stored[k], v) for k, v in pretrained.state_dict().items())
        with open(path, "rb") as handle:  # the safetensors header: 8 bytes of length, then JSON
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        described = json.loads(header["__metadata__"]["lightning_fms.module"])
        assert described["parameters"] == [name for name, _ in pretrained.named_parameters()]
        assert described["sha256"] == entry.sha256


def test_a_study_read_with_weights_is_the_study_its_surrogate_saw(study, hub, cache):
    tuner, directory = study
    source = read_source(directory, cache_dir=cache)
    trials = sorted(tuner.optimizer.trials.values(), key=lambda t: t.id)
    assert (source.name, source.origin, source.mode, source.cap) == ("digits-study", "study", "max", 3)
    assert source.space.to_dict() == tuner.space.to_dict()
    assert source.configs == [t.config for t in trials]
    assert source.hub_entry_ids == {entry.name: entry.sha256 for entry in hub}
    failed = [t for t in trials if t.status == TrialStatus.FAILED]
    # the seeded study has a trial that failed in epoch 3 (it keeps its first two values) and one that finished
    assert failed and all(len(t.values) == 2 and "epoch 3" in t.error for t in failed), "no trial failed in epoch 3"
    assert any(t.status == TrialStatus.FINISHED for t in trials), "no trial ran 3 epochs"
    for row, trial in zip(source.values, trials):
        assert np.array_equal(row[: trial.epochs], trial.values, equal_nan=True)
        assert np.isnan(row[trial.epochs :]).all()
    features = source.weight_features
    for i, trial in enumerate(trials):
        recorded = [k for k in range(3) if k == 0 or (k <= trial.epochs and np.isfinite(trial.values[k - 1]))]
        assert [k for k in range(3) if np.isfinite(features[i, k]).all()] == recorded
    rows = task_rows(source)
    # a failed trial contributes the epochs before its failure; every row's weights are known
    for trial in failed:
        mine = rows.config_index == trials.index(trial)
        assert rows.epoch[mine].tolist() == [1, 2] and rows.final_epoch[mine].tolist() == [2, 2]
        assert rows.final[mine].tolist() == [trial.values[1]] * 2
    specs, targets = training_specs(tuner.space, trials, "max")
    surrogate_rows = encode_rows(tuner.space, specs, 3, modules=tuner.modules)
    assert len(rows) == len(specs)
    assert_rows_equal(rows, surrogate_rows, targets)


def test_a_study_without_weight_snapshots_reads_without_weights_only(plain_study, cache):
    source = read_source(plain_study, cache_dir=cache, weights=False)
    state = json.loads((plain_study / "study.json").read_text())
    assert (
        source.origin == "study"
        and source.weight_features is None
        and source.hub_entry_ids == dict.fromkeys(source.space["hub"].choices, "")
    )
    assert [len(t["values"]) for t in state["trials"]] == [int(np.isfinite(row).sum()) for row in source.values]
    assert (
        len(task_rows(source)) == sum(len(t["values"]) for t in state["trials"]) and task_rows(source).weights is None
    )
    with pytest.raises(FMSError) as error:
        read_source(plain_study, cache_dir=cache)
    assert "recorded no weights" in one_line_error(error) and "weights" in str(error.value)
    # study.json alone is read the same way as state.pt
    copy = plain_study.parent / "json-only"
    copy.mkdir()
    shutil.copy(plain_study / "study.json", copy / "study.json")
    again = read_source(copy, cache_dir=cache, weights=False)
    assert again.fingerprint == source.fingerprint and np.array_equal(again.values, source.values, equal_nan=True)


def test_a_study_without_hub_snapshots_is_refused_until_it_is_resumed(study, hub, tmp_path, cache):
    tuner, directory = study
    old = tmp_path / "old-study"
    shutil.copytree(directory, old)
    for path in (old / "weights").glob("hub-*.safetensors"):
        path.unlink()
    with pytest.raises(FMSError) as error:
        read_source(old, cache_dir=cache)
    assert "resume the study once" in one_line_error(error)
    run_study(hub, old, {"full_fit_steps": 60, "refine_steps": 10, "full_fits": 2}, budget=12)  # trains nothing
    resumed = read_source(old, cache_dir=cache)
    original = read_source(directory, cache_dir=cache)
    assert resumed.fingerprint == original.fingerprint
    assert np.array_equal(resumed.weight_features, original.weight_features, equal_nan=True)


# ------------------------------------------------------------------ errors, several sources, rows by hand
def test_bad_paths_are_refused_in_one_line(tmp_path, cache):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken-study"
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"not a torch file")
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "notes.txt": "not a benchmark task file",
        tmp_path / "empty": "neither a pool folder nor a study directory",
        broken: "refused to load",
    }
    for path, message in cases.items():
        with pytest.raises(FMSError) as error:
            read_source(path, cache_dir=cache)
        assert message in one_line_error(error) and str(path) in str(error.value)


def test_a_task_file_whose_pool_is_not_built_is_refused(tiny_pool, tmp_path):
    _, _, path, _ = tiny_pool
    with pytest.raises(FMSError) as error:
        read_source(path, cache_dir=tmp_path / "empty-cache")
    assert "is not built" in one_line_error(error)


def test_two_sources_of_one_task_are_refused(tiny_pool, study, tmp_path, cache, capsys):
    task, _, path, pool_cache = tiny_pool
    _, directory = study
    with pytest.raises(FMSError) as error:
        read_sources([path, pool_dir(task, pool_cache)], cache_dir=pool_cache, weights=False)
    assert "the same task" in one_line_error(error)
    copy = tmp_path / "copy-of-study"
    shutil.copytree(directory, copy)
    with pytest.raises(FMSError) as error:
        read_sources([directory, copy], cache_dir=cache, weights=False)
    assert "the same task" in one_line_error(error)
    both = read_sources([path, directory], cache_dir=pool_cache, progress=True)
    assert [s.origin for s in both] == ["pool", "study"] and all(s.weight_features is not None for s in both)
    assert "tiny (pool): 4 configurations x 3 epochs" in capsys.readouterr().err


def test_rows_by_hand_failures_unknown_weights_and_min_mode():
    space = SearchSpace.from_dict(
        {"hub": {"type": "hub", "choices": ["a", "b"]}, "lr": {"type": "float", "low": 0.0, "high": 1.0}}
    )
    values = np.array([[0.5, 0.4, 0.3], [0.9, np.nan, np.nan], [np.nan, np.nan, np.nan], [0.8, 0.7, np.nan]])
    features = np.arange(4 * 3 * 20, dtype=np.float64).reshape(4, 3, 20)
    features[0, 1] = np.nan  # W_1 of configuration 0 is unknown: its row predicting epoch 2 is dropped
    source = SourceTask(
        name="hand",
        origin="study",
        fingerprint="0" * 64,
        path="hand",
        space=space,
        mode="min",
        cap=3,
        configs=[{"hub": "a", "lr": 0.1}, {"hub": "b", "lr": 0.2}, {"hub": "a", "lr": 0.3}, {"hub": "b", "lr": 0.4}],
        values=values,
        weight_features=features,
        hub_entry_ids={"a": "", "b": ""},
    )
    assert np.array_equal(source.scores(), -values, equal_nan=True)
    rows = task_rows(source)
    assert list(zip(rows.config_index.tolist(), rows.epoch.tolist())) == [(0, 1), (0, 3), (1, 1), (3, 1), (3, 2)]
    assert rows.targets.tolist() == [-0.5, -0.3, -0.9, -0.8, -0.7]
    assert rows.final.tolist() == [-0.3, -0.3, -0.9, -0.7, -0.7] and rows.final_epoch.tolist() == [3, 3, 1, 2, 2]
    assert rows.curves[1].tolist() == [-0.5, -0.4, 0.0] and rows.curve_lengths.tolist() == [0, 2, 0, 0, 1]
    assert rows.curves[4].tolist() == [-0.8, 0.0, 0.0]
    assert rows.budget.tolist() == pytest.approx([1 / 3, 1, 1 / 3, 1 / 3, 2 / 3])
    assert torch.equal(rows.weights[1], torch.from_numpy(features[0, 2]))
    assert torch.equal(rows.weights[4], torch.from_numpy(features[3, 1]))
    assert rows.x.dtype == torch.float64 and rows.x[3].tolist() == [0.0, 1.0, 0.4]
    assert rows.column_names == ["hub=a", "hub=b", "lr"]
    source.weight_features = None
    plain = task_rows(source)
    assert plain.weights is None and len(plain) == 6

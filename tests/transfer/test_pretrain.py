"""``pretrain`` end to end: real tiny pools and a real study in, a prior out, and a study that starts from it."""

from __future__ import annotations

import pytest
import torch

from lightning_fms import FMSTuner, SearchSpace
from lightning_fms.errors import FMSError
from lightning_fms.testing.pools import build_tiny_pools
from lightning_fms.transfer.pretrain import PretrainOptions, pretrain
from lightning_fms.transfer.prior import load_prior
from lightning_fms.transfer.sources import read_source
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

FAST = {"steps": 30, "batch_rows": 16, "trunk_steps": 30}
SPACE = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.momentum": {"type": "float", "low": 0.0, "high": 0.9},
    "data.batch_size": {"type": "categorical", "choices": [32, 64]},
}


@pytest.fixture(scope="module")
def two_pools(make_recipe, tmp_path_factory):
    """Two real tiny pools (4 configurations x 3 epochs) of the tiny hub, and a third task over another space."""
    root = tmp_path_factory.mktemp("pretrain")
    cache = root / "cache"
    recipes = {}
    for seed, name in enumerate(("first", "second", "other")):
        data = make_recipe(max_epochs_per_trial=3)
        data["data"]["init_args"]["test_fraction"] = 0.25
        if name == "other":
            data["space"] = {**data["space"], "model.lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True}}
        recipes[name] = {**data, "pool": {"size": 4, "epochs": 3, "seed": seed}}
    return build_tiny_pools(recipes, root, cache), cache


def test_pretrain_writes_a_prior_of_what_it_read(two_pools, tmp_path):
    paths, cache = two_pools
    out = tmp_path / "prior.safetensors"
    result = pretrain(
        [paths["first"], paths["second"]], out, PretrainOptions(**FAST, cache_dir=str(cache)), progress=False
    )
    assert result.path == out and result.bytes == out.stat().st_size > 0
    prior = load_prior(out)
    meta = prior.metadata
    assert (meta["searcher"], meta["weights"], meta["curve"]) == ("fms", "summary", "cnn")
    expected = {read_source(paths[n], cache_dir=cache, weights=False).fingerprint for n in ("first", "second")}
    assert {s["fingerprint"] for s in meta["sources"]} == expected
    assert meta["training"]["validation_task"] == "second" and meta["training"]["training_tasks"] == ["first"]
    assert meta["trunk"]["input_dim"] == 20
    assert any(k.startswith("trunk/") for k in prior.tensors) and any(k.startswith("surrogate/") for k in prior.tensors)
    assert "model.lr" in meta["space"] and "hub" not in meta["space"]


def test_pretrain_refuses_what_does_not_fit_in_one_line(two_pools, tmp_path):
    paths, cache = two_pools
    options = PretrainOptions(**FAST, cache_dir=str(cache))
    with pytest.raises(FMSError, match="another search space") as error:
        pretrain([paths["first"], paths["other"]], tmp_path / "p.safetensors", options, progress=False)
    assert "\n" not in str(error.value) and "model.lr" in str(error.value)
    with pytest.raises(FMSError, match="validation_task 'nope'"):
        pretrain(
            [paths["first"]],
            tmp_path / "p.safetensors",
            PretrainOptions(**FAST, validation_task="nope", cache_dir=str(cache)),
        )
    with pytest.raises(FMSError, match="not 'gmn'"):
        pretrain(
            [paths["first"]], tmp_path / "p.safetensors", PretrainOptions(**FAST, weights="gmn", cache_dir=str(cache))
        )
    assert not (tmp_path / "p.safetensors").exists()


def test_a_study_learns_a_prior_from_earlier_study_directories_and_starts_from_it(hub, tmp_path):
    space = SearchSpace.from_dict(SPACE, hub_entries=hub.names)
    settings = {
        "budget": 8,
        "monitor": "val_acc",
        "max_epochs_per_trial": 3,
        "num_fresh_candidates": 16,
        "surrogate_options": {"full_fit_steps": 40, "refine_steps": 10, "full_fits": 2},
        "trainer_options": {"accelerator": "cpu"},
        "progress": False,
    }
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in (0, 1):
            FMSTuner(ImageClassifier, DigitsDataModule, space, study_dir=tmp_path / f"s{seed}", hub=hub, seed=seed,
                     **settings).run()  # fmt: skip
        prior_path = tmp_path / "studies.safetensors"
        pretrain([tmp_path / "s0", tmp_path / "s1"], prior_path, PretrainOptions(**FAST), progress=False)
        assert [s["origin"] for s in load_prior(prior_path).metadata["sources"]] == ["study", "study"]
        tuner = FMSTuner(ImageClassifier, DigitsDataModule, space, study_dir=tmp_path / "new", hub=hub, seed=2,
                         prior=prior_path, **settings)  # fmt: skip
        surrogate = tuner.optimizer.searcher.surrogate
        assert surrogate._initial_parameters  # every fresh fit starts from the prior's parameters
        result = tuner.run()
    finally:
        torch.set_num_threads(previous)
    assert result.epochs_spent == 8
    assert surrogate.num_full_fits >= 1 and not surrogate.answers_with_prior
    assert type(surrogate.featurizer).__name__ == "PretrainedFeaturizer"

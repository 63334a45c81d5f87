import math

import numpy as np
import pytest
import torch

from lightning_fms import FMSError, SearchSpace
from lightning_fms.search.space import CategoricalParam, FloatParam, HubChoice, IntParam

SPEC = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "model.momentum": {"type": "float", "low": 0.0, "high": 0.9},
    "model.layers": {"type": "int", "low": 1, "high": 4},
    "data.batch_size": {"type": "categorical", "choices": [16, 32, 64]},
}


def make_space():
    return SearchSpace.from_dict(SPEC, hub_entries=["a", "b", "c"])


def test_parameters_and_dim():
    space = make_space()
    assert isinstance(space["hub"], HubChoice)
    assert isinstance(space["model.lr"], FloatParam) and space["model.lr"].log
    assert isinstance(space["model.layers"], IntParam)
    assert isinstance(space["data.batch_size"], CategoricalParam)
    assert space.hub_key == "hub"
    assert space.dim == 3 + 1 + 1 + 1 + 3


def test_sampling_is_reproducible_and_valid():
    space = make_space()
    a = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    b = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(0)
    configs = [space.sample(rng) for _ in range(200)]
    for config in configs:
        space.validate(config)
    assert len({c["hub"] for c in configs}) == 3
    # log-uniform: about half the draws fall below the geometric midpoint 1e-2
    below = sum(c["model.lr"] < 1e-2 for c in configs) / len(configs)
    assert 0.35 < below < 0.65


def test_encoding_is_unit_cube_and_log_scaled():
    space = make_space()
    x = space.encode({"hub": "b", "model.lr": 1e-2, "model.momentum": 0.45, "model.layers": 4, "data.batch_size": 16})
    assert x.shape == (space.dim,)
    assert torch.all((x >= 0) & (x <= 1))
    assert x[:3].tolist() == [0.0, 1.0, 0.0]
    assert math.isclose(float(x[3]), 0.5, abs_tol=1e-9)  # log midpoint of [1e-4, 1]
    assert math.isclose(float(x[4]), 0.5, abs_tol=1e-9)
    assert float(x[5]) == 1.0
    assert x[6:].tolist() == [1.0, 0.0, 0.0]


def test_split_routes_prefixes():
    space = make_space()
    config = {"hub": "a", "model.lr": 0.1, "model.momentum": 0.1, "model.layers": 2, "data.batch_size": 32}
    entry, model, data = space.split(config)
    assert entry == "a"
    assert model == {"lr": 0.1, "momentum": 0.1, "layers": 2}
    assert data == {"batch_size": 32}


def test_round_trip_to_dict():
    space = make_space()
    again = SearchSpace.from_dict(space.to_dict())
    assert again.to_dict() == space.to_dict()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"x": {"type": "float", "low": 2.0, "high": 1.0}}, "low=2.0 is above high=1.0"),
        ({"x": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "log scale needs low > 0"),
        ({"x": {"type": "float", "low": -1.0, "high": 1.0, "log": True}}, "log scale needs low > 0"),
        ({"x": {"type": "float", "low": 1.0}}, "needs 'low' and 'high'"),
        ({"x": {"type": "gaussian"}}, "unknown type 'gaussian'"),
        ({"x": {"type": "float", "low": 0, "high": 1, "step": 2}}, "unknown key(s) ['step']"),
        ({"x": {"type": "int", "low": 0.5, "high": 3}}, "not an integer"),
        ({"x": {"type": "categorical", "choices": []}}, "at least one choice"),
        ({"x": 3}, "expected a mapping"),
        ({}, "empty"),
    ],
)
def test_bad_spaces_name_the_problem(spec, message):
    with pytest.raises(FMSError) as info:
        SearchSpace.from_dict(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_hub_entry_is_refused():
    with pytest.raises(FMSError, match="unknown hub entry 'z'"):
        SearchSpace.from_dict({"hub": {"type": "hub", "choices": ["a", "z"]}}, hub_entries=["a", "b"])


def test_validate_rejects_out_of_range():
    space = make_space()
    config = space.sample(np.random.default_rng(0))
    config["model.lr"] = 5.0
    with pytest.raises(FMSError, match="outside"):
        space.validate(config)

"""The prior file: a safetensors round trip, a stable fingerprint, and a one-line refusal for every bad file or misfit."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lightning_fms.search.space import SearchSpace
from lightning_fms.transfer.prior import (
    METADATA_KEY,
    PRIOR_FORMAT,
    Prior,
    PriorError,
    _metadata_sha256,
    _tensors_sha256,
    check_prior_fits,
    load_prior,
    save_prior,
)

#: The fingerprint of ``make_prior()`` (tests/transfer/conftest.py). A change of the fingerprint's definition
#: changes it, and with it every study's record of its prior: such a study could no longer be resumed.
PINNED_FINGERPRINT = "d56d8612020abaa325f08aaa6a0101dbcbf154ca20db535d7c872e822bf4d113"


def refusal(call, *args, **kwargs) -> str:
    """The one-line message of the PriorError that ``call`` raises."""
    with pytest.raises(PriorError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_keeps_tensors_metadata_and_fingerprint(make_prior, tmp_path):
    prior = make_prior()
    given = json.loads(json.dumps(prior.metadata))
    path = save_prior(prior, tmp_path / "sub" / "prior.safetensors")
    assert path == tmp_path / "sub" / "prior.safetensors" and path.is_file()
    assert prior.metadata == given and prior.path is None  # saving changes nothing in the prior itself
    assert [p.name for p in path.parent.iterdir()] == ["prior.safetensors"]  # no temporary file left behind

    loaded = load_prior(path)
    assert loaded.path == path
    assert set(loaded.tensors) == set(prior.tensors)
    for name, tensor in prior.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype and torch.equal(loaded.tensors[name], tensor), name
    assert {k: v for k, v in loaded.metadata.items() if not k.endswith("_sha256")} == given
    assert loaded.metadata["tensors_sha256"] == _tensors_sha256(prior.tensors)
    assert loaded.fingerprint == prior.fingerprint

    again = save_prior(loaded, tmp_path / "copy.safetensors")  # a loaded prior saves to the same content
    assert again.read_bytes() == path.read_bytes()


def test_fingerprint_is_stable_and_sees_every_change(make_prior, tmp_path):
    prior = make_prior()
    assert prior.fingerprint == make_prior().fingerprint == PINNED_FINGERPRINT
    reordered = Prior(dict(reversed(list(prior.tensors.items()))), dict(reversed(list(prior.metadata.items()))))
    assert reordered.fingerprint == prior.fingerprint  # neither dict order nor the path counts
    moved = load_prior(save_prior(prior, tmp_path / "elsewhere.safetensors"))
    assert moved.fingerprint == prior.fingerprint

    name = "trunk/0.weight"
    changes = {
        "a value": {**prior.tensors, name: prior.tensors[name] + 1e-9},
        "a dtype": {**prior.tensors, name: prior.tensors[name].float()},
        "a shape": {**prior.tensors, name: prior.tensors[name].reshape(3, 4)},
        "a name": {("trunk/1.weight" if k == name else k): v for k, v in prior.tensors.items()},
        "one tensor less": {k: v for k, v in prior.tensors.items() if k != name},
    }
    for what, tensors in changes.items():
        assert Prior(tensors, prior.metadata).fingerprint != prior.fingerprint, what
    assert make_prior(training={"steps": 11, "seed": 0}).fingerprint != prior.fingerprint


# ------------------------------------------------------------------------------------------------ bad files
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_missing_file_or_a_folder_is_refused(tmp_path):
    assert refusal(load_prior, tmp_path / "nope.safetensors") == f"prior {tmp_path / 'nope.safetensors'} does not exist"
    assert "is not a file" in refusal(load_prior, tmp_path)


def test_what_is_not_safetensors_is_refused_and_never_unpickled(make_prior, tmp_path):
    good = save_prior(make_prior(), tmp_path / "good.safetensors").read_bytes()
    cases = {
        "truncated.safetensors": good[: len(good) - 10],
        "header-only.safetensors": good[:5],
        "empty.safetensors": b"",
        "random.safetensors": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
        .to(torch.uint8)
        .numpy()
        .tobytes(),
        "pickle.safetensors": pickle.dumps({"tensors": _Evil(tmp_path / "PWNED-pickle")}),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        message = refusal(load_prior, tmp_path / name)
        assert message.startswith(f"prior {tmp_path / name} is not a safetensors file ("), message
    torch.save({"weight": _Evil(tmp_path / "PWNED-torch")}, tmp_path / "torch.safetensors")
    message = refusal(load_prior, tmp_path / "torch.safetensors")
    assert "is not a safetensors file" in message and "looks like a pickle, and priors are never unpickled" in message
    assert "looks like a pickle" in refusal(load_prior, tmp_path / "pickle.safetensors")
    assert not list(tmp_path.glob("PWNED*"))  # nothing was unpickled


def test_safetensors_without_usable_metadata_is_refused(tmp_path):
    tensors = {"trunk/0.weight": torch.ones(2)}
    save_file(tensors, tmp_path / "bare.safetensors")
    assert "has no 'lightning_fms' metadata" in refusal(load_prior, tmp_path / "bare.safetensors")
    save_file(tensors, tmp_path / "other.safetensors", metadata={"format": "pt"})
    assert "has no 'lightning_fms' metadata" in refusal(load_prior, tmp_path / "other.safetensors")
    save_file(tensors, tmp_path / "text.safetensors", metadata={METADATA_KEY: "{searcher: fms"})
    assert "its 'lightning_fms' metadata is not JSON" in refusal(load_prior, tmp_path / "text.safetensors")
    save_file(tensors, tmp_path / "list.safetensors", metadata={METADATA_KEY: "[1, 2]"})
    assert "its metadata is not a JSON object" in refusal(load_prior, tmp_path / "list.safetensors")


def _write_raw(path, prior: Prior, **metadata) -> None:
    """A prior file with exactly this metadata, its checksums computed as save_prior would (no validation)."""
    meta = {**prior.metadata, **metadata}
    meta["tensors_sha256"] = _tensors_sha256(prior.tensors)
    meta["metadata_sha256"] = _metadata_sha256(meta)
    save_file(prior.tensors, path, metadata={METADATA_KEY: json.dumps(meta)})


def test_another_format_version_is_refused(make_prior, tmp_path):
    _write_raw(tmp_path / "v2.safetensors", make_prior(), format="lightning_fms.prior/2")
    assert refusal(load_prior, tmp_path / "v2.safetensors") == (
        f"prior {tmp_path / 'v2.safetensors'} has format 'lightning_fms.prior/2'; "
        f"this version of lightning_fms reads {PRIOR_FORMAT!r}"
    )
    _write_raw(tmp_path / "none.safetensors", make_prior(), format=None)
    assert "has format None" in refusal(load_prior, tmp_path / "none.safetensors")


def test_incomplete_metadata_is_refused_on_load(make_prior, tmp_path):
    prior = make_prior()
    del prior.metadata["training"]
    _write_raw(tmp_path / "p.safetensors", prior)
    assert refusal(load_prior, tmp_path / "p.safetensors").endswith("its metadata lacks 'training'")
    _write_raw(tmp_path / "q.safetensors", make_prior(), searcher="gp")
    assert "metadata 'searcher' must be 'fms' or 'dyhpo', got 'gp'" in refusal(load_prior, tmp_path / "q.safetensors")


def test_a_tensor_edited_in_the_file_is_refused_as_tampered(make_prior, tmp_path):
    path = save_prior(make_prior(), tmp_path / "p.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a byte of the last tensor's data
    path.write_bytes(bytes(data))
    assert refusal(load_prior, path) == (
        f"prior {path} was modified after it was written (tampered or corrupt): its tensors do not match tensors_sha256"
    )


def test_edited_json_is_refused_as_tampered(make_prior, tmp_path):
    path = save_prior(make_prior(), tmp_path / "p.safetensors")
    original = path.read_bytes()
    assert original.count(b'\\"rows\\":3') == 1 and original.count(b'\\"tensors_sha256\\":\\"') == 1
    edits = {
        "a value": original.replace(b'\\"rows\\":3', b'\\"rows\\":4'),
        "the tensors' checksum": _same_length_hex_edit(original, b"tensors_sha256"),
        "the metadata's checksum": _same_length_hex_edit(original, b"metadata_sha256"),
    }
    for what, data in edits.items():
        assert data != original and len(data) == len(original), what
        path.write_bytes(data)
        message = refusal(load_prior, path)
        assert message.startswith(f"prior {path} was modified after it was written (tampered or corrupt): "), what
    path.write_bytes(edits["a value"])
    assert refusal(load_prior, path).endswith("its metadata does not match metadata_sha256")


def _same_length_hex_edit(data: bytes, key: bytes) -> bytes:
    """``data`` with the first hex digit of the checksum ``key`` changed (the header keeps its length)."""
    start = data.index(b'\\"' + key + b'\\":\\"') + len(key) + 8
    digit = data[start : start + 1]
    return data[:start] + (b"1" if digit == b"0" else b"0") + data[start + 1 :]


def test_save_refuses_metadata_it_could_not_read_back(make_prior, tmp_path):
    prior = make_prior()
    del prior.metadata["sources"]
    assert "its metadata lacks 'sources'" in refusal(save_prior, prior, tmp_path / "p.safetensors")
    cases = {
        "weights": ("auto", "metadata 'weights' must be 'none' or a featurizer"),
        "curve": ("lstm", "metadata 'curve' must be 'cnn' or 'none'"),
        "frozen_layers": (1, "metadata 'frozen_layers' must be true or false"),
        "space": ({"hub": {"type": "hub", "choices": ["a"]}}, "holds the hub choice 'hub' (non-hub parameters only)"),
        "columns": ("model.lr", "metadata 'columns' must be a list of column names"),
        "sources": ([{"name": "a"}], "metadata source #0 must have name, origin, fingerprint, rows"),
        "training": ({"when": object()}, "its metadata is not JSON-serialisable"),
    }
    for key, (value, fragment) in cases.items():
        assert fragment in refusal(save_prior, make_prior(**{key: value}), tmp_path / "p.safetensors"), key
    bad_space = {"model.lr": {"type": "float", "low": 1.0, "high": 0.1}}
    message = refusal(save_prior, make_prior(space=bad_space), tmp_path / "p.safetensors")
    assert "metadata 'space': parameter 'model.lr': range low=1.0 is above high=0.1" in message
    not_tensors = Prior({"trunk/0.weight": [1.0, 2.0]}, make_prior().metadata)
    assert "tensors must map names to tensors" in refusal(save_prior, not_tensors, tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


# ------------------------------------------------------------------------------------------------ does it fit?
def fits(prior, space, **settings):
    given = {"searcher": "dyhpo", "weights": "none", "curve": "cnn", "frozen_layers": False, **settings}
    check_prior_fits(prior, space=space, **given)


def test_a_prior_fits_its_settings_across_hubs_and_parameter_order(make_prior, recipe_space):
    prior = make_prior()
    fits(prior, recipe_space)
    spec = recipe_space.to_dict()
    other_hub = {"hub": {"type": "hub", "choices": ["resnet-s", "vit-m", "mlp-xs"]}}
    fits(prior, SearchSpace.from_dict({**other_hub, **{k: v for k, v in spec.items() if k != "hub"}}))
    reordered = dict(reversed(list(spec.items())))
    reordered["data.batch_size"] = {"type": "categorical", "choices": [64, 32]}
    fits(prior, SearchSpace.from_dict(reordered))
    renamed_hub = {("model.backbone" if k == "hub" else k): v for k, v in spec.items()}
    fits(prior, SearchSpace.from_dict(renamed_hub))
    for_fms = make_prior(searcher="fms", weights="summary", frozen_layers=True)
    fits(for_fms, recipe_space, searcher="fms", weights="summary", frozen_layers=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"searcher": "fms"}, "was learned for searcher 'dyhpo'; this study uses 'fms'"),
        ({"weights": "summary"}, "was learned for featurizer (weights) 'none'; this study uses 'summary'"),
        ({"curve": "none"}, "was learned for curve input 'cnn'; this study uses 'none'"),
        ({"frozen_layers": True}, "was learned without the frozen-layer fidelity; this study runs with it"),
    ],
)
def test_a_prior_for_other_settings_is_refused(make_prior, recipe_space, tmp_path, settings, message):
    prior = load_prior(save_prior(make_prior(), tmp_path / "p.safetensors"))
    assert refusal(fits, prior, recipe_space, **settings) == f"prior {prior.path} {message}"
    assert refusal(fits, make_prior(), recipe_space, **settings) == f"the prior {message}"


def test_a_prior_learned_with_the_frozen_layer_fidelity_is_refused_without_it(make_prior, recipe_space):
    message = refusal(fits, make_prior(frozen_layers=True), recipe_space)
    assert message.endswith("was learned with the frozen-layer fidelity; this study runs without it")


SPACE_CHANGES = [
    (lambda s: s.pop("model.momentum"), "the study lacks the prior's parameter 'model.momentum'"),
    (lambda s: s.update({"model.wd": {"type": "float", "low": 0.0, "high": 0.1}}),
     "the study's parameter 'model.wd' is not in the prior"),
    (lambda s: s["model.lr"].update(high=0.5), "parameter 'model.lr' has high=0.3 in the prior, high=0.5 in the study"),
    (lambda s: s["model.lr"].update(low=1e-4, log=False),
     "parameter 'model.lr' has low=0.001, log=True in the prior, low=0.0001, log=False in the study"),
    (lambda s: s.update({"data.batch_size": {"type": "categorical", "choices": [16, 32]}}),
     "parameter 'data.batch_size' has choices [32, 64] in the prior, [16, 32] in the study"),
    (lambda s: s.update({"data.batch_size": {"type": "categorical", "choices": ["32", "64"]}}),
     "parameter 'data.batch_size' has choices [32, 64] in the prior, ['32', '64'] in the study"),
    (lambda s: s.update({"data.batch_size": {"type": "int", "low": 32, "high": 64}}),
     "parameter 'data.batch_size' is a categorical in the prior, an int in the study"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), SPACE_CHANGES)
def test_a_prior_for_another_space_is_refused_naming_the_difference(make_prior, recipe_space, change, message):
    spec = recipe_space.to_dict()
    change(spec)
    refused = refusal(fits, make_prior(), SearchSpace.from_dict(spec))
    assert refused == f"the prior was learned for another search space: {message}"


def test_every_difference_of_the_space_is_named_at_once(make_prior, recipe_space):
    spec = recipe_space.to_dict()
    spec.pop("model.momentum")
    spec["model.lr"]["high"] = 0.5
    spec["model.wd"] = {"type": "float", "low": 0.0, "high": 0.1}
    message = refusal(fits, make_prior(), SearchSpace.from_dict(spec))
    for fragment in ("lacks the prior's parameter 'model.momentum'", "high=0.5 in the study", "'model.wd' is not in"):
        assert fragment in message


def test_a_hub_on_one_side_only_is_refused(make_prior, recipe_space):
    without_hub = SearchSpace.from_dict({k: v for k, v in recipe_space.to_dict().items() if k != "hub"})
    assert refusal(fits, make_prior(), without_hub) == (
        "the prior was learned with a hub choice ('hub'); this space has none"
    )
    hubless = make_prior(for_space=without_hub)
    assert refusal(fits, hubless, recipe_space) == (
        "the prior was learned without a hub choice; this space has one ('hub')"
    )
    fits(hubless, without_hub)

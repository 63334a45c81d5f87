"""WeightSnapshots: safetensors files per key, an LRU cache in memory, nothing unpickled."""

import pytest
import torch

from lightning_fms.errors import CheckpointError
from lightning_fms.study.snapshots import WeightSnapshots, module_description


def state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=generator), "b": torch.randn(3, generator=generator)}


def test_a_snapshot_is_a_contiguous_cpu_copy(tmp_path):
    snapshots = WeightSnapshots(tmp_path)
    original = {"w": torch.arange(6.0).reshape(2, 3).t()}  # not contiguous
    snapshots.put(("trial", 0, 1), original)
    original["w"].add_(100.0)
    stored = snapshots.get(("trial", 0, 1))
    assert stored["w"].is_contiguous()
    assert torch.equal(stored["w"], torch.arange(6.0).reshape(2, 3).t())


def test_a_new_store_on_the_same_directory_finds_every_snapshot(tmp_path):
    WeightSnapshots(tmp_path).put(("trial", 3, 2), state(1))
    WeightSnapshots(tmp_path).put(("hub", "cnn-s"), state(2))
    again = WeightSnapshots(tmp_path)
    assert ("trial", 3, 2) in again and ("hub", "cnn-s") in again
    assert all(torch.equal(again.get(("trial", 3, 2))[k], v) for k, v in state(1).items())
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"


def test_snapshots_dropped_from_memory_are_read_back_from_disk(tmp_path):
    snapshots = WeightSnapshots(tmp_path, max_in_memory=2)
    for epoch in range(1, 5):
        snapshots.put(("trial", 0, epoch), state(epoch))
    assert len(snapshots._cache) == 2
    assert torch.equal(snapshots.get(("trial", 0, 1))["w"], state(1)["w"])


def test_in_memory_store_and_missing_keys(tmp_path):
    snapshots = WeightSnapshots(None)
    snapshots.put(("trial", 1, 1), state(0))
    assert ("trial", 1, 1) in snapshots and ("trial", 1, 2) not in snapshots
    with pytest.raises(KeyError):
        snapshots.get(("trial", 1, 2))


def test_a_corrupt_snapshot_is_a_checkpoint_error_naming_the_file(tmp_path):
    snapshots = WeightSnapshots(tmp_path)
    snapshots.put(("trial", 0, 1), state(0))
    path = next(tmp_path.glob("*.safetensors"))
    path.write_bytes(b"\x00\x01not safetensors")
    with pytest.raises(CheckpointError, match=path.name):
        WeightSnapshots(tmp_path).get(("trial", 0, 1))


def test_a_description_is_stored_in_the_file_and_read_back_by_a_new_store(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    description = module_description(module, sha256="ab" * 32)
    assert description == {
        "parameters": ["0.weight", "0.bias", "1.weight", "1.bias"],
        "floating_buffers": ["1.running_mean", "1.running_var"],
        "sha256": "ab" * 32,
    }
    WeightSnapshots(tmp_path).put(("hub", "cnn-s"), module.state_dict(), description=description)
    WeightSnapshots(tmp_path).put(("trial", 0, 1), state(0))
    again = WeightSnapshots(tmp_path)
    assert again.description(("hub", "cnn-s")) == description
    assert again.description(("trial", 0, 1)) is None
    assert set(again.get(("hub", "cnn-s"))) == set(module.state_dict())
    with pytest.raises(KeyError):
        again.description(("hub", "mlp-s"))
    memory = WeightSnapshots(None)
    memory.put(("hub", "cnn-s"), module.state_dict(), description=description)
    assert memory.description(("hub", "cnn-s")) == description and memory.path(("hub", "cnn-s")) is None


def test_a_hub_entry_named_by_a_path_is_one_file_in_the_folder(tmp_path):
    key = ("hub", "weights/mlp-s.safetensors")
    WeightSnapshots(tmp_path).put(key, state(3))
    assert [p.name for p in tmp_path.iterdir()] == ["hub-weights%2Fmlp-s.safetensors.safetensors"]
    again = WeightSnapshots(tmp_path)
    assert key in again and torch.equal(again.get(key)["w"], state(3)["w"])
    assert again.path(("trial", 2, 1)) == tmp_path / "trial-2-1.safetensors"

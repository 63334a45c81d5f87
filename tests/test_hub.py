from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_fms.errors import CheckpointError, FMSError
from lightning_fms.hub import HubEntry, ModelHub, load_weights_file, sha256_file
from lightning_fms.zoo import MLP, SmallCNN

MLP_PATH = "lightning_fms.zoo.MLP"


def _save_net(directory: Path, name: str, net: torch.nn.Module) -> Path:
    path = directory / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture
def hub_dir(tmp_path: Path) -> Path:
    """A hand-made hub (no training): two MLPs and one CNN, with hashes, written to hub.yaml."""
    torch.manual_seed(0)
    specs = [
        ("mlp-a", "mlp", MLP_PATH, {"hidden": 4}, MLP(hidden=4)),
        ("mlp-b", "mlp", MLP_PATH, {"hidden": 6, "depth": 1}, MLP(hidden=6, depth=1)),
        ("cnn-a", "cnn", "lightning_fms.zoo.SmallCNN", {"width": 2}, SmallCNN(width=2)),
    ]
    entries = []
    for name, family, class_path, init_args, net in specs:
        path = _save_net(tmp_path, name, net)
        entries.append(HubEntry(name, family, class_path, init_args, path, sha256_file(path)))
    ModelHub(entries, name="handmade").to_yaml(tmp_path / "hub.yaml")
    return tmp_path


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_round_trip_and_relative_paths(hub_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    hub = ModelHub.from_yaml(hub_dir / "hub.yaml")
    assert hub.name == "handmade"
    assert hub.names == ["mlp-a", "mlp-b", "cnn-a"]
    assert hub.families == {"mlp": ["mlp-a", "mlp-b"], "cnn": ["cnn-a"]}
    assert len(hub) == 3 and "mlp-b" in hub and "nope" not in hub
    assert [e.name for e in hub] == hub.names
    assert all(e.weights.is_absolute() and e.weights.parent == hub_dir.resolve() for e in hub)
    raw = yaml.safe_load((hub_dir / "hub.yaml").read_text())
    assert [e["weights"] for e in raw["entries"]] == ["mlp-a.safetensors", "mlp-b.safetensors", "cnn-a.safetensors"]

    # written again elsewhere: weights stay reachable, relative to the new YAML
    other = tmp_path_factory.mktemp("elsewhere") / "sub" / "hub.yaml"
    hub.to_yaml(other)
    again = ModelHub.from_yaml(other)
    assert list(again) == list(hub)
    assert {hash(e) for e in again} == {hash(e) for e in hub}

    # the whole folder moved: still loads
    moved = tmp_path_factory.mktemp("moved") / "hub"
    shutil.copytree(hub_dir, moved)
    assert ModelHub.from_yaml(moved / "hub.yaml").entry("mlp-a").weights == (moved / "mlp-a.safetensors").resolve()
    ModelHub.from_yaml(moved / "hub.yaml").build("mlp-a")


def test_build_loads_exactly_the_saved_weights(hub_dir: Path) -> None:
    hub = ModelHub.from_yaml(hub_dir / "hub.yaml")
    for entry in hub:
        saved = load_weights_file(entry.weights)
        net = hub.build(entry.name)
        state = net.state_dict()
        assert state.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(state[key], value), key
    assert isinstance(hub.build("cnn-a"), SmallCNN)
    hub.verify()


def test_sha256_tamper_is_refused(hub_dir: Path) -> None:
    hub = ModelHub.from_yaml(hub_dir / "hub.yaml")
    entry = hub.entry("mlp-a")
    state = load_weights_file(entry.weights)
    state["head.bias"] = state["head.bias"] + 1.0  # same keys and shapes, different numbers
    save_file(state, str(entry.weights))
    with pytest.raises(CheckpointError) as error:
        hub.build("mlp-a")
    message = _one_line(error)
    assert "tampered" in message and str(entry.weights) in message
    with pytest.raises(CheckpointError, match="tampered"):
        hub.verify()
    hub.build("mlp-b")  # the others still load


class _Payload:
    """Pickles as a call to ``exec`` that writes a marker file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pt"
    payload = {"head.weight": torch.zeros(5, 4), "head.bias": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with evil.open("wb") as fh:
            pickle.dump(payload, fh)
    assert not marker.exists()

    with pytest.raises(CheckpointError) as error:
        load_weights_file(evil)
    message = _one_line(error)
    assert "refused to load" in message and "pickled code" in message and str(evil) in message

    # through the hub, even with a matching sha256
    hub = ModelHub([HubEntry("evil", "mlp", MLP_PATH, {"hidden": 4}, evil, sha256_file(evil))])
    with pytest.raises(CheckpointError, match="pickled code"):
        hub.build("evil")
    assert not marker.exists(), "the pickled code ran"

    # the payload is live: an unsafe load would have run it (this is what the hub must never do)
    if writer == "torch.save":
        torch.load(evil, weights_only=False)
    else:
        with evil.open("rb") as fh:
            pickle.load(fh)  # noqa: S301
    assert marker.read_text() == "pwned"


def test_plain_torch_state_dict_loads_and_nested_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = MLP(hidden=4)
    flat = tmp_path / "flat.pt"
    torch.save(net.state_dict(), flat)
    hub = ModelHub([HubEntry("flat", "mlp", MLP_PATH, {"hidden": 4}, flat, None)])
    built = hub.build("flat")
    assert all(torch.equal(built.state_dict()[k], v) for k, v in net.state_dict().items())

    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, nested)
    with pytest.raises(CheckpointError, match="flat dict of tensors") as error:
        load_weights_file(nested)
    assert str(nested) in _one_line(error)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_corrupt_safetensors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    hub = ModelHub([HubEntry("bad", "mlp", MLP_PATH, {"hidden": 4}, path, None)])
    with pytest.raises(CheckpointError) as error:
        hub.build("bad")
    assert "corrupt safetensors" in _one_line(error) and str(path) in str(error.value)


def test_truncated_safetensors(hub_dir: Path) -> None:
    path = hub_dir / "mlp-a.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_weights_file(path)


def test_missing_weights_file(hub_dir: Path) -> None:
    (hub_dir / "mlp-b.safetensors").unlink()
    hub = ModelHub.from_yaml(hub_dir / "hub.yaml")
    with pytest.raises(CheckpointError) as error:
        hub.build("mlp-b")
    assert "not found" in _one_line(error) and "mlp-b.safetensors" in str(error.value)


def test_key_and_shape_mismatch(hub_dir: Path) -> None:
    hub = ModelHub.from_yaml(hub_dir / "hub.yaml")
    a = hub.entry("mlp-a")
    wrong_shape = ModelHub([HubEntry("x", "mlp", MLP_PATH, {"hidden": 5}, a.weights, a.sha256)])
    with pytest.raises(CheckpointError) as error:
        wrong_shape.build("x")
    assert "does not fit" in _one_line(error) and str(a.weights) in str(error.value)
    wrong_keys = ModelHub([HubEntry("y", "mlp", MLP_PATH, {"hidden": 4, "depth": 3}, a.weights, a.sha256)])
    with pytest.raises(CheckpointError, match="does not fit"):
        wrong_keys.build("y")


def test_unknown_entry_lists_known_names(hub_dir: Path) -> None:
    hub = ModelHub.from_yaml(hub_dir / "hub.yaml")
    with pytest.raises(FMSError) as error:
        hub.entry("resnet-z")
    message = _one_line(error)
    assert "resnet-z" in message and all(name in message for name in hub.names)
    with pytest.raises(FMSError, match="mlp-a, mlp-b, cnn-a"):
        hub.build("resnet-z")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("entries: [\n  - name: a\n    family: [unclosed\n", "malformed hub file"),
        ("- just\n- a list\n", "expected a mapping"),
        ("name: x\nentries: {}\n", "'entries' must be a list"),
        ("name: x\nentries: []\nextra: 1\n", r"unknown key\(s\) \['extra'\]"),
        (
            "entries:\n  - {name: a, family: mlp, class_path: m.C, weights: a.safetensors, colour: red}\n",
            r"entry 'a' has unknown key\(s\) \['colour'\]",
        ),
        ("entries:\n  - {name: a, family: mlp, weights: a.safetensors}\n", r"lacks key\(s\) \['class_path'\]"),
        ("entries:\n  - {name: a, family: mlp, class_path: m.C, weights: w, sha256: xyz}\n", "64 hex digits"),
        ("entries:\n  - {name: a, family: mlp, class_path: m.C, weights: w, init_args: [1]}\n", "init_args"),
        (
            "entries:\n  - {name: a, family: mlp, class_path: m.C, weights: w}\n"
            "  - {name: a, family: mlp, class_path: m.C, weights: v}\n",
            "duplicate entry name 'a'",
        ),
        ("!!python/object/apply:os.getcwd []\n", "malformed hub file"),
    ],
)
def test_malformed_yaml(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text(text)
    with pytest.raises(FMSError, match=match) as error:
        ModelHub.from_yaml(path)
    assert str(path) in _one_line(error)


def test_missing_hub_file(tmp_path: Path) -> None:
    with pytest.raises(FMSError, match="hub file not found") as error:
        ModelHub.from_yaml(tmp_path / "nope.yaml")
    assert "nope.yaml" in _one_line(error)


def test_duplicate_names_in_constructor(tmp_path: Path) -> None:
    entry = HubEntry("a", "mlp", MLP_PATH, {}, tmp_path / "a.safetensors", None)
    with pytest.raises(FMSError, match="duplicate entry name 'a'"):
        ModelHub([entry, entry])


@pytest.mark.parametrize(
    ("class_path", "match"),
    [
        ("lightning_fms.zoo.NoSuchNet", "does not import"),
        ("no_such_package_xyz.Net", "does not import"),
        ("collections.OrderedDict", "not an nn.Module subclass"),
        ("os.path.join", "not an nn.Module subclass"),
        ("MLP", "dotted import path"),
    ],
)
def test_bad_class_path(hub_dir: Path, class_path: str, match: str) -> None:
    weights = hub_dir / "mlp-a.safetensors"
    hub = ModelHub([HubEntry("a", "mlp", class_path, {"hidden": 4}, weights, None)])
    with pytest.raises(FMSError, match=match) as error:
        hub.build("a")
    assert class_path in _one_line(error)


def test_bad_init_args(hub_dir: Path) -> None:
    weights = hub_dir / "mlp-a.safetensors"
    hub = ModelHub([HubEntry("a", "mlp", MLP_PATH, {"hidden": 4, "colour": "red"}, weights, None)])
    with pytest.raises(FMSError, match="cannot build hub entry 'a'") as error:
        hub.build("a")
    _one_line(error)


def test_subset_keeps_order_and_rejects_unknown(hub_dir: Path) -> None:
    hub = ModelHub.from_yaml(hub_dir / "hub.yaml")
    assert hub.subset(["cnn-a", "mlp-a"]).names == ["cnn-a", "mlp-a"]
    with pytest.raises(FMSError, match="unknown hub entry"):
        hub.subset(["nope"])

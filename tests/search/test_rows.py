import torch
from torch import nn

from lightning_fms import SearchSpace, Trial, TrialStatus
from lightning_fms.search.rows import Candidate, candidate_specs, encode_rows, training_specs

SPACE = SearchSpace.from_dict(
    {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 0.0, "high": 1.0}}, hub_entries=["a", "b"]
)


def trials():
    t0 = Trial(0, {"hub": "a", "model.lr": 0.5}, values=[0.1, 0.2, 0.3], status=TrialStatus.PAUSED)
    t1 = Trial(1, {"hub": "b", "model.lr": 0.25}, values=[0.4], status=TrialStatus.PAUSED)
    return {0: t0, 1: t1}


def test_training_row_for_epoch_k_sees_only_the_past():
    specs, targets = training_specs(SPACE, list(trials().values()), "max")
    assert targets == [0.1, 0.2, 0.3, 0.4]
    rows = {(s.config["hub"], s.epoch): s for s in specs}
    assert rows[("a", 1)].curve == () and rows[("a", 1)].weight_key == ("hub", "a")
    assert rows[("a", 2)].curve == (0.1,) and rows[("a", 2)].weight_key == ("trial", 0, 1)
    assert rows[("a", 3)].curve == (0.1, 0.2) and rows[("a", 3)].weight_key == ("trial", 0, 2)
    assert rows[("b", 1)].curve == () and rows[("b", 1)].weight_key == ("hub", "b")


def test_candidate_rows_use_paid_for_information_only():
    ts = trials()
    cands = [Candidate(0, ts[0].config, 4), Candidate(None, {"hub": "b", "model.lr": 0.9}, 1)]
    specs = candidate_specs(SPACE, cands, ts, "max")
    assert specs[0].epoch == 4 and specs[0].curve == (0.1, 0.2, 0.3) and specs[0].weight_key == ("trial", 0, 3)
    # an unstarted configuration sees its hub entry's pretrained weights, never a trained checkpoint
    assert specs[1].epoch == 1 and specs[1].curve == () and specs[1].weight_key == ("hub", "b")


def test_minimised_metrics_become_scores():
    ts = trials()
    _, targets = training_specs(SPACE, list(ts.values()), "min")
    assert targets == [-0.1, -0.2, -0.3, -0.4]


def test_failed_epochs_are_not_rows_and_a_running_trial_gives_its_completed_epochs():
    ts = trials()
    ts[1].status = TrialStatus.RUNNING  # its epoch in flight is a pending row, the completed one a training row
    ts[0].values.append(float("nan"))
    ts[0].status = TrialStatus.FAILED
    specs, targets = training_specs(SPACE, list(ts.values()), "max")
    assert targets == [0.1, 0.2, 0.3, 0.4]
    assert [(s.config["hub"], s.epoch) for s in specs][-1] == ("b", 1)


def test_encoding_shapes_and_weight_dedup():
    specs, _ = training_specs(SPACE, list(trials().values()), "max")
    built = []

    def modules(key, config):
        built.append(key)
        return nn.Linear(1, 1)

    rows = encode_rows(SPACE, specs, cap=5, modules=modules)
    assert rows.x.shape == (4, SPACE.dim)
    assert rows.curves.shape == (4, 5)
    assert rows.curve_lengths.tolist() == [0, 1, 2, 0]
    assert torch.allclose(rows.budget, torch.tensor([0.2, 0.4, 0.6, 0.2]))
    assert rows.curves[2, :2].tolist() == [0.10000000149011612, 0.20000000298023224]
    assert len(built) == len(set(built)) == 4
    assert rows.weight_index.tolist() == [0, 1, 2, 3]


def test_reference_index_points_every_module_at_its_runs_hub_entry():
    ts = trials()
    cands = [Candidate(0, ts[0].config, 4), Candidate(1, ts[1].config, 2)]
    specs = candidate_specs(SPACE, cands, ts, "max")  # rows of trained weights only: no hub entry among them
    built = {}

    def modules(key, config):
        built[key] = nn.Linear(1, 1)
        return built[key]

    rows = encode_rows(SPACE, specs, cap=5, modules=modules)
    # the rows' own modules come first, then the hub entries their runs started from
    assert rows.weight_keys == [("trial", 0, 3), ("trial", 1, 1), ("hub", "a"), ("hub", "b")]
    assert rows.weight_index.tolist() == [0, 1]
    assert rows.reference_index.tolist() == [2, 3, 2, 3]
    assert all(rows.weights[i] is built[k] for i, k in enumerate(rows.weight_keys))

    training, _ = training_specs(SPACE, list(ts.values()), "max")
    rows = encode_rows(SPACE, training, cap=5, modules=modules)
    assert rows.weight_keys == [("hub", "a"), ("trial", 0, 1), ("trial", 0, 2), ("hub", "b")]
    assert rows.reference_index.tolist() == [0, 0, 0, 3]  # a hub entry is its own reference
    assert encode_rows(SPACE, training, cap=5).reference_index is None

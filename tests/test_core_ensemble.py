"""Fold models and their ensemble: checkpoint discovery, member loaders and the aggregations."""

from __future__ import annotations

import logging
import math
import pickle
import sys
import types

import joblib
import numpy as np
import pytest
import torch
from torch import nn

from oncofusion.ensemble import (
    AGGREGATIONS,
    MEMBER_LOADERS,
    Ensemble,
    LightGBMMember,
    SklearnMember,
    fold_checkpoints,
    fold_id,
    load_state_dict,
)


class Scale(nn.Module):
    """``x -> x * w + b`` with one weight per output, so each fold's checkpoint gives known outputs."""

    def __init__(self, outputs: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(outputs))
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.weight + self.bias


class Probabilities:
    """A picklable stand-in for a scikit-learn classifier: fixed class probabilities per row."""

    def __init__(self, probabilities):
        self.probabilities = np.asarray(probabilities, dtype=float)
        self.seen = None

    def predict_proba(self, x):
        self.seen = x
        return np.repeat(self.probabilities[None], len(x), axis=0)


class Regressor:
    """A picklable stand-in for a scikit-learn regressor: the row sums."""

    def predict(self, x):
        return np.asarray(x).sum(axis=1) * 1.5


def _save_folds(tmp_path, weights, biases=None, wrap=False):
    paths = []
    for k, w in enumerate(weights):
        net = Scale(len(w))
        with torch.no_grad():
            net.weight.copy_(torch.tensor(w, dtype=torch.float32))
            if biases is not None:
                net.bias.copy_(torch.tensor(biases[k], dtype=torch.float32))
        path = tmp_path / "models" / f"fold{k}" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model": net.state_dict(), "epoch": 3} if wrap else net.state_dict(), path)
        paths.append(path)
    return paths


def test_softmax_aggregation_is_over_the_class_axis():
    raw = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    out = AGGREGATIONS["mean_probability"](raw)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5], [0.25, 0.75]]))


def test_softmax_aggregation_is_over_the_last_axis_of_any_output():
    raw = torch.zeros(2, 3, 2)
    raw[..., 1] = math.log(3.0)
    out = AGGREGATIONS["mean_probability"](raw)
    assert torch.allclose(out, torch.tensor([0.25, 0.75]).expand(2, 3, 2))


@pytest.mark.parametrize("shape, expected", [((4, 1), (4,)), ((4,), (4,)), ((4, 2), (4, 2)), ((1, 1), (1,)),
                                             ((4, 1, 1), (4, 1, 1))])
def test_log_hazard_drops_only_a_single_output_column(shape, expected):
    raw = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    out = AGGREGATIONS["mean_log_hazard"](raw)
    assert tuple(out.shape) == expected
    assert torch.equal(out.flatten(), raw.flatten())


def test_mean_aggregation_keeps_the_raw_output():
    raw = torch.tensor([[-1.0, 2.0]])
    assert torch.equal(AGGREGATIONS["mean"](raw), raw)
    assert sorted(AGGREGATIONS) == ["mean", "mean_log_hazard", "mean_probability"]


def test_load_state_dict_reads_bare_and_checkpoint_saver_files(tmp_path):
    state = {"w": torch.tensor([1.0, 2.0])}
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"model": state, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "saver.pt")
    torch.save({"model": torch.tensor(3.0), "other": torch.tensor(1.0)}, tmp_path / "odd.pt")
    assert torch.equal(load_state_dict(tmp_path / "bare.pt")["w"], state["w"])
    assert set(load_state_dict(tmp_path / "saver.pt")) == {"w"}
    assert set(load_state_dict(str(tmp_path / "odd.pt"))) == {"model", "other"}
    assert load_state_dict(tmp_path / "bare.pt", "cpu")["w"].device.type == "cpu"


def test_load_state_dict_refuses_pickled_objects(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "estimator": Regressor()}, tmp_path / "unsafe.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(tmp_path / "unsafe.pt")


@pytest.mark.parametrize("path, expected", [
    ("models/fold3/model.pt", 3), ("models/fold12/model.txt", 12), ("fold0/model.pt", 0),
    ("models/model.pt", None), ("models/fold/model.pt", None), ("models/foldA/model.pt", None),
    ("models/xfold3/model.pt", None), ("models/Fold3/model.pt", None),
])
def test_fold_id_reads_the_folder_name(path, expected):
    assert fold_id(path) == expected


def test_fold_checkpoints_lists_folds_in_order_or_the_single_model(tmp_path):
    assert fold_checkpoints(tmp_path) == []
    (tmp_path / "model.pt").write_bytes(b"")
    assert fold_checkpoints(tmp_path) == [str(tmp_path / "model.pt")]
    assert fold_checkpoints(str(tmp_path), "model.txt") == []
    for k in (2, 0, 1):
        (tmp_path / f"fold{k}").mkdir()
        (tmp_path / f"fold{k}" / "model.txt").write_bytes(b"")
    (tmp_path / "fold3").mkdir()
    assert fold_checkpoints(tmp_path, "model.txt") == [str(tmp_path / f"fold{k}" / "model.txt") for k in range(3)]
    assert fold_checkpoints(tmp_path) == [str(tmp_path / "model.pt")]


def test_fold_checkpoints_ignores_a_folder_named_like_the_file(tmp_path):
    (tmp_path / "model.pt").mkdir()
    assert fold_checkpoints(tmp_path) == []


def _fake_lightgbm(monkeypatch, objective, raw):
    calls = []

    class Booster:
        def __init__(self, model_file):
            calls.append(("open", model_file))
            self.params = {} if objective is None else {"objective": objective}

        def predict(self, x, raw_score=False):
            calls.append(("predict", type(x), np.asarray(x).tolist(), raw_score))
            return raw

    monkeypatch.setitem(sys.modules, "lightgbm", types.SimpleNamespace(Booster=Booster))
    return calls


def test_lightgbm_binary_booster_gives_logits_whose_softmax_is_its_probability(monkeypatch, tmp_path):
    calls = _fake_lightgbm(monkeypatch, "binary", [0.0, math.log(3.0), -math.log(3.0)])
    member = LightGBMMember(tmp_path / "model.txt")
    assert member.path == str(tmp_path / "model.txt") and member.objective == "binary"
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    out = member(features)
    assert out.dtype == torch.float32 and out.shape == (3, 2)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [0.0, -math.log(3.0)]]))
    assert torch.allclose(torch.softmax(out, -1)[:, 1], torch.tensor([0.5, 0.75, 0.25]))
    assert calls == [("open", str(tmp_path / "model.txt")),
                     ("predict", np.ndarray, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], True)]


@pytest.mark.parametrize("objective, raw", [("multiclass", [[0.1, 0.2, 0.7]]), ("regression", [2.5]),
                                            (None, [1.5])])
def test_lightgbm_other_objectives_return_the_raw_scores(monkeypatch, tmp_path, objective, raw):
    calls = _fake_lightgbm(monkeypatch, objective, raw)
    member = LightGBMMember(str(tmp_path / "m.txt"))
    assert member.objective == ("" if objective is None else objective)
    out = member(np.array([[1.0, 2.0]]))
    assert calls[-1] == ("predict", np.ndarray, [[1.0, 2.0]], True)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(raw, dtype=torch.float32))


def test_lightgbm_is_a_named_member_loader():
    assert MEMBER_LOADERS == {"lightgbm": LightGBMMember, "sklearn": SklearnMember}


def test_sklearn_classifier_returns_log_probabilities_clipped_away_from_zero(tmp_path):
    path = tmp_path / "model.joblib"
    joblib.dump(Probabilities([0.0, 0.25, 0.75]), path)
    member = SklearnMember(path)
    assert member.path == str(path)
    out = member(torch.tensor([[1.0], [2.0]], requires_grad=True))
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    expected = torch.log(torch.tensor([1e-12, 0.25, 0.75], dtype=torch.float64)).float()
    assert torch.allclose(out, expected.expand(2, 3))
    assert isinstance(member.estimator.seen, np.ndarray)
    assert torch.allclose(torch.softmax(out, -1), torch.tensor([0.0, 0.25, 0.75]).expand(2, 3), atol=1e-6)


def test_sklearn_classifier_keeps_certain_classes_at_zero_log_probability(tmp_path):
    joblib.dump(Probabilities([1.0, 0.0]), tmp_path / "m.joblib")
    out = SklearnMember(tmp_path / "m.joblib")(np.zeros((1, 2)))
    assert out[0, 0].item() == 0.0
    assert out[0, 1].item() == pytest.approx(np.log(1e-12))


def test_sklearn_regressor_returns_its_prediction(tmp_path):
    joblib.dump(Regressor(), tmp_path / "risk.joblib")
    member = SklearnMember(str(tmp_path / "risk.joblib"))
    out = member(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([4.5, -1.5]))
    assert member(np.array([[1.0, 1.0]], dtype=np.float64)).dtype == torch.float32


def test_ensemble_refuses_missing_checkpoints_and_ambiguous_members(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Ensemble([], network=Scale())
    assert str(e.value) == "no model checkpoint found: train the bundle first (see its docs/README.md)"
    paths = _save_folds(tmp_path, [[1.0, 1.0]])
    with pytest.raises(ValueError) as e:
        Ensemble(paths)
    assert str(e.value) == "give either a torch 'network' or a 'member' loader, not both or neither"
    with pytest.raises(ValueError, match="not both or neither"):
        Ensemble(paths, network=Scale(), member="sklearn")
    with pytest.raises(ValueError, match=r"unknown aggregation 'median': use one of \['mean', 'mean_log_hazard', "
                                         r"'mean_probability'\]"):
        Ensemble(paths, network=Scale(), aggregation="median")


def test_ensemble_of_torch_folds_averages_probabilities(tmp_path, caplog):
    paths = _save_folds(tmp_path, [[0.0, 1.0], [0.0, 3.0]], wrap=True)
    network = Scale()
    with caplog.at_level(logging.INFO, logger="oncofusion.ensemble"):
        ensemble = Ensemble(paths, network=network)
    assert [r.getMessage() for r in caplog.records] == [f"loaded fold checkpoint {p}" for p in paths]
    assert ensemble.aggregation == "mean_probability" and ensemble.device == torch.device("cpu")
    assert ensemble.fold_ids == [0, 1]
    assert len(ensemble.models) == 2 and ensemble._callables == []
    assert all(not m.training for m in ensemble.models)
    assert all(m is not network for m in ensemble.models)
    assert torch.equal(network.weight, torch.ones(2))  # the template is copied, never loaded into
    x = torch.tensor([[math.log(3.0)], [0.0]], dtype=torch.float32)
    outputs = ensemble.member_outputs(x)
    assert outputs.shape == (2, 2, 2)
    p0 = torch.softmax(torch.tensor([0.0, math.log(3.0)]), -1)
    p1 = torch.softmax(torch.tensor([0.0, 3 * math.log(3.0)]), -1)
    assert torch.allclose(outputs[0, 0], p0) and torch.allclose(outputs[1, 0], p1)
    mean = ensemble(x)
    assert mean.shape == (2, 2) and not mean.requires_grad
    assert torch.allclose(mean[0], (p0 + p1) / 2)
    assert torch.allclose(mean[1], torch.tensor([0.5, 0.5]))
    assert torch.allclose(ensemble(x, fold=1)[0], p1)
    assert ensemble.member_outputs(x, fold=0).shape == (1, 2, 2)


def test_ensemble_members_pick_the_fold_that_never_saw_a_case(tmp_path):
    paths = _save_folds(tmp_path, [[1.0], [2.0], [5.0]])
    ensemble = Ensemble(paths, network=Scale(1), aggregation="mean_log_hazard")
    assert len(ensemble.members()) == 3
    assert ensemble.members(None) == list(ensemble.models)
    assert ensemble.members(2) == [ensemble.models[2]]
    assert ensemble.members(0) == [ensemble.models[0]]
    with pytest.raises(ValueError, match=r"no checkpoint of fold 3 \(have folds \[0, 1, 2\]\)"):
        ensemble.members(3)
    x = torch.tensor([[1.0], [2.0]])
    assert torch.allclose(ensemble(x), torch.tensor([8.0 / 3, 16.0 / 3]))
    assert ensemble(x).shape == (2,)
    assert torch.allclose(ensemble(x, fold=2), torch.tensor([5.0, 10.0]))
    assert ensemble.member_outputs(x, fold=1).shape == (1, 2)


def test_ensemble_single_model_has_no_fold(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(Scale(1).state_dict(), path)
    ensemble = Ensemble([path], network=Scale(1), aggregation="mean")
    assert ensemble.fold_ids == [None]
    with pytest.raises(ValueError, match=r"no checkpoint of fold 0 \(have folds \[None\]\)"):
        ensemble(torch.ones(1, 1), fold=0)
    assert torch.allclose(ensemble(torch.ones(1, 1)), torch.ones(1, 1))


def test_ensemble_moves_torch_members_to_its_device(tmp_path):
    ensemble = Ensemble(_save_folds(tmp_path, [[1.0], [2.0]]), network=Scale(1), device="meta")
    assert ensemble.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in ensemble.parameters())


def test_ensemble_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    paths = _save_folds(tmp_path, [[1.0, 2.0, 3.0]])
    with pytest.raises(RuntimeError):
        Ensemble(paths, network=Scale(2))


def test_ensemble_of_named_and_callable_members(tmp_path):
    for k, p in enumerate(([0.5, 0.5], [0.1, 0.9])):
        (tmp_path / f"fold{k}").mkdir()
        joblib.dump(Probabilities(p), tmp_path / f"fold{k}" / "model.joblib")
    paths = fold_checkpoints(tmp_path, "model.joblib")
    ensemble = Ensemble(paths, member="sklearn")
    assert len(ensemble.models) == 0 and len(ensemble._callables) == 2
    assert all(isinstance(m, SklearnMember) for m in ensemble.members())
    assert torch.allclose(ensemble(np.zeros((1, 4))), torch.tensor([[0.3, 0.7]]))
    assert torch.allclose(ensemble(np.zeros((1, 4)), fold=1), torch.tensor([[0.1, 0.9]]))

    seen = []

    def loader(path):
        seen.append(path)
        return lambda x: torch.full((x.shape[0], 1), float(len(seen)), dtype=torch.float64)

    ensemble = Ensemble([tmp_path / "fold0" / "a", tmp_path / "fold1" / "a"], member=loader,
                        aggregation="mean_log_hazard")
    assert seen == [str(tmp_path / "fold0" / "a"), str(tmp_path / "fold1" / "a")]
    out = ensemble(torch.zeros(3, 2))
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), 2.0))


def test_prepare_member_sees_each_loaded_member_before_the_next_is_copied(tmp_path):
    paths = _save_folds(tmp_path, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])

    class Trimming(Ensemble):
        def prepare_member(self, model):
            calls.append((len(self.models), model.weight.detach().tolist()))
            model.extra = None  # what a subclass frees, e.g. a text tower
            return model

    calls = []
    ensemble = Trimming(paths, network=Scale(2), aggregation="mean")
    assert calls == [(0, [1.0, 2.0]), (1, [3.0, 4.0]), (2, [5.0, 6.0])]
    assert all(member.extra is None for member in ensemble.models)

"""Compressing pretrained models: fits, error curves, the global allocation, recovery, HF models, the CLI."""

import math

import pytest
import torch
from torch import nn

from gblr.allocate import BUDGET_GRID, allocate_budgets, error_curve
from gblr.compress import SENSITIVITY_FLOOR, compress_
from gblr.convert import KEPT_DENSE
from gblr.fit import block_low_rank_error_curve, fit_gblr, relative_error
from gblr.learn import gblr_layers
from gblr.fit import structured_from_dense
from gblr.train.recovery import recover_


def _block_plus_noise(m=96, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(m, n, generator=g)
    w[:48, :32] += torch.randn(48, 4, generator=g) @ torch.randn(4, 32, generator=g)
    return w


def test_error_curve_is_the_error_of_the_fit_it_describes():
    w = _block_plus_noise()
    budgets = (0.1, 0.3, 0.5)
    curve = block_low_rank_error_curve(w, budgets)
    for budget, predicted in zip(budgets, curve):
        layer = fit_gblr(w, budget, steps=0)
        assert layer.relative_cost() <= budget
        assert relative_error(layer.to_dense(), w) == pytest.approx(predicted, rel=1e-6, abs=1e-9)
    assert curve == sorted(curve, reverse=True)


def test_fit_never_worse_than_low_rank_and_reports_its_method():
    w = _block_plus_noise(seed=1)
    for budget in (0.2, 0.4):
        lowrank = structured_from_dense("lowrank", w, budget)
        layer = fit_gblr(w, budget, steps=10)
        assert layer.fit_method.startswith(("block-low-rank", "learned"))
        assert relative_error(layer.to_dense(), w) <= relative_error(lowrank.to_dense(), w) + 1e-9
    # the hidden block is found: far better than low-rank at a small budget
    assert relative_error(fit_gblr(w, 0.1, steps=0).to_dense(), w) < 0.5 * relative_error(
        structured_from_dense("lowrank", w, 0.1).to_dense(), w)


def test_lowrank_curve_matches_its_fits():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(2))
    curve = error_curve("lowrank", w, (0.2, 0.6))
    for budget, predicted in zip((0.2, 0.6), curve):
        assert relative_error(structured_from_dense("lowrank", w, budget).to_dense(), w) == pytest.approx(predicted, rel=1e-6)
    assert error_curve("lowrank", w, (0.01,)) == [math.inf]  # below rank 1


def test_allocation_gives_more_to_layers_that_suffer_more():
    budgets = BUDGET_GRID
    flat = [0.30 - 0.1 * b for b in budgets]  # hardly improves with budget
    steep = [1.0 - b for b in budgets]  # improves a lot
    curves = {"flat": flat, "steep": steep}
    macs = {"flat": 1000, "steep": 1000}
    allocation = allocate_budgets(curves, macs, 0.5, budgets)
    assert allocation["steep"] > allocation["flat"]
    assert sum(allocation[n] * macs[n] for n in macs) <= 0.5 * 2000 + 1e-9
    # the allocation is at least as good as the uniform one on the objective
    uniform = budgets.index(0.5)
    objective = sum(curves[n][budgets.index(allocation[n])] ** 2 for n in curves)
    assert objective <= sum(curves[n][uniform] ** 2 for n in curves) + 1e-12
    # a sensitivity weight moves budget to that layer
    weighted = allocate_budgets(curves, macs, 0.5, budgets, sensitivity={"flat": 1000.0, "steep": 1.0})
    assert weighted["flat"] > allocation["flat"]


def test_allocation_errors_are_clear():
    with pytest.raises(ValueError, match="below the smallest reachable"):
        allocate_budgets({"a": [0.5] * len(BUDGET_GRID)}, {"a": 10}, 0.01)
    with pytest.raises(ValueError, match="error curve of 'a'"):
        allocate_budgets({"a": [0.5]}, {"a": 10}, 0.5)
    with pytest.raises(ValueError, match="no dense cost"):
        allocate_budgets({"a": [0.5] * len(BUDGET_GRID)}, {}, 0.5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 4)
        with torch.no_grad():  # a: nearly low-rank (cheap to compress), b: full rank
            self.a.weight.copy_(torch.randn(64, 3, generator=g) @ torch.randn(3, 32, generator=g) / 4)
            self.b.weight.copy_(torch.randn(32, 64, generator=g) / 8)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_compress_global_meets_target_and_beats_uniform_on_weight_error():
    results = {}
    for allocation in ("uniform", "global"):
        model = _Net()
        result = compress_(model, "gblr", 0.4, allocation, options={"steps": 0})
        assert result.reached <= 0.4 + 1e-9
        assert [r.name for r in result.conversion.replaced] == ["a", "b"]
        assert ("head", "excluded by the filter") in result.conversion.skipped
        results[allocation] = sum(r.relative_error ** 2 for r in result.conversion.replaced)
        if allocation == "global":
            budgets = {a.name: a.budget for a in result.allocation}
            assert budgets["b"] > budgets["a"]  # the full-rank layer needs more
            assert "global budget allocation" in result.to_markdown()
    assert results["global"] <= results["uniform"] + 1e-9


def test_global_allocation_may_keep_a_layer_dense():
    model = _Net()
    result = compress_(model, "lowrank", 0.7, "global")
    # a is nearly rank 3 (cheap to compress), b full rank: at 0.7 the best split leaves b as it was
    assert isinstance(model.b, nn.Linear) and not isinstance(model.a, nn.Linear)
    assert ("b", KEPT_DENSE) in result.conversion.skipped and result.conversion.failed == []
    assert {a.name: a.budget for a in result.allocation}["b"] == 1.0
    assert 0.5 < result.reached <= 0.7 + 1e-9  # b counts at its full cost
    uniform = compress_(_Net(), "lowrank", 0.7, "uniform")
    assert [r.name for r in uniform.conversion.replaced] == ["a", "b"]


def test_a_given_allocation_gives_gblr_the_budgets_of_another_family():
    lowrank = compress_(_Net(), "lowrank", 0.7, "global")
    given = {a.name: a.budget for a in lowrank.allocation}  # b kept dense (the test above)
    model = _Net()
    result = compress_(model, "gblr", 0.7, given, options={"steps": 0})
    assert ("b", KEPT_DENSE) in result.conversion.skipped and isinstance(model.b, nn.Linear)
    assert [(r.name, r.budget) for r in result.conversion.replaced] == [("a", given["a"])]
    assert result.target == pytest.approx((given["a"] + 1.0) / 2)  # a and b have the same dense cost
    assert result.reached <= result.target + 1e-9
    # a layer left out gets `budget`; bad names and budgets are one-line errors
    partial = compress_(_Net(), "lowrank", 0.5, {"a": 0.2})
    assert {r.name: r.budget for r in partial.conversion.replaced} == {"a": 0.2, "b": 0.5}
    with pytest.raises(ValueError, match="'c' is not one of the layers"):
        compress_(_Net(), "lowrank", 0.5, {"c": 0.2})
    with pytest.raises(ValueError, match=r"allocation\['a'\] must be a budget in \(0, 1\]"):
        compress_(_Net(), "lowrank", 0.5, {"a": 1.5})
    with pytest.raises(ValueError, match="only by allocation='global'"):
        compress_(_Net(), "lowrank", 0.5, {"a": 0.2}, calibration_loss=lambda m: 0.0)


def test_a_layer_the_calibration_cannot_resolve_is_not_treated_as_free():
    reference = _Net().b.weight.detach().clone()

    def loss(m):  # blind to layer a: its measured increase is zero
        with torch.no_grad():
            weight = m.b.weight if isinstance(m.b, nn.Linear) else m.b.to_dense()
            return float((weight - reference).pow(2).sum())

    result = compress_(_Net(), "lowrank", 0.5, "global", calibration_loss=loss)
    allocated = {a.name: a for a in result.allocation}
    assert allocated["a"].sensitivity == pytest.approx(SENSITIVITY_FLOOR * allocated["b"].sensitivity)
    assert allocated["a"].budget > BUDGET_GRID[0] and allocated["a"].relative_error < 0.5
    assert 0.45 <= result.reached <= 0.5 + 1e-9  # the budget is spent, not left over


def test_calibrated_allocation_uses_the_loss_and_restores_the_model():
    model = _Net()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = model(x)
    before = [n for n, _ in model.named_modules()]

    def loss(m):
        with torch.no_grad():
            return float((m(x) - target).pow(2).mean())

    result = compress_(model, "lowrank", 0.5, "global", calibration_loss=loss)
    assert [n for n, _ in model.named_modules()] == before  # same names; layers replaced once, at the end
    assert all(a.sensitivity >= 0 for a in result.allocation) and any(a.sensitivity > 0 for a in result.allocation)
    assert result.reached <= 0.5 + 1e-9
    with pytest.raises(ValueError, match="only by allocation='global'"):
        compress_(_Net(), "lowrank", 0.5, "uniform", calibration_loss=loss)
    with pytest.raises(ValueError, match="allocation must be one of"):
        compress_(_Net(), "lowrank", 0.5, "best")


def test_recovery_distils_with_frozen_or_learned_structure():
    teacher = _Net().eval()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        target = teacher(x)

    def batch_loss(model, step):
        return (model(x) - target).pow(2).mean()

    for learn in (False, True):
        student = _Net()
        compress_(student, "gblr", 0.3, "uniform", options={"steps": 0})
        layers = gblr_layers(student)
        widths = [layer.out_widths.detach().clone() for _, layer in layers]
        cost = sum(layer.macs_per_token() for _, layer in layers)
        result = recover_(student, batch_loss, 60, lr=3e-3, learn_structure=learn)
        assert not student.training
        assert result.losses[-1] < 0.7 * result.losses[0]
        if learn:
            assert result.cost_fraction is not None
            assert sum(layer.macs_per_token() for _, layer in layers) <= cost * 1.01
        else:
            assert all(torch.equal(w, layer.out_widths) for w, (_, layer) in zip(widths, layers))
        # frozen (and packed) only while recovering: the caller's model can learn its structure afterwards
        assert all(p.requires_grad for _, layer in layers for p in layer.parameters())
        assert not any(name.endswith("_packed") for name, _ in student.named_parameters())
    with pytest.raises(ValueError, match="steps"):
        recover_(student, batch_loss, 0)


@pytest.mark.parametrize("option, value", [("lr", 0.0), ("lr", float("nan")), ("weight_decay", -1e-3),
                                           ("structure_lr", float("inf")), ("warmup", 1.5), ("clip", 0.0),
                                           ("clip", True)])
def test_recovery_rejects_bad_options_before_touching_the_model(option, value):
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=f"^{option} must be"):
        recover_(model, lambda student, step: student(torch.ones(2, 4)).sum(), 2, **{option: value})
    assert torch.equal(model.weight, before) and model.training


@pytest.mark.parametrize("dropout", [False, True])
def test_recovery_trains_without_dropout_unless_asked(dropout):
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    repeats = []

    def batch_loss(student, step):  # the same batch twice: equal outputs only without dropout
        first, second = student(x), student(x)
        repeats.append(torch.equal(first, second))
        return first.pow(2).mean() + second.pow(2).mean()

    recover_(model, batch_loss, 3, dropout=dropout)
    assert repeats == [not dropout] * 3
    assert model[1].p == 0.5 and not model.training

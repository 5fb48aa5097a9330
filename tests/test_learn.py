import pytest
import torch
from torch import nn

from gblr import GBLRLinear
from gblr.learn import (
    STRUCTURE_GROUP,
    SigmaSchedule,
    StructureLearner,
    param_groups,
    project_to_budget,
    prox_width_step,
    structure_lr,
)


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(GBLRLinear(32, 64), nn.GELU(), GBLRLinear(64, 96), nn.GELU(), GBLRLinear(96, 10))


def test_param_groups():
    model = nn.Sequential(small_model(), nn.LayerNorm(10))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, structure_lr=7e-3)
    by_name = {g["name"]: g for g in groups}
    structure = by_name[STRUCTURE_GROUP]
    assert structure["lr"] == 7e-3 and structure["weight_decay"] == 0.0 and structure["betas"] == (0.0, 0.999)
    assert len(structure["params"]) == 3 * 4
    assert by_name["weights"]["weight_decay"] == 0.1
    assert all(p.dim() >= 2 for p in by_name["weights"]["params"])
    assert all(p.dim() == 1 for p in by_name["no_decay"]["params"])
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert optimizer.param_groups[-1]["betas"] == (0.0, 0.999)


@pytest.mark.parametrize("lr", [1e-4, 3e-2])
def test_the_learning_rate_reaches_the_optimizer(lr):
    """The weights move by about lr in the first Adam step, whatever the optimizer's own default."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=0.0))
    assert [g["lr"] for g in optimizer.param_groups] == [lr, lr]
    model(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    assert 0.5 * lr < moved <= 1.01 * lr


def test_structure_lr_found_by_name_not_position():
    model = small_model()
    groups = param_groups(model, lr=1e-3, structure_lr=2e-2)
    groups = groups[::-1]  # structural group first, a factor group last
    optimizer = torch.optim.AdamW(groups)
    assert structure_lr(optimizer) == 2e-2
    with pytest.raises(ValueError, match=STRUCTURE_GROUP):
        structure_lr(torch.optim.SGD(model.parameters(), lr=0.1))


def test_prox_step_is_cost_weighted_soft_threshold():
    layer = GBLRLinear(16, 48, num_components=3, width_init="full")
    with torch.no_grad():
        layer.out_widths.copy_(torch.tensor([0.5, 0.01, 1.0]))
        layer.in_widths.copy_(torch.tensor([0.5, 0.5, 1.0]))
        layer.out_starts.copy_(torch.tensor([1.25, -0.25, 0.5]))
    prox_width_step([layer], lam=1.0, lr=0.1)
    # side costs: out 48, in 16, mean 32 -> thresholds 0.15 (out) and 0.05 (in)
    assert torch.allclose(layer.out_widths, torch.tensor([0.35, 0.0, 0.85]))
    assert torch.allclose(layer.in_widths, torch.tensor([0.45, 0.45, 0.95]))
    assert torch.allclose(layer.out_starts, torch.tensor([0.25, 0.75, 0.5]))


def test_sigma_schedule():
    schedule = SigmaSchedule(1.0, 101.0, start_step=10, end_step=110)
    assert schedule(0) == 1.0 and schedule(60) == pytest.approx(51.0) and schedule(500) == 101.0
    assert SigmaSchedule(1.0, None, 0, 5)(5) is None
    with pytest.raises(ValueError, match="sigma"):
        SigmaSchedule(float("inf"), 1.0)


def train_to_budget(target, steps=300, seed=0):
    model = small_model(seed)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(param_groups(model, lr=3e-3, structure_lr=1e-2))
    learner = StructureLearner(
        model, optimizer, target=target, total_steps=steps, ramp=(0.1, 0.6), sigma=SigmaSchedule(1.0, 50.0, 0, steps)
    )
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        with torch.no_grad():
            y = teacher(x).argmax(-1)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(learner.step())
    return model, learner, history


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_budget_controller_reaches_target(target):
    model, learner, history = train_to_budget(target)
    reached = learner.cost_fraction()
    assert abs(reached - target) <= 0.02 * target, (reached, target)
    # The last quarter of training stays in the band too, not only the last step.
    for record in history[-75:]:
        assert abs(record["cost_fraction"] - target) <= 0.02 * target
    # Budget decreases monotonically during the ramp.
    budgets = [r["budget_fraction"] for r in history]
    assert all(a >= b - 1e-12 for a, b in zip(budgets, budgets[1:]))
    assert history[-1]["sigma"] == 50.0 and model[0].sigma == pytest.approx(50.0)


def test_learner_state_round_trip():
    model, learner, _ = train_to_budget(0.3, steps=20)
    other = StructureLearner(model, learner.optimizer, target=0.3, total_steps=20, sigma=SigmaSchedule(1.0, 50.0, 0, 20))
    other.load_state_dict(learner.state_dict())
    assert other.step_count == 20 and other.budget_fraction() == learner.budget_fraction()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": 0.0}, "target"),
        ({"target": 1.5}, "target"),
        ({"target": float("nan")}, "target"),
        ({"total_steps": 0}, "total_steps"),
        ({"ramp": (0.6, 0.2)}, "ramp"),
        ({"l1": -1.0}, "l1"),
    ],
)
def test_bad_learner_arguments(kwargs, message):
    model = small_model()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3))
    args = {"target": 0.3, "total_steps": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        StructureLearner(model, optimizer, **args)


def test_learner_needs_gblr_layers():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no GBLRLinear"):
        StructureLearner(model, torch.optim.AdamW(model.parameters()), target=0.3, total_steps=10)


def test_budget_controller_with_hardware_aware_tiles():
    torch.manual_seed(0)
    model = nn.Sequential(
        GBLRLinear(128, 256, rank=16, tile=16), nn.GELU(), GBLRLinear(256, 128, rank=16, tile=16)
    )
    optimizer = torch.optim.AdamW(param_groups(model, lr=3e-3, structure_lr=1e-2))
    steps = 200
    learner = StructureLearner(model, optimizer, target=0.3, total_steps=steps, ramp=(0.1, 0.6))
    for _ in range(steps):
        x = torch.randn(32, 128)
        loss = (model(x) - x.flip(-1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
    assert abs(learner.cost_fraction() - 0.3) <= 0.02 * 0.3
    for layer in (model[0], model[2]):
        h, w = layer.interval_sizes()
        assert (h % 16 == 0).all() and (w % 16 == 0).all()


def test_project_to_budget_shrinks_and_grows_to_the_budget():
    torch.manual_seed(0)
    layers = [GBLRLinear(64, 96), GBLRLinear(96, 32, rank=2)]
    dense = sum(layer.dense_macs_per_token for layer in layers)

    def cost():
        return sum(layer.macs_per_token() for layer in layers)

    assert project_to_budget(layers, 0.3 * dense) > 0
    # Components with equal widths empty at the same threshold: the cost can fall well below the
    # budget; growing the surviving components brings it back.
    assert cost() <= 0.3 * dense
    assert project_to_budget(layers, 0.3 * dense, allow_growth=True) <= 0
    assert 0.99 * 0.3 * dense <= cost() <= 0.3 * dense
    assert project_to_budget(layers, 0.5 * dense) == 0.0  # already within budget: nothing moves
    assert project_to_budget(layers, 0.5 * dense, allow_growth=True) < 0
    assert 0.99 * 0.5 * dense <= cost() <= 0.5 * dense
    assert all(((layer.out_widths >= 0) & (layer.out_widths <= 1)).all() for layer in layers)


def test_per_layer_allocation_holds_every_layer_to_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(32, 96), nn.GELU(), GBLRLinear(96, 16))
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3))
    learner = StructureLearner(model, optimizer, target=0.4, total_steps=30, ramp=(0.0, 0.5), allocation="per_layer")
    x = torch.randn(64, 32)
    for _ in range(30):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        stats = learner.step()
    for layer in (model[0], model[2]):
        assert 0.4 * 0.98 <= layer.relative_cost() <= 0.4
    assert float(stats["cost_fraction"]) == pytest.approx(learner.cost_fraction())
    with pytest.raises(ValueError, match="allocation must be one of"):
        StructureLearner(model, optimizer, target=0.4, total_steps=30, allocation="sideways")


class TwoBranches(nn.Module):
    """Two GBLR layers of one shape; the loss reacts far more to the first one's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.loud, self.quiet = GBLRLinear(48, 48), GBLRLinear(48, 48)

    def forward(self, x):
        return 10.0 * self.loud(x) + 0.1 * self.quiet(x)


def train_branches(steps=120, **options):
    model = TwoBranches()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, structure_lr=1e-2))
    learner = StructureLearner(model, optimizer, target=0.4, total_steps=steps, ramp=(0.1, 0.5), **options)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(48, 48, generator=gen)
    history = []
    for _ in range(steps):
        x = torch.randn(64, 48, generator=gen)
        optimizer.zero_grad()
        (model(x) - x @ teacher).square().mean().backward()
        optimizer.step()
        history.append(learner.step())
    return model, learner, history


def test_sensitivity_allocation_gives_more_to_the_layer_the_loss_reacts_to():
    shared, shared_learner, _ = train_branches(allocation="global")
    sensitive, learner, history = train_branches(allocation="sensitivity")
    assert 0.4 * 0.98 <= learner.cost_fraction() <= 0.4  # the same total budget, held
    assert sensitive.loud.relative_cost() > shared.loud.relative_cost() + 0.1
    assert sensitive.loud.relative_cost() > sensitive.quiet.relative_cost()
    # its running gradient power survives a checkpoint
    other = StructureLearner(sensitive, learner.optimizer, target=0.4, total_steps=120, allocation="sensitivity")
    other.load_state_dict(learner.state_dict())
    assert torch.equal(other._gradient_power, learner._gradient_power)


def test_mean_width_controller_is_the_papers_fixed_threshold():
    model, learner, history = train_branches(controller="mean_width", l1=2.0)
    layers = (model.loud, model.quiet)
    mean_width = torch.cat([w.detach() for layer in layers for w in (layer.out_widths, layer.in_widths)]).mean()
    target = 0.4 * learner.start_mean_width
    step = 1e-2 * 2.0  # structure lr times lambda: the most one step moves a width
    assert target - step <= float(mean_width) <= target + step
    # the same threshold for every width, on both sides, whatever the cost
    thresholds = {round(float(h["threshold"]), 9) for h in history}
    assert thresholds <= {0.0, round(step, 9)} and len(thresholds) == 2
    assert float(history[-1]["cost_fraction"]) == pytest.approx(learner.cost_fraction())


@pytest.mark.parametrize("options, message", [
    ({"controller": "mean_width"}, "needs l1 > 0"),
    ({"controller": "mean_width", "l1": 1.0, "allocation": "per_layer"}, "allocation 'global'"),
    ({"controller": "proportional"}, "controller must be one of"),
])
def test_bad_controller_options(options, message):
    model = small_model()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3))
    with pytest.raises(ValueError, match=message):
        StructureLearner(model, optimizer, target=0.3, total_steps=10, **options)
